"""Run logs: a JSONL file of every loss term (rank 0), plus accelerate trackers (tensorboard, wandb offline)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from enum import auto
from pathlib import Path

import torch
from tqdm.auto import tqdm

from koala.choice import Choice


class Tracker(Choice):
    """An entry of `report_to`: an accelerate tracker."""

    tensorboard = auto()
    wandb = auto()


def resolve_trackers(report_to: list[str]) -> list[str]:
    """Tracker names for accelerate; wandb runs offline unless an API key is configured (never blocks on the network)."""
    names = [Tracker(name).value for name in report_to]
    if Tracker.wandb in names and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    return names


def flat_hparams(config: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """Nested config -> flat scalars (tensorboard's hparams accept nothing else)."""
    out: dict[str, int | float | str | bool] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class MetricsLog:
    """Averages loss terms between log points and writes them to `metrics.jsonl` and the trackers; `log` decides
    when (every `every` steps and the last) and keeps the progress bar, `last` the newest row written."""

    def __init__(
        self,
        accelerator,
        path: Path,
        every: int = 1,
        extras: Callable[[], dict] | None = None,
        bar: tqdm | None = None,
    ):
        self.accelerator = accelerator
        self.path = path
        self.every, self.extras, self.bar = every, extras, bar  # extras(): what each row adds (lr, skip counts)
        self.last: dict[str, float] = {}
        self.sums: dict[str, torch.Tensor] = {}  # kept on the device: no host sync per step
        self.count = 0
        self.step_sums: dict[str, torch.Tensor] = {}  # once per optimizer step (grad_norm), not per micro-step
        self.steps = 0
        self.images = 0
        self.t0 = time.perf_counter()

    def log(self, step: int, last_step: bool = False, force: bool = False) -> dict[str, float]:
        """Advance the progress bar to a finished `step`; write a row when one is due (or `force`d); the row or {}."""
        if self.bar is not None and self.bar.n < step:
            self.bar.update(step - self.bar.n)
        if not (force or last_step or step % self.every == 0):
            return {}
        row = self.flush(step, self.extras() if self.extras else None)
        if row:
            self.last = row
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{row['loss/total']:.4f}", img_s=f"{row['images_per_s']:.1f}")
        return row

    def close(self) -> None:
        """Close the progress bar."""
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, kind, *exc) -> None:
        """Close the progress bar when an error ends the loop: the error line printed next starts a line of its own
        (tqdm leaves the cursor at the end of the bar)."""
        if kind is not None:
            self.close()

    def add(self, losses: dict[str, torch.Tensor], images: int) -> None:
        for k, v in losses.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1
        self.images += images

    def add_step(self, values: dict[str, torch.Tensor | float]) -> None:
        """Values that exist once per optimizer step and are the same on every rank (the gradient norm)."""
        for k, v in values.items():
            v = torch.as_tensor(v).detach().float()
            self.step_sums[k] = self.step_sums[k] + v if k in self.step_sums else v
        self.steps += 1

    def flush(self, step: int, extra: dict | None = None) -> dict[str, float]:
        """Average over ranks and steps since the last flush; write; return what was written."""
        if not self.count:
            return {}
        keys = sorted(self.sums)
        local = torch.stack([self.sums[k].to(self.accelerator.device) for k in keys]) / self.count
        mean = self.accelerator.reduce(local, reduction="mean") if self.accelerator.num_processes > 1 else local
        elapsed = time.perf_counter() - self.t0
        row = {"step": step, **{f"loss/{k}" if k != "loss" else "loss/total": float(v) for k, v in zip(keys, mean)}}
        row.update({k: float(v) / self.steps for k, v in sorted(self.step_sums.items())})  # already global
        row["images_per_s"] = self.images * self.accelerator.num_processes / max(elapsed, 1e-9)
        row.update(extra or {})
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        self.accelerator.log(row, step=step)
        self.sums, self.count, self.images, self.t0 = {}, 0, 0, time.perf_counter()
        self.step_sums, self.steps = {}, 0
        return row


def write_rank_record(accelerator, run_dir: Path, keys: list[str], model: torch.nn.Module) -> None:
    """Per-rank evidence for multi-process checks: which samples this rank saw and a digest of its weights (whole
    weights as this rank gathers them, when they are sharded; every rank must call it)."""
    import hashlib

    from koala.train.sharding import full_tensor

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(full_tensor(tensor).detach().cpu().contiguous().numpy().tobytes())
    out = run_dir / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "keys": keys,
        "weights_sha256": digest.hexdigest(),
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))
