"""Run folders: what a fresh start and a resume require, and the run's config history.

- A fresh start (no `resume`) into a folder that already holds checkpoints is refused: it would mix two runs.
- `resume=latest|<step>|<folder>` continues a checkpoint whose saved config defines the same run: only the keys in
  `MAY_CHANGE` may differ (paths may move, cadences and the length may change, `optim.lr` is applied); anything else
  is refused with the list of differences, before any model is loaded. `resume=auto` resumes when a complete
  checkpoint exists and starts fresh otherwise (for jobs that are requeued after preemption).
- `config.yaml` is the config of the current (last started) session; each earlier one is kept as `config.<n>.yaml`.
- One process per run folder: the launch's rank 0 holds `<output_dir>/.lock` (koala.locks: pid, host, start time)
  for the whole run, so a second launch on the same folder (a requeued `resume=auto` job started twice) is refused
  at once, naming the holder. The kernel drops the lock when its holder dies: a killed run never blocks the next.
- A resume checks the teacher: each checkpoint records `teacher_identity` (koala.models.identity), and a different
  teacher behind the same or a moved path is refused before any model loads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from koala.errors import ConfigError
from koala.locks import FileLock, LockHeld, describe_holder
from koala.train.checkpoint import CorruptCheckpoint, find_checkpoint, list_checkpoints, read_state

if TYPE_CHECKING:
    from koala.config.schema import TrainConfig

log = logging.getLogger("koala.train.runs")

# Settings a resumed run may change. Paths may point to moved copies of the same files (a warning says so).
MAY_CHANGE = (
    "max_steps", "log_every", "checkpoint_every", "keep_checkpoints", "sample_every", "sample_prompts",
    "sample_seed", "report_to", "resume", "compile", "record_ranks", "gradient_checkpointing", "optim.lr",
    "dist_timeout_s", "data.num_workers", "teacher.pipeline", "teacher.unet", "teacher.vae", "teacher.config", "data.path",
    "output_dir", "max_nonfinite_steps", "data.max_consecutive_skips",
)  # fmt: skip
MOVED_PATHS = ("teacher.pipeline", "teacher.unet", "teacher.vae", "teacher.config", "data.path")
LOCK = ".lock"  # in the run folder; never deleted (deleting a lock file others may have opened would split it)


@contextlib.contextmanager
def run_folder_lock(output_dir: str) -> Iterator[None]:
    """Hold `<output_dir>/.lock` while the body runs (the launch's rank 0 does, for every rank); raise ConfigError
    naming the holder when another live process has it. A folder made only for the lock goes again on refusal."""
    if os.environ.get("RANK", "0") != "0":  # another rank of the same launch: its rank 0 holds the lock for it
        yield
        return
    run_dir = Path(output_dir)
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / LOCK)
    try:
        lock.acquire()
    except LockHeld as e:
        raise ConfigError(
            f"output_dir={output_dir!r} is in use by another koala process: {describe_holder(e.holder)} holds "
            f"{e.path}; wait for it to finish or stop it (a stopped process's lock does not block)"
        ) from None
    try:
        yield
    except BaseException:
        if made and [p.name for p in run_dir.iterdir()] == [LOCK]:  # refused before it wrote anything
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        lock.release()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {dotted.key: leaf}; an empty dict is a leaf."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """{key: (saved, current)} for every setting that differs."""
    a, b = flatten(saved), flatten(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint this run continues (None: a fresh start), checked against the config; raises ConfigError."""
    run_dir = Path(cfg.output_dir)
    if not cfg.resume:
        if list_checkpoints(run_dir, complete_only=False):
            raise ConfigError(
                f"output_dir={str(run_dir)!r} already holds checkpoints of a run; continue it with resume=latest, or "
                "start a new run in a fresh output_dir"
            )
        return None
    if cfg.resume == "auto" and not list_checkpoints(run_dir):
        return None
    try:
        ckpt = find_checkpoint(run_dir, "latest" if cfg.resume == "auto" else cfg.resume)
    except (FileNotFoundError, CorruptCheckpoint) as e:
        raise ConfigError(f"resume={cfg.resume}: {e}") from e
    check_resumable(ckpt, cfg)
    return ckpt


def check_teacher(ckpt: Path, state: dict, cfg: TrainConfig) -> None:
    """Refuse a resume whose teacher files are not those the checkpoint was trained from (moved or not)."""
    from koala.models.identity import checkpoint_identity

    saved = state.get("teacher_identity")
    if saved is None:
        log.warning("%s does not record its teacher (written by an older koala): the teacher is not checked", ckpt)
        return
    current = checkpoint_identity(cfg.teacher)
    differ = [part for part in sorted(set(saved) | set(current)) if saved.get(part) != current.get(part)]
    if differ:
        raise ConfigError(
            f"resume={cfg.resume}: the teacher is not the one {ckpt} was trained from: its {', '.join(differ)} weights "
            f"differ (teacher.pipeline={cfg.teacher.pipeline!r}, teacher.unet={cfg.teacher.unet!r}, teacher.vae="
            f"{cfg.teacher.vae!r}); point them at that teacher, or start a new run in a fresh output_dir"
        )


def check_resumable(ckpt: Path, cfg: TrainConfig) -> None:
    """Refuse a resume whose config changes what defines the run, or whose teacher is another; warn about moved
    paths."""
    state = read_state(ckpt)
    check_teacher(ckpt, state, cfg)
    saved = state.get("config")
    if saved is None:
        log.warning("%s holds no config (written by an older koala): the resumed settings are not checked", ckpt)
        return
    current = OmegaConf.to_container(cfg, resolve=True)
    changes = config_changes(saved, current)
    refused = {k: v for k, v in changes.items() if not any(k == m or k.startswith(m + ".") for m in MAY_CHANGE)}
    if refused:
        lines = [f"  {k}: {old!r} -> {new!r}" for k, (old, new) in refused.items()]
        raise ConfigError(
            f"resume={cfg.resume}: the config differs from the one that wrote {ckpt} in settings that define the "
            "run:\n" + "\n".join(lines) + f"\nOnly these may change on resume: {', '.join(MAY_CHANGE)}. "
            "Start a new run (a fresh output_dir) to change the others."
        )
    for key in MOVED_PATHS:
        if key in changes:
            log.warning("resume: %s moved from %r to %r; assuming the same contents", key, *changes[key])


def record_config(run_dir: Path, cfg: TrainConfig) -> None:
    """Write `config.yaml`; an earlier, different one is kept as `config.<n>.yaml` (never silently rewritten)."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    path = run_dir / "config.yaml"
    if path.exists() and path.read_text() != text:
        n = 1
        while (run_dir / f"config.{n}.yaml").exists():
            n += 1
        kept = path.rename(run_dir / f"config.{n}.yaml")
        changes = config_changes(
            OmegaConf.to_container(OmegaConf.load(kept)), OmegaConf.to_container(cfg, resolve=True)
        )
        log.info(
            "config changed (%s); the previous one is kept as %s",
            ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()),
            kept.name,
        )
    path.write_text(text)


def trim_metrics(path: Path, step: int) -> None:
    """Drop rows logged after `step` (a resume repeats them); a fresh start keeps an old log as `<name>.<n>`."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if json.loads(r).get("step", 0) <= step]
    if len(kept) != len(rows):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(r + "\n" for r in kept))
        tmp.replace(path)


def keep_old_metrics(path: Path) -> None:
    """Move the metrics of an earlier session without checkpoints aside before a fresh start."""
    if path.exists() and path.stat().st_size:
        n = 1
        while path.with_name(f"{path.name}.{n}").exists():
            n += 1
        path.rename(path.with_name(f"{path.name}.{n}"))
