"""Named parts of a step, timed: `no_timer` in training (nothing measured), `PartTimer` in `koala.bench train`."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import torch

Timer = Callable[[str], AbstractContextManager]


def no_timer(part: str) -> AbstractContextManager:
    """Times nothing (the training loop's timer)."""
    return contextlib.nullcontext()


class PartTimer:
    """Adds the wall seconds of each named part (queued GPU work included) to `seconds[part]`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        """Wait for queued GPU work so wall time covers it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[part] += time.perf_counter() - t0
