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
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

COMPLETE = "COMPLETE"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path, complete_only: bool = True) -> list[Path]:
    """Checkpoint folders of a run, oldest first; only those with a COMPLETE marker unless asked otherwise."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")]
    if complete_only:
        found = [p for p in found if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: step_of(p.name))


def step_of(name: str) -> int:
    """The step number in a `step-00000100` folder name (-1 when it has none)."""
    try:
        return int(name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _describe_checkpoints(run_dir: Path) -> str:
    """What checkpoint folders exist, marking the incomplete ones."""
    every = list_checkpoints(run_dir, complete_only=False)
    if not every:
        return f"no checkpoint folders under {Path(run_dir) / 'checkpoints'}"
    names = [p.name + ("" if (p / COMPLETE).is_file() else " (incomplete: no COMPLETE file)") for p in every]
    return "checkpoints present: " + ", ".join(names)


def find_checkpoint(run_dir: str | Path, checkpoint: str | int = "latest") -> Path:
    """Resolve `latest`, a step number, a folder name or a path to a COMPLETE checkpoint folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir {run_dir} does not exist")
    if str(checkpoint) == "latest":
        complete = list_checkpoints(run_dir)
        if not complete:
            raise FileNotFoundError(f"run dir {run_dir} has no complete checkpoint; {_describe_checkpoints(run_dir)}")
        return complete[-1]
    name = f"step-{int(checkpoint):08d}" if str(checkpoint).isdigit() else str(checkpoint)
    path = Path(name) if Path(name).is_dir() else run_dir / "checkpoints" / name
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint!r} not found in {run_dir}; {_describe_checkpoints(run_dir)}")
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete (no {COMPLETE} file); {_describe_checkpoints(run_dir)}")
    return path


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
        if self.requested:  # a second signal: the user wants out now, checkpoint or not
            sys.stderr.write(f"\n{signal.Signals(signum).name} again: exiting without a checkpoint\n")
            raise SystemExit(128 + signum)
        self.requested = True
        sys.stderr.write(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                         "(send it again to exit at once)\n")

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
