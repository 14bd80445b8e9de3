"""Raw records: one undecoded sample as a source yields it, and the skip reasons a reader counts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

SKIP_REASONS = ("corrupt_image", "unsupported_image", "missing_caption", "too_small", "bad_shard")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Raw:
    """An undecoded sample: encoded image bytes and caption(s), or the bytes of a cached safetensors sample."""

    key: str
    image: bytes | None = None
    caption: Any = None  # str, a list of str (one is drawn per use), or None
    payload: bytes | None = None  # cached samples
    meta: dict = field(default_factory=dict)


class UnsupportedImage(ValueError):
    """An image that decodes but whose pixel values koala cannot map to 8-bit RGB faithfully (the message says why)."""


class UnreadableSource(Exception):
    """A shard or file that cannot be opened or read to its end."""


def lookup(obj: Any, path: list[str]) -> Any:
    """obj[path[0]][path[1]]...; None when any step is missing."""
    for part in path:
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def clean_caption(value: Any) -> Any:
    """A non-empty stripped str, a list of them, or None."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (list, tuple)):
        values = [c for c in (clean_caption(v) for v in value) if isinstance(c, str)]
        return values or None
    return None


def caption_from_sample(sample: dict[str, Any], caption_key: str) -> Any:
    """Caption of a webdataset sample: `txt` (any extension) or `json.<field>[.<field>...]` inside that member."""
    ext, *path = caption_key.split(".")
    value = sample.get(ext)
    if value is None:
        return None
    if path:
        try:
            value = lookup(json.loads(value), path)
        except (ValueError, UnicodeDecodeError):
            return None
    return clean_caption(value)


def image_from_sample(sample: dict[str, Any], image_key: str) -> bytes | None:
    """The encoded image of a webdataset sample: `image_key` when present, else the first known image extension."""
    for ext in (image_key, *IMAGE_EXTENSIONS):
        if sample.get(ext) is not None:
            return sample[ext]
    return None
