"""Timing the trainer's own step (for `koala.bench train` and `koala.bench gpu`).

`build_bench` builds a random teacher of the bench's architecture and the student, task, optimizer and EMA exactly
as koala.train builds them (koala.train.build); `measurements` gives closures for the teacher forward alone, the
bare student forward + backward and the full `train_step` of each distill preset; `measure` runs them interleaved
(warm-up, then the median of timed repetitions, CUDA synchronised, peak memory reset per measurement).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import DDPMScheduler

from koala.data import build_dataloader
from koala.devices import DTYPES
from koala.distill.losses import mse
from koala.models.archs import ARCHS, SDXL_SCHEDULER_CONFIG, Arch
from koala.models.forward import COND_KEYS, random_inputs, unet_forward
from koala.models.plans import student_plan
from koala.models.teacher import freeze
from koala.models.unets import build_unet
from koala.timing import PartTimer
from koala.train.build import build_trainable, make_accelerator, make_noising, make_task
from koala.train.step import Trainable, train_step
from koala.train.tracking import MetricsLog

if TYPE_CHECKING:
    from koala.config.schema import DataConfig

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
class Bench:
    """What the measurements run: one trainable per preset (sharing the student), the batch, the timer."""

    runs: dict[str, Trainable]
    x: dict[str, torch.Tensor]  # random inputs: noisy, t, target and the conditioning keys
    cond: dict[str, torch.Tensor]  # what the data path hands the step: latents + conditioning
    metrics: MetricsLog
    timer: PartTimer


def data_seconds(data_cfg: DataConfig, batch: int, n: int) -> list[float]:
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
    first = build_trainable(cfg, accelerator, teacher, noising, student_plan(t_config, cfg.unet), latent)
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
