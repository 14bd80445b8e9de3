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

import dataclasses
import json
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from omegaconf import DictConfig, OmegaConf

from koala.bench import train_overrides
from koala.config.compose import compose_config, run_command
from koala.config.schema import TrainConfig
from koala.data import build_dataloader
from koala.devices import DTYPES, pick_device
from koala.distill.losses import mse
from koala.models.forward import COND_KEYS, random_inputs, unet_forward
from koala.models.teacher import freeze
from koala.models.unets import ARCHS, SDXL_SCHEDULER_CONFIG, Arch, build_unet
from koala.timing import PartTimer
from koala.train.build import build_trainable, make_accelerator, make_noising, make_task
from koala.train.step import Trainable, train_step
from koala.train.tracking import MetricsLog

# The parts of one step, in the order it runs them (koala.train.step and DistillationTask.forward name them)
PARTS = ("noise", "teacher forward", "student forward", "losses", "backward", "clip", "optimizer", "ema", "logging")


@dataclass
class BenchTrain:
    """Settings of `python -m koala.bench train` (given as `bench.<key>=...`; the rest are train overrides)."""

    arch: Arch = Arch.medium  # tiny | medium | sdxl: the teacher architecture, random weights
    resolution: int = 256  # image size; latents are resolution / 8
    batch: int = 2
    steps: int = 10
    warmup: int = 3
    device: str = "auto"
    presets: list[str] = field(default_factory=lambda: ["koala", "lf", "out"])
    threads: int = 0  # CPU threads (0: torch's default); 1 on a shared machine, where a preempted OpenMP thread
    # stalls every parallel op (measured 10-25x slower steps at 2 threads on 2 busy cores)
    out: str = "outputs/bench/train"


@dataclass
class BenchTrainJob(TrainConfig):
    """The schema of configs/bench_train.yaml: the train groups, plus `bench`."""

    bench: BenchTrain = field(default_factory=BenchTrain)


@dataclass
class Bench:
    """What the measurements run: one trainable per preset (sharing the student), the batch, the timer."""

    runs: dict[str, Trainable]
    x: dict[str, torch.Tensor]  # random inputs: noisy, t, target and the conditioning keys
    cond: dict[str, torch.Tensor]  # what the data path hands the step: latents + conditioning
    metrics: MetricsLog
    timer: PartTimer


def data_seconds(data_cfg: Any, batch: int, n: int) -> list[float]:
    """Seconds to fetch each of `n` batches from the configured loader (after its first batch)."""
    it = iter(build_dataloader(data_cfg, batch_size=batch, seed=0))
    next(it)  # workers start, files open
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - t0)
    return times


def build_bench(bench: BenchTrain, cfgs: dict, device: torch.device, log_dir: Path) -> Bench:
    """A random teacher of `bench.arch`, then the student and its parts exactly as koala.train builds them."""
    cfg = next(iter(cfgs.values()))
    t_config = dict(ARCHS[bench.arch])
    teacher = freeze(build_unet(t_config, device=device))  # "stored" fp32: the student inherits, then it is cast
    accelerator = make_accelerator(cfg)
    noising = make_noising(cfg, DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG))
    latent = bench.resolution // 8
    first = build_trainable(cfg, accelerator, teacher, noising, latent)
    teacher.to(device, DTYPES[cfg.teacher.dtype])
    bare = accelerator.unwrap_model(first.student)
    runs = {}
    for name, c in cfgs.items():  # every preset drives the same student, optimizer and EMA with its own taps
        runs[name] = dataclasses.replace(
            first, task=make_task(c, bare, teacher, first.plan, latent).running(first.student)
        )
    x = random_inputs(
        t_config, bench.resolution, bench.batch, device=device, generator=torch.Generator().manual_seed(0)
    )
    cond = {"latents": x["noisy"], **{k: x[k] for k in COND_KEYS}}
    return Bench(runs, x, cond, MetricsLog(accelerator, log_dir / "metrics.jsonl"), PartTimer(device))


def measurements(b: Bench) -> dict[str, Callable[[], dict[str, float]]]:
    """Closures for every timed measurement (teacher, student, step/<preset>), each returning its parts' seconds."""
    run, x = next(iter(b.runs.values())), b.x

    def parts(fn: Callable[[], None]) -> dict[str, float]:
        b.timer.seconds.clear()
        fn()
        return dict(b.timer.seconds)

    def teacher_only() -> None:
        with b.timer("total"):
            run.task.teacher_forward(x["noisy"], x["t"], b.cond)

    def student_only() -> None:  # the bare student: no taps entered, one MSE
        with b.timer("total"):
            with run.accelerator.autocast():
                loss = mse(unet_forward(run.student, x["noisy"], x["t"], b.cond), x["target"])
            run.accelerator.backward(loss)
            run.optimizer.zero_grad(set_to_none=True)

    def full_step(r: Trainable) -> Callable[[], None]:
        def fn() -> None:
            with r.task:  # hooks of this preset only (every preset shares one student)
                with b.timer("total"):
                    train_step(r, b.cond, b.metrics, b.timer)

        return fn

    fns = {"teacher": teacher_only, "student": student_only, **{f"step/{n}": full_step(r) for n, r in b.runs.items()}}
    return {k: (lambda fn=fn: parts(fn)) for k, fn in fns.items()}


def measure(fns: dict[str, Callable[[], dict[str, float]]], bench: BenchTrain, device: torch.device):
    """Median seconds per measurement and per part, interleaved round by round, and CUDA peak memory (GiB)."""
    times: dict[str, list[dict[str, float]]] = {k: [] for k in fns}
    peaks: dict[str, float] = {}
    for i in range(bench.warmup + bench.steps):
        for k, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = fn()
            if i >= bench.warmup:
                times[k].append(seconds)
            if device.type == "cuda":
                peaks[k] = max(peaks.get(k, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
    med = {k: statistics.median(r["total"] for r in v) for k, v in times.items()}
    split = {
        k: {p: statistics.median(r.get(p, 0.0) for r in v) for p in PARTS}
        for k, v in times.items()
        if k.startswith("step/")
    }
    return med, split, peaks


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


def bench_train(cfg: DictConfig, argv: list[str]) -> dict:
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
