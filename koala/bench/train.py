"""`python -m koala.bench train [bench.arch=medium] [bench.batch=2] [unet=tiny-700m] [bench.presets=[koala,lf,out]]`

Times the trainer's own step (`koala.train.step.train_step`, built by `koala.train.build` as `koala.train` builds it:
accelerate, autocast, taps, every loss, clipping, fused AdamW, LR schedule, EMA, logged terms), split into its parts,
beside the two pieces of unavoidable work:
  teacher  - the teacher forward alone (inference mode, teacher dtype)
  student  - the bare student forward + backward (no taps, no KD losses)
and prints the overhead ratio = step / (teacher + student) and where the step's time goes. Medians over interleaved
repetitions after warm-up, in one run. Teacher weights are random (the built-in arch config) and the conditioning
is synthetic with a cached batch's shapes, so no files are needed and data time is not part of the step; give a
loader (`data=cached data.path=...`) to time it too. On a GPU: `bench.arch=sdxl bench.resolution=1024
mixed_precision=bf16 teacher.dtype=bf16` (KOALA-700M; add `unet=koala-1b` for KOALA-1B).
"""

from __future__ import annotations

import json
import resource
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from koala.bench import train_overrides
from koala.bench.step_timing import PARTS, BenchTrain, build_bench, data_seconds, measure, measurements
from koala.config.compose import compose_config, run_command
from koala.config.schema import TrainConfig
from koala.devices import pick_device
from koala.models.archs import Arch


@dataclass
class BenchTrainJob(TrainConfig):
    """The schema of configs/bench_train.yaml: the train groups, plus `bench`."""

    bench: BenchTrain = field(default_factory=BenchTrain)


def run(bench: BenchTrain, train_overrides: list[str]) -> dict:
    """Build teacher and student once, then time the measurements of every distill preset, interleaved."""
    device = pick_device(bench.device)
    if device.type == "cpu" and bench.threads > 0:
        torch.set_num_threads(bench.threads)
    cfgs = {p: compose_config("train", [f"distill={p}", *train_overrides], schema=TrainConfig) for p in bench.presets}
    cfg = next(iter(cfgs.values()))
    with tempfile.TemporaryDirectory() as log_dir:
        b = build_bench(bench, cfgs, device, Path(log_dir))
        med, split, peaks = measure(measurements(b), bench, device)
    real_data = any(o.startswith("data") for o in train_overrides)
    data_s = statistics.median(data_seconds(cfg.data, bench.batch, bench.steps)) if real_data else None
    base = med["teacher"] + med["student"]
    return {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "arch": bench.arch, "student": cfg.unet.name, "resolution": bench.resolution, "batch": bench.batch,
        "teacher_dtype": cfg.teacher.dtype, "mixed_precision": cfg.mixed_precision, "steps": bench.steps,
        "warmup": bench.warmup, "compile": cfg.compile, "gradient_checkpointing": cfg.gradient_checkpointing,
        "optimizer": "AdamW8bit" if cfg.optim.use_8bit else "AdamW", "ema": cfg.ema,
        "median_s": med,
        "parts_s": split,
        "overhead": {n: med[f"step/{n}"] / base for n in b.runs},
        # the tapped student's forward + losses + backward beyond the bare student's forward + backward
        "taps_and_feature_losses_s": {n: s["student forward"] + s["losses"] + s["backward"] - med["student"]
                                      for n, s in ((n, split[f"step/{n}"]) for n in b.runs)},
        "pairs": {n: len(r.task.pairs) for n, r in b.runs.items()},
        "data": {"source": cfg.data.kind if real_data else "synthetic (cached-shaped, not part of the step)",
                 "median_s": data_s},
        "peak_memory_gb": peaks or {"process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20},
        "peak_memory_kind": "cuda max allocated per measurement" if peaks else "process peak RSS",
    }  # fmt: skip


def to_markdown(r: dict) -> str:
    """The result as two markdown tables: the overhead ratio per preset, and the step split by part."""
    mem = r["peak_memory_gb"]
    lines = [
        f"Step time, {r['arch']} teacher -> {r['student']}, {r['resolution']} px, batch {r['batch']}, {r['device']} "
        f"({r['threads']} threads), teacher {r['teacher_dtype']}, mixed precision {r['mixed_precision']}, "
        f"{r['optimizer']}, EMA {r['ema']}, compile {r['compile']}, medians of {r['steps']} interleaved after "
        f"{r['warmup']} warm-up",
        "",
        "| measurement | median s | overhead ratio | feature pairs |" + (" peak GiB |" if "teacher" in mem else ""),
        "|---|---|---|---|" + ("---|" if "teacher" in mem else ""),
    ]

    def row(key: str, label: str, ratio: str = "", pairs: str = "") -> str:
        peak = f" {mem[key]:.2f} |" if key in mem else ""
        return f"| {label} | {r['median_s'][key]:.4f} | {ratio} | {pairs} |{peak}"

    lines.append(row("teacher", "teacher forward"))
    lines.append(row("student", "student forward + backward"))
    for n, o in r["overhead"].items():
        lines.append(row(f"step/{n}", f"full step, distill={n}", f"{o:.3f}", str(r["pairs"][n])))
    presets = list(r["overhead"])
    lines += [
        "",
        "Where the step's time goes (median s per part):",
        "",
        "| part | " + " | ".join(f"distill={n}" for n in presets) + " |",
        "|---|" + "---|" * len(presets),
    ]
    for part in PARTS:
        lines.append(f"| {part} | " + " | ".join(f"{r['parts_s'][f'step/{n}'][part]:.4f}" for n in presets) + " |")
    lines.append(
        "| taps + feature losses (tapped fwd + losses + bwd - bare fwd + bwd) | "
        + " | ".join(f"{r['taps_and_feature_losses_s'][n]:+.4f}" for n in presets)
        + " |"
    )
    lines.append("| whole step | " + " | ".join(f"{r['median_s'][f'step/{n}']:.4f}" for n in presets) + " |")
    d = r["data"]
    lines.append(
        "\ndata: "
        + (
            f"{d['source']} loader, median {d['median_s']:.4f} s per batch"
            if d["median_s"] is not None
            else d["source"]
        )
    )
    if "process" in mem:
        lines.append(f"peak memory (process peak RSS): {mem['process']:.2f} GiB")
    return "\n".join(lines)


def bench_train(cfg: BenchTrainJob, argv: list[str]) -> dict:
    """Run the benchmark a composed `bench_train` config (from the command line `argv`) describes; print and write."""
    bench = OmegaConf.to_object(cfg.bench)
    overrides = train_overrides(argv)
    if not any(o.startswith("unet=") for o in overrides):
        overrides.append("unet=koala-700m" if bench.arch == Arch.sdxl else "unet=tiny-700m")
    torch.manual_seed(0)
    result = run(bench, overrides)
    md = to_markdown(result)
    print(md)
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(result, indent=1))
    (out / "train.md").write_text(md + "\n")
    print(f"\nwrote {out / 'train.json'} and {out / 'train.md'}")
    return result


def main(argv: list[str]) -> dict:
    """CLI: compose `configs/bench_train.yaml` with `argv` and run the benchmark."""
    return run_command("bench_train", lambda cfg: bench_train(cfg, argv), argv, schema=BenchTrainJob)
