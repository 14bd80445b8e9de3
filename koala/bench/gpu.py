"""`python -m koala.bench gpu [bench.students=[koala-700m]] [bench.dry_run=true] [key=value ...]`: the GPU report.

On a CUDA device: the SDXL teacher (random weights, bf16) -> KOALA-700M and KOALA-1B at 1024 px, bf16 mixed
precision, SDPA attention, cached conditioning, over a grid of configurations: recipe (plain: `experiment=koala-700m`
/ `koala-1b`; 24gb: `experiment=koala-700m-24gb`), eager vs `torch.compile` (inductor, the trainer's `compile=true`),
gradient checkpointing off / on (the plain recipe; the 24 GB recipe always checkpoints). Each configuration is built
by `koala.bench.step_timing.build_bench` (the trainer's builders) and its step is the trainer's `train_step`, timed by
`koala.bench.step_timing.measure` (warm-up, then the median of timed steps, CUDA synchronised, peak memory reset per step).
It reports samples/s, TFLOP/s and MFU (meta-device FLOP counts, koala/bench/flops.py) and peak memory; a configuration
that runs out of memory is reported as OOM and the grid goes on. Writes <out>/gpu.md and <out>/gpu.json (rewritten
after every configuration, so a cut-short run keeps what it measured).

Without CUDA (`bench.size=auto`) the same code runs at tiny size (tiny teacher, tiny-700m / tiny-1b, 64 px, one timed
step, compile with the aot_eager backend) so CI runs it; the report says those are not GPU numbers.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from koala.bench import train_overrides
from koala.bench.budget import conditioning_params
from koala.bench.flops import StepFlops, train_step_flops
from koala.bench.gpu_report import device_peak, environment, table, to_markdown
from koala.bench.step_timing import BenchTrain, build_bench, measure
from koala.choice import Choice
from koala.config.compose import compose_config, run_command
from koala.config.schema import TrainConfig
from koala.devices import pick_device
from koala.models.archs import ARCHS, Arch
from koala.models.plans import student_plan
from koala.models.unets import build_unet, student_config
from koala.train.step import Trainable, train_step

GiB = 2**30
RECIPES = {"plain": None, "24gb": "koala-700m-24gb"}  # None: the student's own experiment (koala-700m / koala-1b)
TINY_STUDENTS = {"koala-700m": "tiny-700m", "koala-1b": "tiny-1b"}
# What `size` fills in for the settings left unset: full on a GPU, tiny where CI runs
SIZES = {
    "full": {"arch": "sdxl", "resolution": 1024, "warmup": 3, "steps": 5, "compile_backend": "inductor"},
    "tiny": {"arch": "tiny", "resolution": 64, "batch": 1, "warmup": 1, "steps": 1, "compile_backend": "aot_eager"},
}
Recipe = Choice("Recipe", list(RECIPES))  # an entry of bench.recipes: a key of RECIPES
Size = Choice("Size", ["auto", *SIZES])  # bench.size: auto (full on CUDA, else tiny) or a key of SIZES


@dataclass
class BenchGPU:
    """Settings of `python -m koala.bench gpu` (`bench.<key>=...`; other `key=value` go to every configuration)."""

    device: str = "auto"
    size: Size = Size.auto  # full | tiny | auto: full on CUDA, else tiny (tiny teacher, tiny-700m / tiny-1b, 64 px)
    students: list[str] = field(default_factory=lambda: ["koala-700m", "koala-1b"])  # tiny size: tiny-700m / -1b
    recipes: list[Recipe] = field(default_factory=lambda: list(Recipe))
    compile: list[bool] = field(default_factory=lambda: [False, True])
    checkpointing: list[bool] = field(default_factory=lambda: [False, True])  # the plain recipe's axis
    distill: str = "koala"
    arch: Optional[Arch] = None  # teacher U-Net architecture (random weights); None: the size's (sdxl / tiny)
    resolution: Optional[int] = None  # px; None: 1024 / 64
    batch: Optional[int] = None  # per device; None: the recipe's batch_size (full) / 1 (tiny)
    warmup: Optional[int] = None  # steps before timing (compilation happens here); None: 3 / 1
    steps: Optional[int] = None  # timed steps (the median is reported); None: 5 / 1
    compile_backend: Optional[str] = None  # None: inductor (the trainer's compile=true) / aot_eager (tiny)
    peak_tflops: Optional[float] = None  # the device's peak bf16 dense TFLOP/s; None: looked up by device name
    dry_run: bool = False  # print the planned grid and exit
    strict: bool = False  # raise errors other than OOM instead of reporting the row as an error (tests)
    threads: int = 0  # CPU threads (0: torch's default)
    out: str = "outputs/bench/gpu"


@dataclass(frozen=True)
class Case:
    """One configuration of the grid."""

    student: str  # as asked (koala-700m)
    unet: str  # as built (tiny-700m at tiny size)
    recipe: str
    compile: bool
    checkpointing: bool

    def overrides(self, s: BenchGPU, extra: list[str]) -> list[str]:
        """The train overrides of this configuration, then the command line's own."""
        experiment = RECIPES[self.recipe] or ("koala-1b" if self.student == "koala-1b" else "koala-700m")
        inductor = self.compile and s.compile_backend == "inductor"  # the trainer compiles; else the bench does
        return [f"experiment={experiment}", f"unet={self.unet}", f"distill={s.distill}", "teacher.dtype=bf16",
                "mixed_precision=bf16", "grad_accum=1", f"gradient_checkpointing={self.checkpointing}",
                f"compile={inductor}", *extra]  # fmt: skip


def resolve_settings(s: BenchGPU, device: torch.device) -> BenchGPU:
    """Fill the unset settings from the size (auto: full on CUDA, tiny elsewhere)."""
    size = Size(s.size) if s.size != "auto" else Size("full" if device.type == "cuda" else "tiny")
    filled = {k: v for k, v in SIZES[size].items() if getattr(s, k) is None}
    return dataclasses.replace(s, size=size, **filled)


def plan(s: BenchGPU) -> list[Case]:
    """The grid: students x recipes x gradient checkpointing (plain only) x compile, eager first."""
    cases = []
    for student in s.students:
        unet = TINY_STUDENTS.get(student, student) if s.size == "tiny" else student
        for recipe in s.recipes:
            for ckpt in s.checkpointing if recipe == "plain" else [True]:
                cases += [Case(student, unet, recipe, c, ckpt) for c in s.compile]
    return cases


def settings_row(case: Case, cfg: TrainConfig, s: BenchGPU) -> dict[str, Any]:
    """What a configuration runs, as the report's row starts."""
    return {
        "student": case.unet, "recipe": case.recipe, "experiment": cfg.name,
        "compile": s.compile_backend if case.compile else "eager",
        "gradient_checkpointing": cfg.gradient_checkpointing, "optimizer": "AdamW8bit" if cfg.optim.use_8bit else "AdamW",
        "ema": cfg.ema, "batch": s.batch or cfg.batch_size, "resolution": s.resolution,
        "teacher_dtype": cfg.teacher.dtype, "mixed_precision": cfg.mixed_precision,
    }  # fmt: skip


def compiled(run: Trainable, backend: str) -> Trainable:
    """The trainable with its student compiled by a backend other than the trainer's inductor (tiny size: CPU)."""
    student = torch.compile(run.student, backend=backend)
    return dataclasses.replace(run, student=student, task=run.task.running(student))


def time_case(cfg: TrainConfig, case: Case, s: BenchGPU, device: torch.device) -> dict[str, Any]:
    """Build one configuration with the trainer's builders and time its step; median seconds and peak memory."""
    bt = BenchTrain(arch=s.arch, resolution=s.resolution, batch=s.batch or cfg.batch_size, steps=s.steps,
                    warmup=s.warmup, device=str(device), presets=[s.distill])  # fmt: skip
    b = None
    try:
        with tempfile.TemporaryDirectory() as log_dir:
            b = build_bench(bt, {s.distill: cfg}, device, Path(log_dir))
            run = b.runs[s.distill]
            if case.compile and not cfg.compile:
                run = compiled(run, s.compile_backend)

            def step() -> dict[str, float]:
                b.timer.seconds.clear()
                with b.timer("total"):
                    train_step(run, b.cond, b.metrics)  # the trainer's step, untimed inside (no per-part syncs)
                return dict(b.timer.seconds)

            with run.task:  # the taps stay registered over the run, as in koala.train
                run.task.train()
                med, _, peaks = measure({"step": step}, bt, device)
        reserved = torch.cuda.max_memory_reserved(device) / GiB if device.type == "cuda" else None
        return {"step_s": med["step"], "peak_allocated_gib": peaks.get("step"), "peak_reserved_gib": reserved}
    finally:
        if b is not None:
            next(iter(b.runs.values())).accelerator.free_memory()


def is_oom(e: BaseException | None) -> bool:
    """Out of device memory, also when wrapped (e.g. by the compiler) in another exception."""
    while e is not None:
        text = str(e).lower()
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def free(device: torch.device) -> None:
    """Drop what the last configuration left: compiled graphs, garbage, cached device blocks, peak statistics."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_case(
    case: Case, cfg: TrainConfig, s: BenchGPU, device: torch.device, flops: StepFlops, peak: float | None
) -> dict[str, Any]:
    """One row: the settings, then the numbers, or OOM / skipped / error with the reason."""
    row = settings_row(case, cfg, s)
    torch.manual_seed(0)
    try:
        row.update(time_case(cfg, case, s, device), status="ok")
    except Exception as e:  # noqa: BLE001 - one configuration failing must not lose the others' numbers
        status = "oom" if is_oom(e) else "skipped" if isinstance(e, ImportError) else "error"
        if status == "error" and s.strict:
            raise
        if status == "error":
            traceback.print_exc(file=sys.stderr)
        row.update(status=status, message=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}")
    free(device)
    row["flops"] = {**dataclasses.asdict(flops), "model": flops.model, "hardware": flops.hardware}
    if row["status"] == "ok":
        step = row["step_s"]
        row["samples_per_s"] = row["batch"] / step
        row["tflops"], row["tflops_incl_recompute"] = flops.model / step / 1e12, flops.hardware / step / 1e12
        row["mfu"] = row["tflops"] / peak if peak else None
        row["hfu"] = row["tflops_incl_recompute"] / peak if peak else None
    return row


def case_flops(cfg: TrainConfig, s: BenchGPU, batch: int) -> StepFlops:
    """The meta-device FLOP count of one step of this configuration."""
    t_config = dict(ARCHS[s.arch])
    spec = student_plan(t_config, cfg.unet).spec
    return train_step_flops(t_config, student_config(t_config, spec), s.resolution, batch, cfg.gradient_checkpointing)


def attention_processor(s: BenchGPU) -> str:
    """The attention processor the teacher and students run (diffusers' default: AttnProcessor2_0 = SDPA)."""
    names = {type(p).__name__ for p in build_unet(ARCHS[s.arch], device="meta").attn_processors.values()}
    return ", ".join(sorted(n.replace("AttnProcessor2_0", "SDPA (AttnProcessor2_0)") for n in names))


def write(report: dict[str, Any], out: Path) -> str:
    """Write gpu.json and gpu.md; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(report)
    (out / "gpu.json").write_text(json.dumps(report, indent=1))
    (out / "gpu.md").write_text(md + "\n")
    return md


def run(s: BenchGPU, extra: list[str]) -> dict[str, Any]:
    """Measure every configuration of the grid, rewriting the report after each."""
    device = pick_device(s.device)
    s = resolve_settings(s, device)
    if device.type == "cpu" and s.threads > 0:
        torch.set_num_threads(s.threads)
    cases = plan(s)
    env = environment(device)
    peak, source = device_peak(env["device"], s.peak_tflops) if device.type == "cuda" else (None, "CPU: no MFU")
    report = {"settings": dataclasses.asdict(s), "extra_overrides": extra, "environment": env, "peak_tflops": peak,
              "peak_source": source, "attention": attention_processor(s), "rows": []}  # fmt: skip
    if s.arch == "sdxl":  # what the plain recipe's online conditioning adds: VAE fp32 + text encoders bf16
        c = conditioning_params()
        report["online_conditioning_gib"] = (4 * c["vae"] + 2 * c["text_encoders"]) / GiB
    cfgs = [
        compose_config("train", c.overrides(s, extra), schema=TrainConfig) for c in cases
    ]  # every override checked before any work
    if s.dry_run:
        print(f"{len(cases)} configurations on {env['device']} ({s.size} size: {s.arch} teacher, {s.resolution} px, "
              f"{s.warmup} warm-up + {s.steps} timed steps each):")  # fmt: skip
        report["rows"] = [
            {**settings_row(c, cfg, s), "status": "planned", "message": ""} for c, cfg in zip(cases, cfgs)
        ]
        print("\n".join(table(report["rows"])))
        for i, c in enumerate(cases):
            print(f"{i + 1}. {' '.join(c.overrides(s, extra))}")
        return report
    flops: dict[tuple, StepFlops] = {}
    for i, (case, cfg) in enumerate(zip(cases, cfgs)):
        batch = s.batch or cfg.batch_size
        key = (cfg.unet.name, cfg.gradient_checkpointing, batch)
        flops[key] = flops.get(key) or case_flops(cfg, s, batch)
        print(f"[{i + 1}/{len(cases)}] {' '.join(case.overrides(s, extra))}", file=sys.stderr, flush=True)
        report["rows"].append(run_case(case, cfg, s, device, flops[key], peak))
        write(report, Path(s.out))
    return report


@dataclass
class BenchGPUJob(TrainConfig):
    """The schema of configs/bench_gpu.yaml: the train groups (what every configuration's overrides start from),
    plus `bench`."""

    bench: BenchGPU = field(default_factory=BenchGPU)


def bench_gpu(cfg: BenchGPUJob, argv: list[str]) -> dict[str, Any]:
    """Run (or plan) the grid a composed `bench_gpu` config (from the command line `argv`) describes; write the report."""
    s: BenchGPU = OmegaConf.to_object(cfg.bench)
    report = run(s, train_overrides(argv))
    if not s.dry_run:
        print(write(report, Path(s.out)))
        print(f"\nwrote {Path(s.out) / 'gpu.json'} and {Path(s.out) / 'gpu.md'}")
    return report


def main(argv: list[str]) -> dict[str, Any]:
    """CLI: compose `configs/bench_gpu.yaml` with `argv` and run the grid."""
    return run_command("bench_gpu", lambda cfg: bench_gpu(cfg, argv), argv, schema=BenchGPUJob)
