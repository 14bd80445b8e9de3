"""Devices and precisions by name: `pick_device` (`auto` / null: cuda when available) and the config's dtype names."""

from __future__ import annotations

import os
from enum import auto

import torch

from koala.choice import Choice

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DType = Choice("DType", list(DTYPES))  # teacher.dtype, cache.dtype, ...: a key of DTYPES


class MixedPrecision(Choice):
    """accelerate's `mixed_precision`: autocast of the student's forward."""

    no = auto()
    fp16 = auto()
    bf16 = auto()


def pick_device(name: str | None = "auto") -> torch.device:
    """The named device; `auto` (or null): cuda when available, else cpu."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def multi_cpu() -> bool:
    """Several processes and no GPU: accelerate picks gloo (MULTI_CPU) only when told `cpu=True`."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`bf16` / `fp16` / `fp32` (or a torch.dtype) -> torch.dtype, naming the valid choices otherwise."""
    return dtype if isinstance(dtype, torch.dtype) else DTYPES[DType(dtype)]
