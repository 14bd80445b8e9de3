"""The training-memory budget of SDXL -> a student: one row per item, under the plain recipe (a) and the 24 GB
recipe (b), from parameter counts of meta-device models and the step's saved bytes (koala.bench.saved_bytes).

Rows are labelled *measured* (exact meta-device counts, exact parameter counts times a dtype's bytes, or
bitsandbytes' 8-bit state layout, which tests/test_bench_memory.py checks against a real AdamW8bit step) or
*estimated* (the transient-peak allowance and the CUDA context).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from koala.bench.saved_bytes import measure_step
from koala.models.archs import SDXL_UNET_CONFIG
from koala.models.specs import get_spec
from koala.models.unets import build_student, count_parameters

GiB = 2**30


BNB_BLOCK, BNB_MIN_8BIT = 256, 4096  # bitsandbytes blockwise 8-bit optimizer state: block size, smallest 8-bit tensor


CONTEXT_GIB = 1.5  # CUDA context, cuBLAS / attention workspaces, allocator fragmentation (estimated)


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
