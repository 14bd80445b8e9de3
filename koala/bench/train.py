"""`python -m koala.bench train [bench.arch=medium] [bench.batch=2] [unet=tiny-700m] [bench.presets=[koala,lf,out]]`

Measures, as medians over interleaved repetitions after warm-up, in one run:
  teacher  - the teacher forward alone (inference mode, teacher dtype)
  student  - the student forward + backward alone (bare: no taps, no KD losses)
  step     - the full training step of each distill preset (taps, all losses, clip, optimizer, EMA), built the
             way `koala.train` builds it (`make_optimizer`, diffusers `EMAModel`)
and prints the overhead ratio = step / (teacher + student), the unavoidable work. Teacher weights are random
(built from the built-in arch config) and the conditioning is synthetic with a cached batch's shapes, so no files
are needed and data time is not part of the step; give a loader (`data=cached data.path=...`) to time it too.
On a GPU: `bench.arch=sdxl bench.resolution=1024 mixed_precision=bf16 teacher.dtype=bf16` (KOALA-700M; add
`unet=koala-1b` for KOALA-1B).
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from omegaconf import OmegaConf

from koala.config.compose import compose_config
from koala.data import build_dataloader
from koala.devices import DTYPES, pick_device
from koala.distill.pairing import pair_taps
from koala.distill.task import DistillationTask, LossWeights
from koala.models.inherit import inherit_weights
from koala.models.specs import student_spec
from koala.models.unets import ARCHS, build_student, build_unet, resolve
from koala.train.build import make_optimizer


@dataclass
class BenchTrain:
    """Settings of `python -m koala.bench train` (given as `bench.<key>=...`; the rest are train overrides)."""

    arch: str = "medium"  # tiny | medium | sdxl: the teacher architecture, random weights
    resolution: int = 256  # image size; latents are resolution / 8
    batch: int = 2
    steps: int = 10
    warmup: int = 3
    device: str = "auto"
    presets: list[str] = field(default_factory=lambda: ["koala", "lf", "out"])
    compile: bool = False  # torch.compile student and teacher (as `compile=true` does in koala.train)
    threads: int = 0  # CPU threads (0: torch's default); 1 on a shared machine, where a preempted OpenMP thread
    # stalls every parallel op (measured 10-25x slower steps at 2 threads on 2 busy cores)
    out: str = "outputs/bench/train"


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call of `fn`, GPU work included."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def random_batch(config: dict, batch: int, latent: int, device, seed: int = 0) -> dict:
    """A cached-conditioning-shaped batch for this U-Net config."""
    g = torch.Generator().manual_seed(seed)
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    x = {
        "noisy": torch.randn(batch, 4, latent, latent, generator=g),
        "t": torch.randint(0, 1000, (batch,), generator=g),
        "prompt_embeds": torch.randn(batch, 77, config["cross_attention_dim"], generator=g),
        "pooled_prompt_embeds": torch.randn(batch, pooled, generator=g),
        "time_ids": torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * batch, dtype=torch.float),
        "target": torch.randn(batch, 4, latent, latent, generator=g),
    }
    return {k: v.to(device) for k, v in x.items()}


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


def build_models(bench: BenchTrain, cfg: Any, device: torch.device):
    """Random teacher of `bench.arch` in its dtype (frozen, eval) and the student inherited from it (fp32, train)."""
    t_config = dict(ARCHS[bench.arch])
    teacher = build_unet(t_config, device=device).to(DTYPES[cfg.teacher.dtype]).eval().requires_grad_(False)
    spec = student_spec(cfg.unet)
    plan = resolve(t_config, spec)
    student = build_student(t_config, spec, device=device)
    inherit_weights(student, teacher, plan)
    student.float().train().requires_grad_(True)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return t_config, teacher, student, plan


def step_functions(bench: BenchTrain, cfgs: dict, device: torch.device) -> tuple[dict[str, Callable], dict]:
    """Closures for every timed measurement (teacher, student, step/<preset>) and the pair count per preset."""
    cfg = next(iter(cfgs.values()))
    t_config, teacher, student, plan = build_models(bench, cfg, device)
    opt = make_optimizer(cfg.optim, student.parameters())  # as koala.train builds it (fused AdamW)
    ema = None
    if cfg.ema:
        ema = EMAModel(student.parameters(), decay=cfg.ema_decay, model_cls=UNet2DConditionModel,
                       model_config=student.config, foreach=True)
        ema.to(device)
    x = random_batch(t_config, bench.batch, bench.resolution // 8, device)
    cond = {k: x[k] for k in ("prompt_embeds", "pooled_prompt_embeds", "time_ids")}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    if bench.compile:  # each preset adds and removes its own hooks: guard on them so each gets its own graph
        torch._dynamo.config.skip_nnmodule_hook_guards = False
    run_student = torch.compile(student) if bench.compile else student
    run_teacher = torch.compile(teacher) if bench.compile else teacher
    tasks = {}
    for name, c in cfgs.items():
        pairs = pair_taps(plan, c.distill, student, teacher)
        w = LossWeights(c.distill.task_weight, c.distill.out_weight, c.distill.feat_weight)
        tasks[name] = DistillationTask(run_student, run_teacher, pairs, w, c.distill.loss, c.distill.sa_point)

    def teacher_only() -> None:
        tasks[bench.presets[0]].teacher_forward(x["noisy"], x["t"], cond)

    def student_only() -> None:
        with autocast:
            out = run_student(x["noisy"], x["t"], encoder_hidden_states=cond["prompt_embeds"],
                              added_cond_kwargs={"text_embeds": cond["pooled_prompt_embeds"],
                                                 "time_ids": cond["time_ids"]})
        (out.sample.float() - x["target"]).pow(2).mean().backward()
        student.zero_grad(set_to_none=True)

    def full_step(task: DistillationTask) -> Callable[[], None]:
        def fn() -> None:
            with task:  # hooks of this preset only (every preset shares one student)
                with autocast:
                    losses = task(x["noisy"], x["t"], cond, x["target"])
                losses["loss"].backward()
                if cfg.optim.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.step(student.parameters())

        return fn

    fns = {"teacher": teacher_only, "student": student_only, **{f"step/{n}": full_step(t) for n, t in tasks.items()}}
    return fns, {n: len(t.pairs) for n, t in tasks.items()}


def measure(fns: dict[str, Callable], bench: BenchTrain, device: torch.device) -> tuple[dict, dict]:
    """Median seconds per measurement, interleaved round by round, and the CUDA peak memory (GiB) of each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    peaks: dict[str, float] = {}
    for i in range(bench.warmup + bench.steps):
        for k, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = _timed(fn, device)
            if i >= bench.warmup:
                times[k].append(seconds)
            if device.type == "cuda":
                peaks[k] = max(peaks.get(k, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
    return {k: statistics.median(v) for k, v in times.items()}, peaks


def run(bench: BenchTrain, train_overrides: list[str]) -> dict:
    """Build teacher and student once, then time the three measurements per distill preset, interleaved."""
    device = pick_device(bench.device)
    if device.type == "cpu" and bench.threads > 0:
        torch.set_num_threads(bench.threads)
    cfgs = {p: compose_config("train", [f"distill={p}", *train_overrides]) for p in bench.presets}
    cfg = next(iter(cfgs.values()))
    fns, pairs = step_functions(bench, cfgs, device)
    med, peaks = measure(fns, bench, device)
    real_data = any(o.startswith("data") for o in train_overrides)
    data_s = statistics.median(data_seconds(cfg.data, bench.batch, bench.steps)) if real_data else None
    base = med["teacher"] + med["student"]
    return {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "arch": bench.arch, "student": cfg.unet.name, "resolution": bench.resolution, "batch": bench.batch,
        "teacher_dtype": cfg.teacher.dtype, "mixed_precision": cfg.mixed_precision, "steps": bench.steps,
        "warmup": bench.warmup, "compile": bench.compile, "gradient_checkpointing": cfg.gradient_checkpointing,
        "optimizer": "AdamW8bit" if cfg.optim.use_8bit else "AdamW", "ema": cfg.ema,
        "median_s": med,
        "overhead": {n: med[f"step/{n}"] / base for n in pairs},
        "pairs": pairs,
        "data": {"source": cfg.data.kind if real_data else "synthetic (cached-shaped, not part of the step)",
                 "median_s": data_s},
        "peak_memory_gb": peaks or {"process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20},
        "peak_memory_kind": "cuda max allocated per measurement" if peaks else "process peak RSS",
    }


def to_markdown(r: dict) -> str:
    """The result as a markdown table."""
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
    d = r["data"]
    lines.append("\ndata: " + (f"{d['source']} loader, median {d['median_s']:.4f} s per batch" if d["median_s"]
                               is not None else d["source"]))
    if "process" in mem:
        lines.append(f"peak memory (process peak RSS): {mem['process']:.2f} GiB")
    return "\n".join(lines)


def main(overrides: list[str]) -> dict:
    bench_args = [o.removeprefix("bench.") for o in overrides if o.startswith("bench.")]
    bench = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchTrain), OmegaConf.from_dotlist(bench_args)))
    train_overrides = [o for o in overrides if not o.startswith("bench.")]
    if not any(o.startswith("unet=") for o in train_overrides):
        train_overrides.append("unet=koala-700m" if bench.arch == "sdxl" else "unet=tiny-700m")
    torch.manual_seed(0)
    result = run(bench, train_overrides)
    md = to_markdown(result)
    print(md)
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(result, indent=1))
    (out / "train.md").write_text(md + "\n")
    print(f"\nwrote {out / 'train.json'} and {out / 'train.md'}")
    return result
