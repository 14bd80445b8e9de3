"""FLOPs of one U-Net forward, counted on the meta device: no weights, no memory, any size.

`torch.utils.flop_counter.FlopCounterMode` counts matmuls, linears and convolutions (2 FLOPs per multiply-add).
On the meta device `scaled_dot_product_attention` runs its math decomposition, so attention's two batched matmuls
(QK^T and AV) are counted as `aten.bmm`; fused SDPA kernels have their own counting rules in the same mode.
Norms, activations and softmax are not counted (they are a small share and memory-bound).

`train_step_flops` counts one distillation step the same way: the teacher forward, and the student forward and
backward (autograd runs on meta too), with gradient checkpointing's recomputation when it is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from koala.models.forward import random_inputs, unet_forward
from koala.models.unets import build_unet


@dataclass(frozen=True)
class FlopCount:
    """Total FLOPs of one forward and their split by aten op."""

    total: int
    by_op: dict[str, int]


def forward_flops(
    config: dict[str, Any], resolution: int, batch: int = 1, vae_scale: int = 8, unet: torch.nn.Module | None = None
) -> FlopCount:
    """FLOPs of one forward of the U-Net `config` describes (or of `unet`, built from it on meta) on meta inputs."""
    unet = (unet if unet is not None else build_unet(config, device="meta")).eval()
    x = random_inputs(config, resolution, batch, vae_scale)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet_forward(unet, x["noisy"], x["t"], x)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return FlopCount(int(counter.get_total_flops()), by_op)


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step of a student distilled from a teacher, counted on the meta device."""

    teacher_forward: int
    student_forward: int
    student_backward: int  # as counted: autograd's backward (no input gradient for the noisy latents)
    recompute: int  # forwards gradient checkpointing reruns in backward (0 without it)

    @property
    def model(self) -> int:
        """The MFU convention: teacher forward + student forward + 2x the student forward for its backward."""
        return self.teacher_forward + 3 * self.student_forward

    @property
    def hardware(self) -> int:
        """What the device computes: `model` plus the recomputed forwards of gradient checkpointing."""
        return self.model + self.recompute


def forward_backward_flops(config: dict[str, Any], resolution: int, batch: int, checkpointing: bool) -> int:
    """FLOPs of a student's forward + backward (recomputation included when `checkpointing`) on meta inputs."""
    unet = build_unet(config, device="meta").train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    x = random_inputs(config, resolution, batch)
    with FlopCounterMode(display=False) as counter:
        unet_forward(unet, x["noisy"], x["t"], x).float().square().mean().backward()
    return int(counter.get_total_flops())


def train_step_flops(
    teacher_config: dict[str, Any], student_config: dict[str, Any], resolution: int, batch: int, checkpointing: bool
) -> StepFlops:
    """Teacher forward, student forward, backward and checkpoint recomputation of one step of `batch` samples."""
    teacher = forward_flops(teacher_config, resolution, batch).total
    student = forward_flops(student_config, resolution, batch).total
    plain = forward_backward_flops(student_config, resolution, batch, checkpointing=False)
    ckpt = forward_backward_flops(student_config, resolution, batch, checkpointing=True) if checkpointing else plain
    return StepFlops(teacher, student, plain - student, ckpt - plain)
