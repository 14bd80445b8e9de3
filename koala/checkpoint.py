"""Checkpoints: atomic, rotated, resumable, and written on SIGTERM / SIGINT.

Layout of one checkpoint (complete iff `COMPLETE` exists; the folder is renamed into place only after it is):

    checkpoints/step-00000100/
        accelerate/    optimizer, LR schedule, RNG states (accelerator.save_state; models as safetensors)
        unet/          the student, a diffusers UNet2DConditionModel folder
        unet_ema/      the EMA student (diffusers EMAModel.save_pretrained), when EMA is on
        state.json     {"step": 100, ...}
        COMPLETE
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path
from typing import Any

STEP_DIR = re.compile(r"^step-(\d{8})$")
COMPLETE = "COMPLETE"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first; partial folders are ignored."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_checkpoint(run_dir: str | Path, which: str) -> Path:
    """`latest` or a path (absolute, or relative to the run's checkpoints) -> a complete checkpoint folder."""
    if which == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise FileNotFoundError(f"resume=latest but {Path(run_dir) / 'checkpoints'} holds no complete checkpoint")
        return found[-1]
    for cand in (Path(which), Path(run_dir) / "checkpoints" / which):
        if (cand / COMPLETE).is_file():
            return cand
    have = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
    raise FileNotFoundError(f"no complete checkpoint at {which!r}; complete checkpoints in this run: {have}")


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "state.json").read_text())


def save_checkpoint(accelerator, run_dir: str | Path, step: int, student, ema, state: dict, keep: int) -> Path:
    """Write a checkpoint from every rank (accelerate needs all of them); only the main process publishes it."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))
    if accelerator.is_main_process:
        accelerator.unwrap_model(student).save_pretrained(tmp / "unet")
        if ema is not None:
            ema.save_pretrained(tmp / "unet_ema")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        (tmp / COMPLETE).write_text("")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # atomic on one filesystem: the folder appears complete or not at all
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class StopSignal:
    """Turns SIGTERM / SIGINT into a flag the loop checks at step boundaries (checkpoint, then exit)."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, accelerator) -> bool:
        """True on every rank when any rank was signalled (ranks must checkpoint together)."""
        if accelerator.num_processes == 1:
            return self.requested
        import torch

        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
