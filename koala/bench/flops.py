"""FLOPs of one U-Net forward, counted on the meta device: no weights, no memory, any size.

`torch.utils.flop_counter.FlopCounterMode` counts matmuls, linears and convolutions (2 FLOPs per multiply-add).
On the meta device `scaled_dot_product_attention` runs its math decomposition, so attention's two batched matmuls
(QK^T and AV) are counted as `aten.bmm`; fused SDPA kernels have their own counting rules in the same mode.
Norms, activations and softmax are not counted (they are a small share and memory-bound).
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
