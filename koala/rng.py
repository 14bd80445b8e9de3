"""Work that must not consume training randomness (checkpoints, sample grids, EMA loading) runs inside
`rng_preserved()`: the global torch RNGs (CPU and every CUDA device) are restored afterwards, so a run is the same
whatever its checkpoint or sampling cadence, and a resume continues exactly."""

from __future__ import annotations

import contextlib

import torch


def rng_preserved() -> contextlib.AbstractContextManager:
    """A context that restores the CPU and CUDA torch RNG states on exit."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)
