"""A teacher's identity: a hash of the weight files it is loaded from, recorded with everything made from it.

`sha256` (the default) hashes every byte of every weight file (the hash model sites publish per file): it tells a
fine-tune from its base. `header` hashes each safetensors header and file size only: instant at any size, and it
changes with any change of keys, shapes, dtypes or stored metadata, but not with new values in the same layout
(a fine-tune of the same architecture keeps its base's headers).

The weight files are the safetensors files of the pipeline's text encoders, VAE and U-Net, with `teacher.unet` and
`teacher.vae` in place of the pipeline's own when given; in a component folder the files `from_pretrained` reads by
default (no `.fp16`-style variant) are used, or the variants when there is nothing else.
"""

from __future__ import annotations

import hashlib
import struct
from enum import auto
from pathlib import Path
from typing import TYPE_CHECKING, Any

from koala.choice import Choice

if TYPE_CHECKING:
    from koala.config.schema import TeacherConfig

COMPONENTS = ("text_encoder", "text_encoder_2", "vae", "unet")  # the SDXL pipeline parts holding weights
CHUNK = 8 << 20


class IdentityMode(Choice):
    """`identity`: how a teacher's weight files are hashed."""

    sha256 = auto()  # every byte of every file
    header = auto()  # safetensors header + file size of every file


def component_files(path: Path) -> list[Path]:
    """The safetensors weight files of a component: the file itself, or a folder's default (non-variant) files."""
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors"))
    plain = [f for f in files if f.name.count(".") == 1]  # `model.safetensors`, `x-00001-of-00002.safetensors`
    return plain or files


def weight_files(teacher: TeacherConfig) -> dict[str, list[Path]]:
    """Component -> the weight files a `teacher` config section loads (`pipeline`, `unet`, `vae`)."""
    root = Path(teacher.pipeline)
    if root.is_file():  # one checkpoint file holding every part
        parts = {"pipeline": root}
    else:
        parts = {name: root / name for name in COMPONENTS}
    if teacher.unet:
        parts["unet"] = Path(teacher.unet)
    if teacher.vae:
        parts["vae"] = Path(teacher.vae)
    files = {name: component_files(path) for name, path in parts.items() if path.exists()}
    if not any(files.values()):
        raise FileNotFoundError(f"no safetensors weight files under {root} (teacher {teacher.name})")
    return files


def file_hash(path: Path, mode: str = IdentityMode.sha256) -> str:
    """sha256 of a file's bytes, or (`header`) of its size and safetensors header."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if IdentityMode(mode) is IdentityMode.header:
            (n,) = struct.unpack("<Q", f.read(8))
            digest.update(f"{path.stat().st_size}:".encode() + f.read(n))
        else:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def teacher_identity(teacher: TeacherConfig, mode: str = IdentityMode.sha256) -> dict[str, Any]:
    """{name, kind, mode, sha256 (of the per-file hashes), files: {component/file: hash}} of a teacher config."""
    files = {
        f"{name}/{path.name}": file_hash(path, mode) for name, paths in weight_files(teacher).items() for path in paths
    }
    combined = hashlib.sha256("\n".join(f"{k} {v}" for k, v in sorted(files.items())).encode()).hexdigest()
    return {"name": teacher.name, "kind": str(teacher.kind), "mode": str(mode), "sha256": combined, "files": files}
