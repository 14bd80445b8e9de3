"""`python -m koala.bench memory [bench.unets=[koala-700m]] [bench.resolutions=[512,768,1024]] [bench.budget_gib=24]`.

A GPU memory budget.

Builds the training-memory budget of SDXL -> a student (default KOALA-700M and KOALA-1B) from measured parts:
parameter counts of meta-device models, and the bytes a training step saves for backward, counted exactly by running
`DistillationTask` (teacher, student, taps, losses) on the meta device inside `saved_tensors_hooks`, deduplicated by
storage. The meta run matches a GPU bf16 run in two ways the meta device would not on its own:

- CUDA bf16 autocast is emulated (`Bf16Autocast`): the ops CUDA autocast runs in bf16 (linear, conv, matmuls,
  attention) get bf16 inputs, those it runs in fp32 (norms, softmax) get fp32 inputs, so saved tensors have the
  dtypes a GPU run saves; the bf16 copies of student weights that autocast caches are counted on their own row.
- Attention runs as flash / memory-efficient SDPA does on a GPU (`FlashSDPA`): it saves q, k, v, the output and a
  fp32 logsumexp (B, heads, N), never the (N x N) probabilities of the math path the meta device would take.

Rows are labelled *measured* (exact meta-device counts, exact parameter counts times a dtype's bytes, or
bitsandbytes' 8-bit state layout, which tests/test_bench_memory.py checks against a real AdamW8bit step) or
*estimated* (the transient-peak allowance and the CUDA context).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.overrides import TorchFunctionMode

from koala.config.compose import compose_config, run_command
from koala.config.schema import TrainConfig
from koala.models.forward import random_inputs
from koala.models.teacher import freeze
from koala.models.unets import SDXL_UNET_CONFIG, build_student, build_unet, count_parameters, get_spec, resolve
from koala.train.build import make_task

GiB = 2**30
BF16_OPS = {F.linear, F.conv2d, torch.matmul, torch.bmm, torch.baddbmm, torch.addmm, F.scaled_dot_product_attention}
FP32_OPS = {F.group_norm, F.layer_norm, F.softmax, torch.softmax}
BNB_BLOCK, BNB_MIN_8BIT = 256, 4096  # bitsandbytes blockwise 8-bit optimizer state: block size, smallest 8-bit tensor
CONTEXT_GIB = 1.5  # CUDA context, cuBLAS / attention workspaces, allocator fragmentation (estimated)


@dataclass
class BenchMemory:
    """Settings of `python -m koala.bench memory` (`bench.<key>=...`)."""

    unets: list[str] = field(default_factory=lambda: ["koala-700m", "koala-1b"])
    resolutions: list[int] = field(default_factory=lambda: [512, 768, 1024])
    distill: str = "koala"  # which taps and feature losses the step runs
    budget_gib: float = 24.0  # the card the 24 GB recipe is checked against
    out: str = "outputs/bench/memory"


@dataclass
class BenchMemoryJob:
    """The schema of configs/bench_memory.yaml."""

    bench: BenchMemory = field(default_factory=BenchMemory)


# ---------------------------------------------------------------------------------------------------------------
# Counting what a forward saves for backward, on the meta device
# ---------------------------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views share it)."""
    return t.untyped_storage()._cdata


class SavedBytes:
    """Bytes of distinct storages saved for backward, by category; parameters are never counted."""

    def __init__(self, exclude: Iterator[torch.Tensor] = (), weight_copies: set[int] | None = None):
        self.excluded = {_storage_key(p) for p in exclude}
        self.weight_copies = weight_copies if weight_copies is not None else set()  # storages of cast parameters
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}
        self.largest = 0  # the largest single saved storage

    def add(self, t: torch.Tensor, category: str = "activations") -> None:
        """Count `t`'s storage once, unless it is a parameter's or was counted already."""
        key = _storage_key(t)
        if key in self.excluded or key in self.seen:
            return
        self.seen.add(key)
        n = t.untyped_storage().nbytes()
        self.bytes[category] = self.bytes.get(category, 0) + n
        self.largest = max(self.largest, n)

    @contextmanager
    def hooks(self) -> Iterator[SavedBytes]:
        """Count every tensor autograd saves while active (the tensor itself is kept: nothing is freed on meta)."""

        def pack(t: torch.Tensor) -> torch.Tensor:
            self.add(t, "weight copies" if _storage_key(t) in self.weight_copies else "activations")
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield self

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


class FlashSDPA(torch.autograd.Function):
    """Shape-only SDPA that saves what flash / memory-efficient attention saves: q, k, v, out, fp32 logsumexp."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])  # (B, heads, Nq, Dv)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, heads, Nq)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # never run: the meta step is only counted
        raise RuntimeError("FlashSDPA counts saved tensors on the meta device; it has no backward")


class Bf16Autocast(TorchFunctionMode):
    """CUDA bf16 autocast for meta tensors (autocast ignores them), with attention as GPU SDPA saves it."""

    def __init__(self, enabled: bool = True, weight_copies: set[int] | None = None):
        super().__init__()
        self.enabled = enabled
        self.weight_copies = weight_copies if weight_copies is not None else set()  # filled: storages of cast params
        self.cached_bytes = 0  # what autocast's cache holds: one copy per cast of a trainable parameter

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.enabled and func in BF16_OPS:
            args, kwargs = self.cast(args, torch.bfloat16), self.cast(kwargs, torch.bfloat16)
        elif self.enabled and func in FP32_OPS:
            args, kwargs = self.cast(args, torch.float32), self.cast(kwargs, torch.float32)
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            return FlashSDPA.apply(q, k, v)
        return func(*args, **kwargs)

    def cast(self, x: Any, dtype: torch.dtype) -> Any:
        """Floating tensors in a (nested) argument structure cast to `dtype`; casts of parameters remembered."""
        if isinstance(x, torch.Tensor):
            if not x.is_floating_point() or x.dtype == dtype:
                return x
            y = x.to(dtype)
            if isinstance(x, torch.nn.Parameter) and x.requires_grad:
                self.weight_copies.add(_storage_key(y))
                self.cached_bytes += y.untyped_storage().nbytes()
            return y
        if isinstance(x, (tuple, list)):
            return type(x)(self.cast(v, dtype) for v in x)
        if isinstance(x, dict):
            return {k: self.cast(v, dtype) for k, v in x.items()}
        return x


def counting_checkpoint(outer: SavedBytes, recompute: list[int]) -> Callable:
    """A diffusers `gradient_checkpointing_func` that counts what checkpointing keeps: the block inputs.

    The block itself runs under its own counter (what backward re-creates when it recomputes the block); its
    saved bytes go to `recompute`, not to the step's total, as with `torch.utils.checkpoint`.
    """

    def checkpoint(module: Callable, *args: Any) -> Any:
        for a in args:
            if isinstance(a, torch.Tensor):
                outer.add(a, "checkpoint inputs")
        inner = SavedBytes(exclude=outer_params(module), weight_copies=outer.weight_copies)
        with inner.hooks():
            out = module(*args)
        recompute.append(inner.total)
        return out

    return checkpoint


def outer_params(module: Any) -> Iterator[torch.Tensor]:
    """Parameters of a module (or of the module a bound `__call__` belongs to)."""
    owner = getattr(module, "__self__", module)
    return owner.parameters() if isinstance(owner, torch.nn.Module) else iter(())


# ---------------------------------------------------------------------------------------------------------------
# One measured distillation step
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepBytes:
    """What one meta-device training step of batch 1 holds, in bytes."""

    activations: int  # saved for backward (student activations, feature-loss differences), per sample
    weight_copies: int  # bf16 copies of student weights cached by autocast (until it exits, after the loss)
    teacher_features: int  # teacher tap features held until the feature loss, per sample
    recompute: int  # the largest checkpointed block's saved bytes, re-created in backward (0 without checkpointing)
    largest: int  # the largest single saved tensor


def measure_step(
    student_name: str,
    resolution: int,
    checkpointing: bool,
    distill: str = "koala",
    teacher_config: dict | None = None,
    bf16: bool = True,
) -> StepBytes:
    """Run teacher + student + taps + losses of one batch-1 step on the meta device and count what it holds."""
    t_config = dict(teacher_config or SDXL_UNET_CONFIG)
    spec = get_spec(student_name)
    teacher = freeze(build_unet(t_config, device="meta").to(torch.bfloat16 if bf16 else torch.float32))
    student = build_student(t_config, spec, device="meta").train()
    cfg = compose_config("train", [f"distill={distill}"], schema=TrainConfig)
    task = make_task(cfg, student, teacher, resolve(t_config, spec), latent_size=resolution // 8)
    counter, recompute = SavedBytes(exclude=student.parameters()), []
    if checkpointing:
        student.enable_gradient_checkpointing(counting_checkpoint(counter, recompute))
    x = random_inputs(t_config, resolution, batch=1)
    autocast = Bf16Autocast(enabled=bf16, weight_copies=counter.weight_copies)
    with task, autocast, counter.hooks():
        task(x["noisy"], x["t"], x, x["target"])
        held = SavedBytes()
        for f in task.teacher_taps.features.values():
            held.add(f)
    return StepBytes(
        counter.bytes.get("activations", 0) + counter.bytes.get("checkpoint inputs", 0),
        autocast.cached_bytes,
        held.total,
        max(recompute, default=0),
        counter.largest,
    )


# ---------------------------------------------------------------------------------------------------------------
# The budget
# ---------------------------------------------------------------------------------------------------------------


def conditioning_params() -> dict[str, int]:
    """Parameter counts of SDXL's VAE and two text encoders (meta-device models of their published configs)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        vae = AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512],
            layers_per_block=2,
            latent_channels=4,
        )
        clip_l = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                projection_dim=768,
            )
        )
        big_g = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                projection_dim=1280,
            )
        )
    return {"vae": count_parameters(vae), "text_encoders": count_parameters(clip_l) + count_parameters(big_g)}


def adamw8bit_bytes(student: torch.nn.Module) -> int:
    """bitsandbytes AdamW8bit state: two uint8 states + fp32 absmax per block; tensors under 4096 stay fp32."""
    total = 0
    for p in student.parameters():
        n = p.numel()
        total += 2 * n + 2 * 4 * -(-n // BNB_BLOCK) if n >= BNB_MIN_8BIT else 8 * n
    return total


@dataclass(frozen=True)
class Row:
    """One line of the budget: bytes under the plain recipe (a) and the 24 GB recipe (b), and how it was obtained."""

    item: str
    label: str  # measured | estimated
    plain: float
    lean: float
    per_sample: bool = False  # scales with the batch


def budget_rows(
    student_name: str, resolution: int, cond: dict[str, int], p_teacher: int, distill: str = "koala"
) -> list[Row]:
    """The budget of one student at one resolution, batch 1."""
    student = build_student(SDXL_UNET_CONFIG, get_spec(student_name), device="meta")
    p = count_parameters(student)
    full = measure_step(student_name, resolution, checkpointing=False, distill=distill)
    ckpt = measure_step(student_name, resolution, checkpointing=True, distill=distill)
    transient = (2 * full.largest, ckpt.recompute + 2 * ckpt.largest)
    return [
        Row("teacher U-Net weights (bf16)", "measured", 2 * p_teacher, 2 * p_teacher),
        Row("VAE (fp32) + text encoders (bf16)", "measured", 4 * cond["vae"] + 2 * cond["text_encoders"], 0),
        Row("student weights (fp32)", "measured", 4 * p, 4 * p),
        Row("student gradients (fp32)", "measured", 4 * p, 4 * p),
        Row("optimizer state, AdamW (fp32 moments)", "measured", 8 * p, 0),
        Row("optimizer state, bitsandbytes AdamW8bit", "measured", 0, adamw8bit_bytes(student)),
        Row("EMA (fp32 on GPU (a) / off or offloaded (b))", "measured", 4 * p, 0),
        # Autocast caches every cast weight until it exits (after the loss), checkpointing or not.
        Row("bf16 weight copies cached by autocast", "measured", full.weight_copies, ckpt.weight_copies),
        Row(
            "activations saved for backward (no ckpt (a) / ckpt (b))",
            "measured",
            full.activations,
            ckpt.activations,
            per_sample=True,
        ),
        Row(
            "teacher features held for the loss (bf16)",
            "measured",
            full.teacher_features,
            ckpt.teacher_features,
            per_sample=True,
        ),
        Row("transient: checkpoint recompute + 2 x largest saved tensor", "estimated", *transient, per_sample=True),
        Row("CUDA context, workspaces, fragmentation", "estimated", CONTEXT_GIB * GiB, CONTEXT_GIB * GiB),
    ]


def totals(rows: list[Row], batch: int = 1) -> tuple[float, float]:
    """Total bytes of (a) and (b) at a batch size."""
    k = lambda r: batch if r.per_sample else 1  # noqa: E731
    return sum(r.plain * k(r) for r in rows), sum(r.lean * k(r) for r in rows)


def max_batch(rows: list[Row], budget: float) -> int:
    """The largest batch whose 24 GB-recipe total fits `budget` bytes (0 if not even one)."""
    fixed = sum(r.lean for r in rows if not r.per_sample)
    per = sum(r.lean for r in rows if r.per_sample)
    return max(0, int((budget - fixed) // per))


def gib(n: float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{n / GiB:.2f}"


def unet_table(name: str, resolution: int, rows: list[Row], budget: float) -> str:
    """The markdown budget of one student at one resolution, batch 1."""
    a, b = totals(rows)
    lines = [
        f"SDXL -> {name}, {resolution} px, batch 1 (GiB; per-sample rows scale with the batch)",
        "",
        "| item | how | (a) plain | (b) 24 GB recipe |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r.item}{' (per sample)' if r.per_sample else ''} | {r.label} | {gib(r.plain)} | {gib(r.lean)} |"
        for r in rows
    ]
    lines.append(f"| **total** | | **{gib(a)}** | **{gib(b)}** |")
    lines.append(
        f"\n(b) fits {budget / GiB:.0f} GiB at batch 1: {'yes' if b <= budget else 'no'}; "
        f"largest batch that fits: {max_batch(rows, budget)}"
    )
    return "\n".join(lines)


def summary_table(results: list[dict]) -> str:
    """Totals and the largest fitting batch of every student and resolution."""
    lines = [
        "| student | px | activations/sample, no ckpt | with ckpt | (a) total b=1 | (b) total b=1 | (b) max batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['unet']} | {r['resolution']} | {gib(r['activations_plain'])} | "
            f"{gib(r['activations_ckpt'])} | {gib(r['total_plain'])} | {gib(r['total_lean'])} | "
            f"{r['max_batch_lean']} |"
        )
    return "\n".join(lines)


HEADER = """Training-memory budget (GiB = 2^30 bytes). (a) plain: online conditioning (VAE fp32 + text encoders bf16 on the
GPU), bf16 teacher, fp32 student under bf16 autocast, AdamW fp32, EMA fp32 on the GPU, no gradient checkpointing.
(b) 24 GB recipe: cached conditioning (no VAE / text encoders), bf16 teacher, gradient checkpointing, bitsandbytes
AdamW8bit, EMA off (the trainer keeps EMA on the GPU; it has no offload). Both distil distill={distill}.
measured = exact meta-device counts (parameters x dtype bytes; bytes saved for backward under emulated bf16 autocast
with GPU-style SDPA; AdamW8bit's state layout, checked against bitsandbytes). estimated = the transient allowance
and the CUDA context."""


def bench_memory(cfg: DictConfig) -> list[dict]:
    """Build, print and write the budget a composed `bench_memory` config describes."""
    bench: BenchMemory = OmegaConf.to_object(cfg.bench)
    budget = bench.budget_gib * GiB
    cond = conditioning_params()
    p_teacher = count_parameters(build_unet(SDXL_UNET_CONFIG, device="meta"))
    results, tables = [], []
    for name in bench.unets:
        for res in bench.resolutions:
            rows = budget_rows(name, res, cond, p_teacher, bench.distill)
            a, b = totals(rows)
            act = next(r for r in rows if r.item.startswith("activations"))
            results.append(
                {
                    "unet": name,
                    "resolution": res,
                    "rows": [r.__dict__ for r in rows],
                    "activations_plain": act.plain,
                    "activations_ckpt": act.lean,
                    "total_plain": a,
                    "total_lean": b,
                    "fits_lean_batch1": b <= budget,
                    "max_batch_lean": max_batch(rows, budget),
                }
            )
            if res == max(bench.resolutions):
                tables.append(unet_table(name, res, rows, budget))
    md = "\n\n".join([HEADER.format(distill=bench.distill), *tables, summary_table(results)])
    print(md)
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"budget_gib": bench.budget_gib, "results": results}, indent=1))
    (out / "memory.md").write_text(md + "\n")
    print(f"\nwrote {out / 'memory.json'} and {out / 'memory.md'}")
    return results


def main(argv: list[str]) -> list[dict]:
    """CLI: compose `configs/bench_memory.yaml` with `argv` and build the budget."""
    return run_command("bench_memory", bench_memory, argv, schema=BenchMemoryJob)
