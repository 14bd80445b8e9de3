"""Checkpoints: atomic, rotated, resumable, and written on SIGTERM / SIGINT.

Layout of one checkpoint (complete iff `COMPLETE` exists; the folder is renamed into place only after it is):

    checkpoints/step-00000100/
        accelerate/    optimizer, LR schedule, RNG states (accelerator.save_state; models as safetensors; under FSDP
                       the student and optimizer as torch.distributed.checkpoint shards, one file per rank)
        unet/          the student, a diffusers UNet2DConditionModel folder (whole, also under FSDP)
        unet_ema/      the EMA student (diffusers EMAModel.save_pretrained), when EMA is on (whole)
        state.json     {"step": 100, "format": 2, ...}
        manifest.json  size and sha256 of every file above, written once they are all on disk (fsynced)
        COMPLETE       {"sequence": 7}: the checkpoint's place in the order of writing

A checkpoint is verified before use (`checkpoint_problems`): every file in the manifest present with its recorded
size and hash, json and safetensors files parseable, torch archives (optimizer, RNG states) with an intact zip
directory. A checkpoint of `format` 2 (this version) without its manifest is damaged; one written before manifests
existed (no `format`) gets the readability checks only, with a warning. `find_checkpoint(run, "latest")` falls back
to the newest intact checkpoint with a warning naming what was wrong; a named checkpoint that is damaged raises
`CorruptCheckpoint`.

"Newest" means most recently written: each checkpoint records a write `sequence` (one more than any in the run), so
after a resume from an older checkpoint the new branch's checkpoints rank above the abandoned later steps, for
`latest` and for rotation alike (checkpoints without one rank below, by step). Rotation keeps the `keep` newest,
so it never deletes the one just written (always the newest, and intact: it was just sealed). Weights that are not
finite are never written: `save_checkpoint` checks the student and the EMA first and raises `NonFiniteWeights`.
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
FORMAT = 2  # state.json "format": 2 = sealed with a manifest and numbered by write sequence
TORCH_ARCHIVES = (".bin", ".pkl", ".pt", ".pth")  # torch.save zip archives (accelerate's optimizer, RNG states)

log = logging.getLogger("koala.train.checkpoint")


class CorruptCheckpoint(RuntimeError):
    """A checkpoint whose files are missing, truncated, changed or unreadable."""


class NonFiniteWeights(RuntimeError):
    """Weights holding NaN or inf: never written to a checkpoint, never exported."""


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
    return sorted(found, key=write_order)


def write_order(ckpt: Path) -> tuple[int, int]:
    """(write sequence, step): sorts checkpoints oldest-written first; those without a sequence first, by step.

    The sequence is read from the COMPLETE marker (not state.json, whose damage must not move a checkpoint's rank).
    """
    try:
        sequence = int(json.loads((ckpt / COMPLETE).read_text() or "{}").get("sequence", 0))
    except (OSError, ValueError, TypeError, AttributeError):  # incomplete, or written before sequences: the oldest
        sequence = 0
    return sequence, step_of(ckpt.name)


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

    Files listed in its manifest must be present with the recorded size and sha256; every file must parse. A
    checkpoint of this format without its manifest is damaged; one written before manifests existed gets the
    readability checks only.
    """
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        names = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
        problems = [] if "state.json" in names else ["state.json: missing"]
        problems += [p for p in (_unreadable(ckpt, n) for n in names) if p]
        if not problems and _format(ckpt) >= FORMAT:
            problems = [f"{MANIFEST}: missing (this checkpoint was written with one; its files cannot be verified)"]
        elif not problems:
            log.warning(
                "%s has no %s (written before koala kept one): only checked that its files parse", ckpt, MANIFEST
            )
        return problems
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


def seal_checkpoint(folder: Path, sequence: int = 0) -> None:
    """Record every file's size and sha256 in the manifest, flush all to disk, then write COMPLETE (flushed too) with
    the checkpoint's write `sequence`."""
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
    (folder / COMPLETE).write_text(json.dumps({"sequence": sequence}))
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


def _format(ckpt: Path) -> int:
    """The checkpoint format its state.json records (0: written before formats were recorded, or unreadable)."""
    try:
        return int(read_state(ckpt).get("format", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0


def next_sequence(run_dir: str | Path) -> int:
    """The write sequence of the next checkpoint: one more than any checkpoint folder of the run holds."""
    return 1 + max((write_order(p)[0] for p in list_checkpoints(run_dir, complete_only=False)), default=0)


def check_finite(accelerator, step: int, student, ema) -> None:
    """Raise NonFiniteWeights (on every rank) when the student or its EMA holds NaN or inf: one flag per model,
    reduced over the ranks (each checks its own shards)."""
    import torch

    from koala.train.sharding import all_finite

    models = {"student": list(student.parameters())}
    if ema is not None:
        models["EMA"] = list(ema.shadow_params)
    flags = torch.tensor([0.0 if all_finite(ts) else 1.0 for ts in models.values()], device=accelerator.device)
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    bad = [name for name, flag in zip(models, flags.tolist()) if flag]
    if bad:
        raise NonFiniteWeights(
            f"step {step}: the {' and '.join(bad)} weights hold NaN or inf (the run diverged); no checkpoint was "
            "written. Resume from the last finite checkpoint with a lower optim.lr, or start again"
        )


def save_checkpoint(accelerator, run_dir: str | Path, step: int, student, ema, state: dict, keep: int) -> Path:
    """Write a checkpoint from every rank (accelerate and FSDP's gathers need all of them); only the main process
    publishes it. Weights that are not finite raise NonFiniteWeights before anything is written."""
    from koala.train.sharding import gathered_ema, plain_student

    check_finite(accelerator, step, student, ema)
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        sequence, state = next_sequence(run_dir), {**state, "format": FORMAT}
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"))  # under FSDP: every rank writes its own shards
    accelerator.wait_for_everyone()  # every rank's RNG state is on disk before the main process seals the folder
    unet, full_ema = plain_student(accelerator, student), gathered_ema(accelerator, ema)  # whole, on the main process
    if accelerator.is_main_process:
        unet.save_pretrained(tmp / "unet")
        if full_ema is not None:
            full_ema.save_pretrained(tmp / "unet_ema")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        seal_checkpoint(tmp, sequence)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)  # atomic on one filesystem: the folder appears complete or not at all
        _fsync(final.parent)  # the rename itself survives a power cut
        rotate(run_dir, final, keep)
    accelerator.wait_for_everyone()
    return final


def rotate(run_dir: str | Path, written: Path, keep: int) -> None:
    """Delete all but the `keep` most recently written complete checkpoints (0: keep all); never `written`."""
    if keep <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        if old != written:
            shutil.rmtree(old, ignore_errors=True)


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
