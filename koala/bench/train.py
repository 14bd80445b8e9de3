"""`python -m koala.bench train [bench.arch=medium] [bench.batch=2] [unet=tiny-700m] [bench.presets=[koala,lf,out]]`

Measures, as medians over interleaved repetitions after warm-up, in one run:
  teacher  - the teacher forward alone (inference mode, teacher dtype)
  student  - the student forward + backward alone (bare: no taps, no KD losses)
  step     - the full training step of each distill preset (taps, all losses, clip, optimizer, EMA)
and prints the overhead ratio = step / (teacher + student), the unavoidable work. Teacher weights are random
(built from the built-in arch config), conditioning is random like a cached batch, so no files are needed.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from omegaconf import OmegaConf

from koala.build import DTYPES
from koala.distill.pairing import pair_taps
from koala.distill.task import DistillationTask, LossWeights
from koala.hydra_utils import compose_config
from koala.inherit import inherit_weights
from koala.specs import student_spec
from koala.unets import ARCHS, build_student, build_unet, resolve


@dataclass
class BenchTrain:
    arch: str = "medium"  # tiny | medium | sdxl: the teacher architecture, random weights
    resolution: int = 256  # image size; latents are resolution / 8
    batch: int = 2
    steps: int = 10
    warmup: int = 3
    device: str = "auto"
    presets: list[str] = field(default_factory=lambda: ["koala", "lf", "out"])
    gradient_checkpointing: bool = False
    out: str = "outputs/bench/train"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
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


def run(bench: BenchTrain, train_overrides: list[str]) -> dict:
    """Build teacher and student once, then time the three measurements per distill preset, interleaved."""
    device = torch.device("cuda" if bench.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if bench.device == "auto" else bench.device))
    cfgs = {p: compose_config("train", [f"distill={p}", *train_overrides]) for p in bench.presets}
    cfg = next(iter(cfgs.values()))
    t_config = dict(ARCHS[bench.arch])
    teacher = build_unet(t_config).to(device, DTYPES[cfg.teacher.dtype]).eval().requires_grad_(False)
    spec = student_spec(cfg.unet)
    plan = resolve(t_config, spec)
    student = build_student(t_config, spec).to(device)
    inherit_weights(student, teacher, plan)
    student.float().train()
    if bench.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    ema = EMAModel(student.parameters(), model_cls=UNet2DConditionModel, model_config=student.config)
    ema.to(device)
    x = random_batch(t_config, bench.batch, bench.resolution // 8, device)
    cond = {k: x[k] for k in ("prompt_embeds", "pooled_prompt_embeds", "time_ids")}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")

    tasks = {}
    for name, c in cfgs.items():
        pairs = pair_taps(plan, c.distill, student, teacher)
        w = LossWeights(c.distill.task_weight, c.distill.out_weight, c.distill.feat_weight)
        tasks[name] = DistillationTask(student, teacher, pairs, w, c.distill.loss, c.distill.sa_point)

    def teacher_only():
        tasks[bench.presets[0]].teacher_forward(x["noisy"], x["t"], cond)

    def student_only():
        with autocast:
            out = student(x["noisy"], x["t"], encoder_hidden_states=cond["prompt_embeds"],
                          added_cond_kwargs={"text_embeds": cond["pooled_prompt_embeds"], "time_ids": cond["time_ids"]})
        (out.sample.float() - x["target"]).pow(2).mean().backward()
        student.zero_grad(set_to_none=True)

    def full_step(task):
        def fn():
            with task:
                with autocast:
                    losses = task(x["noisy"], x["t"], cond, x["target"])
                losses["loss"].backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                ema.step(student.parameters())
        return fn

    times: dict[str, list[float]] = {"teacher": [], "student": [], **{f"step/{n}": [] for n in tasks}}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(bench.warmup + bench.steps):
        sample = {"teacher": _timed(teacher_only, device), "student": _timed(student_only, device)}
        for n, task in tasks.items():
            sample[f"step/{n}"] = _timed(full_step(task), device)
        if i >= bench.warmup:
            for k, v in sample.items():
                times[k].append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["teacher"] + med["student"]
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "arch": bench.arch, "student": spec.name, "resolution": bench.resolution, "batch": bench.batch,
        "teacher_dtype": cfg.teacher.dtype, "mixed_precision": cfg.mixed_precision, "steps": bench.steps,
        "median_s": med,
        "overhead": {n: med[f"step/{n}"] / base for n in tasks},
        "pairs": {n: len(t.pairs) for n, t in tasks.items()},
        "peak_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20),
        "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS",
    }
    return result


def to_markdown(r: dict) -> str:
    """The result as a markdown table."""
    lines = [
        f"Step time, {r['arch']} teacher -> {r['student']}, {r['resolution']} px, batch {r['batch']}, "
        f"{r['device']}, teacher {r['teacher_dtype']}, medians of {r['steps']}",
        "",
        "| measurement | median s | overhead ratio | feature pairs |",
        "|---|---|---|---|",
        f"| teacher forward | {r['median_s']['teacher']:.4f} | | |",
        f"| student forward + backward | {r['median_s']['student']:.4f} | | |",
    ]
    for n, o in r["overhead"].items():
        lines.append(f"| full step, distill={n} | {r['median_s'][f'step/{n}']:.4f} | {o:.3f} | {r['pairs'][n]} |")
    lines.append(f"\npeak memory ({r['peak_memory_kind']}): {r['peak_memory_gb']:.2f} GiB")
    return "\n".join(lines)


def main(overrides: list[str]) -> None:
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
