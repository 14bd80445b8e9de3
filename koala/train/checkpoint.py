"""Checkpoints: atomic, rotated, resumable, and written on SIGTERM / SIGINT.

Layout of one checkpoint (complete iff `COMPLETE` exists; the folder is renamed into place only after it is):

    checkpoints/step-00000100/
        accelerate/    optimizer, LR schedule, RNG states (accelerator.save_state; models as safetensors; under FSDP
                       the student and optimizer as torch.distributed.checkpoint shards, one file per rank)
        unet/          the student, a diffusers UNet2DConditionModel folder (whole, also under FSDP)
        unet_ema/      the EMA student (diffusers EMAModel.save_pretrained), when EMA is on (whole)
        state.json     {"step": 100, ...}
        manifest.json  size and sha256 of every file above, written once they are all on disk (fsynced)
        COMPLETE

A checkpoint is verified before use (`checkpoint_problems`): every file in the manifest present with its recorded
size and hash, json and safetensors files parseable, torch archives (optimizer, RNG states) with an intact zip
directory. `find_checkpoint(run, "latest")` falls back to the newest intact checkpoint with a warning naming what
was wrong; a named checkpoint that is damaged raises `CorruptCheckpoint`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from koala.rng import rng_preserved

COMPLETE = "COMPLETE"
MANIFEST = "manifest.json"
TORCH_ARCHIVES = (".bin", ".pkl", ".pt", ".pth")  # torch.save zip archives (accelerate's optimizer, RNG states)

log = logging.getLogger("koala.train.checkpoint")


class CorruptCheckpoint(RuntimeError):
    """A checkpoint whose files are missing, truncated, changed or unreadable."""


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


def find_checkpoint(run_dir: str | Path, checkpoint: str | int = "latest", verify: bool = True) -> Path:
    """Resolve `latest`, a step number, a folder name or a path to a COMPLETE (and, unless told, intact) checkpoint.

    `latest` is the newest intact one: damaged newer ones are passed over with a warning naming what is wrong.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run dir {run_dir} does not exist")
    if str(checkpoint) == "latest":
        complete = list_checkpoints(run_dir)
        if not complete:
            raise FileNotFoundError(f"run dir {run_dir} has no complete checkpoint; {_describe_checkpoints(run_dir)}")
        return _newest_intact(complete) if verify else complete[-1]
    name = f"step-{int(checkpoint):08d}" if str(checkpoint).isdigit() else str(checkpoint)
    path = Path(name) if Path(name).is_dir() else run_dir / "checkpoints" / name
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint!r} not found in {run_dir}; {_describe_checkpoints(run_dir)}")
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(
            f"checkpoint {path} is incomplete (no {COMPLETE} file); {_describe_checkpoints(run_dir)}"
        )
    if verify:
        verify_checkpoint(path)
    return path


def _newest_intact(complete: list[Path]) -> Path:
    """The newest checkpoint without problems; warns about each damaged newer one passed over."""
    damaged: list[str] = []
    for ckpt in reversed(complete):
        problems = checkpoint_problems(ckpt)
        if not problems:
            for what in damaged:
                log.warning("passing over damaged checkpoint %s; using %s instead", what, ckpt.name)
            return ckpt
        damaged.append(f"{ckpt} ({'; '.join(problems)})")
    raise CorruptCheckpoint(f"no intact checkpoint: {'; '.join(damaged)}")


def verify_checkpoint(ckpt: str | Path) -> None:
    """Raise CorruptCheckpoint naming every damaged file of `ckpt` (see checkpoint_problems)."""
    problems = checkpoint_problems(Path(ckpt))
    if problems:
        raise CorruptCheckpoint(
            f"checkpoint {ckpt} is damaged: {'; '.join(problems)}; name another one, or `latest` (which passes "
            f"over damaged ones)"
        )


def checkpoint_problems(ckpt: Path) -> list[str]:
    """What is wrong with a checkpoint, one `file: problem` each (empty when intact).

    Files listed in its manifest must be present with the recorded size and sha256; every file must parse.
    Checkpoints written before manifests existed get the readability checks only.
    """
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        names = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
        problems = [] if "state.json" in names else ["state.json: missing"]
        return problems + [p for p in (_unreadable(ckpt, n) for n in names) if p]
    try:
        recorded = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return [f"{MANIFEST}: unreadable ({exc})"]
    with ThreadPoolExecutor(max_workers=4) as pool:  # hashing releases the GIL: large files in parallel
        found = list(pool.map(lambda item: _file_problem(ckpt, *item), sorted(recorded.items())))
    return [p for p in found if p]


def _file_problem(ckpt: Path, name: str, entry: dict) -> str | None:
    """The problem of one manifest entry (missing, wrong size, wrong hash, unreadable), or None."""
    path = ckpt / name
    if not path.is_file():
        return f"{name}: missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{name}: {size} bytes, {entry['size']} recorded (truncated or overwritten)"
    if _sha256(path) != entry["sha256"]:
        return f"{name}: sha256 differs from the one recorded (changed since it was written)"
    return _unreadable(ckpt, name)


def _unreadable(ckpt: Path, name: str) -> str | None:
    """`name: unreadable (...)` when a json, safetensors or torch archive file does not parse, else None."""
    path = ckpt / name
    try:
        if name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:  # parses the header; checks the data covers the file exactly
                f.keys()
        elif name.endswith(TORCH_ARCHIVES):
            with zipfile.ZipFile(path) as archive:  # the central directory sits at the end: truncation breaks it
                archive.infolist()
    except Exception as exc:
        return f"{name}: unreadable ({type(exc).__name__}: {exc})"
    return None


def _sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal_checkpoint(folder: Path) -> None:
    """Record every file's size and sha256 in the manifest, flush all to disk, then write COMPLETE (flushed too)."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    names = [n for n in names if n not in (MANIFEST, COMPLETE)]

    def record(name: str) -> dict:
        _fsync(folder / name)
        return {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}

    with ThreadPoolExecutor(max_workers=4) as pool:
        files = dict(zip(names, pool.map(record, names)))
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    _fsync(folder / MANIFEST)
    for sub in sorted({p for p in folder.rglob("*") if p.is_dir()}, reverse=True):
        _fsync(sub)
    _fsync(folder)
    (folder / COMPLETE).write_text("")
    _fsync(folder / COMPLETE)
    _fsync(folder)


def write_json_atomic(path: Path, data: Any) -> Path:
    """Write `data` as json under a temporary name, flush it to disk, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    _fsync(tmp)
    tmp.replace(path)
    return path


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "state.json").read_text())


def save_checkpoint(accelerator, run_dir: str | Path, step: int, student, ema, state: dict, keep: int) -> Path:
    """Write a checkpoint from every rank (accelerate and FSDP's gathers need all of them); only the main process
    publishes it."""
    from koala.train.sharding import gathered_ema, plain_student

    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))  # under FSDP: every rank writes its own shards
    accelerator.wait_for_everyone()  # every rank's RNG state is on disk before the main process seals the folder
    unet, full_ema = plain_student(accelerator, student), gathered_ema(accelerator, ema)  # whole, on the main process
    if accelerator.is_main_process:
        unet.save_pretrained(tmp / "unet")
        if full_ema is not None:
            full_ema.save_pretrained(tmp / "unet_ema")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        seal_checkpoint(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # atomic on one filesystem: the folder appears complete or not at all
        _fsync(final.parent)  # the rename itself survives a power cut
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


class Checkpointer:
    """Writes the run's checkpoints and decides when: every `every` steps and at the last step (`save`), or now
    (`force`: a stop request, data that ran out). Randomness is untouched (EMA's save builds a random model)."""

    def __init__(self, accelerator, run_dir: Path, student, ema, every: int, keep: int, state: Callable[[int], dict],
                 step: int) -> None:  # fmt: skip
        self.accelerator, self.run_dir, self.student, self.ema = accelerator, run_dir, student, ema
        self.every, self.keep, self.state = every, keep, state  # state(step): what state.json records beside it
        self.saved = step  # the step of the newest checkpoint (where the run started: it is on disk already)

    def save(self, step: int, last_step: bool = False, force: bool = False) -> Path | None:
        """Write a checkpoint of `step` when one is due (or `force`d) and not written yet; its folder, or None."""
        if step == self.saved or not (force or last_step or step % self.every == 0):
            return None
        with rng_preserved():
            path = save_checkpoint(self.accelerator, self.run_dir, step, self.student, self.ema, self.state(step),
                                   keep=self.keep)  # fmt: skip
        self.saved = step
        return path


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
        sys.stderr.write(
            f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
            "(send it again to exit at once)\n"
        )

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
