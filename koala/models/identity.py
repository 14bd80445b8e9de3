"""A teacher's identity: a hash of the weight files it is loaded from, recorded with everything made from it.

The files are those a run reads (koala.models.teacher.teacher_weight_files: the U-Net, VAE and both text encoders,
`teacher.unet` and `teacher.vae` in place of the pipeline's own when given; a single-file teacher is also its own part
`pipeline`), and three ways of hashing each file:

- `sha256` (synth's default) hashes every byte (the hash model sites publish per file): it tells a fine-tune from
  its base.
- `header` hashes each safetensors header and file size only: instant at any size; it changes with any change of
  keys, shapes, dtypes or stored metadata, not with new values in the same layout.
- `sampled` (what a checkpoint records to refuse a resume from another teacher) hashes the size, the header and 16
  blocks of 4 KiB spread through the data: cheap at SDXL's size, and two fine-tunes of one architecture differ in it.

File names and paths play no part in a part's hash, so a moved copy is the same teacher.
"""

from __future__ import annotations

import hashlib
from enum import auto
from pathlib import Path
from typing import TYPE_CHECKING, Any

from koala.choice import Choice
from koala.models.teacher import teacher_weight_files

if TYPE_CHECKING:
    from koala.config.schema import TeacherConfig

CHUNK = 8 << 20
SAMPLES, BLOCK = 16, 4096  # `sampled`: blocks read, and their size


class IdentityMode(Choice):
    """`identity`: how a teacher's weight files are hashed."""

    sha256 = auto()  # every byte of every file
    header = auto()  # safetensors header + file size of every file
    sampled = auto()  # file size + safetensors header + 16 blocks spread through the data


def file_hash(path: Path, mode: str = IdentityMode.sha256) -> str:
    """sha256 of a file's bytes, of its size and safetensors header (`header`), or of those and a few data blocks
    spread evenly through it (`sampled`)."""
    digest, mode = hashlib.sha256(), IdentityMode(mode)
    size = path.stat().st_size
    with open(path, "rb") as f:
        if mode is IdentityMode.sha256:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        elif mode is IdentityMode.header:
            n = int.from_bytes(f.read(8), "little")
            digest.update(f"{size}:".encode() + f.read(n))
        else:
            digest.update(str(size).encode())
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            digest.update(head + f.read(min(n, size)))
            start = 8 + n
            for i in range(SAMPLES):
                f.seek(start + (size - start - BLOCK) * i // (SAMPLES - 1) if size - start > BLOCK else start)
                digest.update(f.read(BLOCK))
    return digest.hexdigest()


def teacher_identity(teacher: TeacherConfig | Any, mode: str = IdentityMode.sha256) -> dict[str, Any]:
    """{name, kind, mode, sha256 (of the per-file hashes), files: {part/file: hash}, parts: {part: hash}} of a
    teacher config section. A part's hash is the first 16 hex digits of the sha256 of its files' hashes in order
    ("none" for a part with no files); each file is read once however many parts list it."""
    hashes: dict[Path, str] = {}
    files, parts = {}, {}
    for part, paths in teacher_weight_files(teacher).items():
        digest = hashlib.sha256()
        for path in paths:
            if path not in hashes:
                hashes[path] = file_hash(path, mode)
            files[f"{part}/{path.name}"] = hashes[path]
            digest.update(hashes[path].encode())
        parts[part] = digest.hexdigest()[:16] if paths else "none"
    if not files:
        raise FileNotFoundError(f"no safetensors weight files under {teacher.pipeline} (teacher {teacher.name})")
    combined = hashlib.sha256("\n".join(f"{k} {v}" for k, v in sorted(files.items())).encode()).hexdigest()
    return {"name": teacher.name, "kind": str(teacher.kind), "mode": str(IdentityMode(mode)), "sha256": combined,
            "files": files, "parts": parts}  # fmt: skip


def checkpoint_identity(teacher: TeacherConfig | Any) -> dict[str, str]:
    """{part: hash} of the `sampled` identity: what every checkpoint records of its teacher, so that a resume from
    another teacher (moved or not) is refused."""
    return teacher_identity(teacher, IdentityMode.sampled)["parts"]
