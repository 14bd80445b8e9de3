"""Advisory file locks (`fcntl.flock`) that name their holder and die with it.

A lock file holds the pid, host and start time of the process that locked it. The kernel releases a flock when the
holder's last descriptor closes, so a process that was killed never leaves a lock that blocks: a lock file whose
lock can be taken is stale, whatever it says. The run folder's lock (koala.train.runs) and the export's staging
folders (koala.export) use it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


class LockHeld(RuntimeError):
    """Another live process holds the lock; `holder` is what its lock file says about it."""

    def __init__(self, path: Path, holder: dict) -> None:
        self.path, self.holder = path, holder
        super().__init__(f"{path} is locked by {describe_holder(holder)}")


def describe_holder(holder: dict) -> str:
    """`pid 123 on host h (since 2024-01-01 12:00:00)` from a lock file's record."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {since})"


def read_holder(path: Path) -> dict:
    """What a lock file records about its holder (empty when unreadable: it may be being written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class FileLock:
    """An exclusive, non-blocking flock on `path` (created if missing) for as long as it is held.

    `acquire()` raises LockHeld naming the holder when another live process has it; `release()` unlinks the file
    (when asked) and drops the lock. Usable as a context manager.
    """

    def __init__(self, path: str | os.PathLike, unlink: bool = False) -> None:
        self.path, self.unlink, self.fd = Path(path), unlink, None

    def acquire(self) -> FileLock:
        """Take the lock or raise LockHeld; record this process as the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(self.path, read_holder(self.path)) from None
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (unlinking the file first when asked, while it is still held)."""
        if self.fd is None:
            return
        if self.unlink:
            self.path.unlink(missing_ok=True)
        fcntl.flock(self.fd, fcntl.LOCK_UN)  # explicitly: forked children (data workers) share the descriptor
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_stale(path: Path) -> bool:
    """Whether the lock file at `path` is held by no live process (its holder died or finished)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False  # removed by its holder as it finished
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True
