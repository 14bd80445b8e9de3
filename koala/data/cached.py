"""Cached samples: VAE latents, text embeddings and time ids as safetensors (never pickle), one blob per sample.

A cache is a folder of tar shards whose members are `<key>.safetensors`, plus `empty_prompt.safetensors` (the
embeddings of "" for caption dropout), one `info-<rank>.json` per writing rank and, written last, the completeness
marker `cache.json` (the shard list, sample and skip counts, the settings). `check_cache` refuses a cache without
the marker (a `koala.cache` that was stopped) and shards the marker does not list (left by an earlier cache).

Each blob holds the tensors `latents` (4, h, w) (already times the VAE scaling factor), `prompt_embeds` (77, D),
`pooled_prompt_embeds` (P,), `time_ids` (6,), and in its metadata the source key, caption, original size, crop and
flip used. `time_ids` are stored in fp32 whatever the cache's
storage precision (fp16 rounds sizes above 2048).
"""

from __future__ import annotations

import json
import random
import re
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from koala.data.records import Raw

TENSORS = ("latents", "prompt_embeds", "pooled_prompt_embeds", "time_ids")
EMPTY_PROMPT = "empty_prompt.safetensors"
MARKER = "cache.json"  # written last: the cache is complete
# Every name koala.cache writes in a cache folder: what `cache.overwrite=true` may delete (nothing else).
WRITTEN = re.compile(r"(\d{3}-\d{5}\.tar(\.tmp)?|info-\d{3}\.json|empty_prompt\.safetensors|cache\.json(\.tmp)?)")


class IncompleteCache(ValueError):
    """A cache folder without its completeness marker, or holding shards the marker does not list."""


def check_cache(path: str) -> None:
    """Raise IncompleteCache unless every shard `path` names lies in a complete cache that lists it; when `path` is
    a cache folder, every shard the cache lists must be there too."""
    from koala.data.shards import expand_shards

    shards = [Path(s) for s in expand_shards(path)]
    for folder in sorted({s.parent for s in shards}):
        marker = folder / MARKER
        if not marker.is_file():
            raise IncompleteCache(
                f"{folder} holds no {MARKER}: the cache is incomplete (`python -m koala.cache` or `koala.synth` was "
                "stopped before it finished) or was not written by either; write it again (koala.cache: "
                "cache.overwrite=true replaces it) or resume koala.synth with the same settings"
            )
        listed = set(json.loads(marker.read_text())["shards"])
        stray = sorted(s.name for s in shards if s.parent == folder and s.name not in listed)
        if stray:
            raise IncompleteCache(
                f"{folder} holds shards its cache did not write ({', '.join(stray[:3])}"
                f"{' ...' if len(stray) > 3 else ''}): left by an earlier cache or another program; remove them"
            )
        missing = sorted(listed - {s.name for s in shards}) if Path(path).is_dir() else []
        if missing:
            raise IncompleteCache(f"{folder} lacks shards its {MARKER} lists: {', '.join(missing[:3])}")


def encode_sample(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """One cached sample as safetensors bytes (tensors made contiguous; meta as JSON in the header)."""
    return save({k: tensors[k].contiguous() for k in TENSORS}, metadata={"koala": json.dumps(meta)})


def decode_meta(payload: bytes) -> dict[str, Any]:
    """The metadata of a cached sample, read from the safetensors header only."""
    return json.loads(_header(payload).get("__metadata__", {}).get("koala", "{}"))


def _header(payload: bytes) -> dict:
    """The JSON header of a safetensors blob (8-byte little-endian length, then JSON)."""
    (n,) = struct.unpack("<Q", payload[:8])
    return json.loads(payload[8 : 8 + n])


class CachedCodec:
    """Reads cached blobs into the cached batch format; caption dropout marks samples `dropped` for the conditioner."""

    def __init__(self, caption_dropout: float = 0.0) -> None:
        self.caption_dropout = caption_dropout

    def probe(self, raw: Raw) -> tuple[str | None, Any]:
        """Group by latent shape (read from the header): mixed bucket sizes never share a batch."""
        try:
            return None, tuple(_header(raw.payload)["latents"]["shape"])
        except Exception:
            return "corrupt_image", None

    def decode(self, raw: Raw, shape: Any, rng: random.Random) -> dict:
        """Load one cached sample's tensors (as float32); its key is the source's, recorded in the metadata."""
        tensors = {k: v.float() for k, v in load(raw.payload).items()}
        dropped = self.caption_dropout > 0 and rng.random() < self.caption_dropout
        return {"key": decode_meta(raw.payload).get("key", raw.key), "dropped": dropped, **tensors}

    @staticmethod
    def collate(samples: list[dict]) -> dict:
        """Stack cached samples into a cached batch."""
        batch: dict[str, Any] = {k: torch.stack([s[k] for s in samples]) for k in TENSORS}
        batch["dropped"] = torch.tensor([s["dropped"] for s in samples], dtype=torch.bool)
        batch["keys"] = [s["key"] for s in samples]
        return batch


def cached_raw(sample: dict) -> Raw:
    """A webdataset sample of a cache shard -> raw record."""
    return Raw(key=sample["__key__"], payload=sample.get("safetensors"))


def recorded_conditioning_dtype(path: str | Path) -> str | None:
    """The precision the cache at `path` was encoded in (`conditioning_dtype` in its info files: koala.cache's
    `info-<rank>.json`, koala.synth's `info.json`; None when they record none: a cache written before koala recorded
    it, or not a local folder). Raises ValueError when the info files disagree (a folder holding two caches)."""
    folder = Path(str(path))
    if not folder.is_dir():
        return None
    infos = [*sorted(folder.glob("info-*.json")), *folder.glob("info.json")]
    found = {json.loads(p.read_text()).get("conditioning_dtype") for p in infos}
    found.discard(None)
    if len(found) > 1:
        raise ValueError(f"the cache {folder} mixes conditioning precisions {sorted(found)} (its info files)")
    return found.pop() if found else None
