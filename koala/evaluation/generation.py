"""Generation for evaluation, split across processes: rank r of w draws prompts r, r + w, r + 2w, ... (disjoint
shares whose union is the list), prompt i always with seed `seed + i` (so the split never changes an image), one PNG
per prompt written atomically; a prompt whose PNG exists is skipped, so an interrupted run resumes. Each PNG carries
its prompt, seed and sampling settings as text chunks: an existing image made from anything else is an error, never
silently reused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from koala.evaluation.registry import Sample
from koala.ship.sampling import generate


def share(n: int, rank: int, world: int) -> list[int]:
    """Prompt indices of one rank."""
    return list(range(rank, n, world))


def image_name(index: int) -> str:
    """File name of prompt `index`'s image."""
    return f"{index:05d}.png"


def _png_text(prompt: str, seed: int, settings: str) -> PngInfo:
    """The text chunks an evaluation image carries."""
    info = PngInfo()
    for key, value in (("prompt", prompt), ("seed", str(seed)), ("settings", settings)):
        info.add_itxt(key, value)
    return info


def _check_existing(path: Path, prompt: str, seed: int, settings: str) -> None:
    """An existing image must have been sampled from this prompt, seed and settings."""
    with Image.open(path) as img:
        text = dict(getattr(img, "text", {}))
    made = (text.get("prompt"), text.get("seed"), text.get("settings"))
    if made != (prompt, str(seed), settings):
        raise ValueError(
            f"{path} was sampled from prompt={made[0]!r} seed={made[1]} settings={made[2]}, not "
            f"prompt={prompt!r} seed={seed} settings={settings}; remove the folder or choose another out="
        )


def generate_share(
    pipe: Any,
    prompts: Sequence[str],
    indices: Sequence[int],
    out: Path,
    preset: str,
    seed: int,
    batch_size: int = 1,
    model: str = "",
    **sampling: Any,
) -> dict[str, list[int]]:
    """Sample the missing images of `indices` into `out`; returns what was assigned, generated and skipped.

    `model` (the pipeline's path) and `sampling` (koala.ship.sampling.generate's settings) are recorded in every PNG.
    """
    out.mkdir(parents=True, exist_ok=True)
    settings = json.dumps({"model": model, "preset": preset, **sampling}, sort_keys=True)
    todo = []
    for i in indices:
        if (out / image_name(i)).is_file():
            _check_existing(out / image_name(i), prompts[i], seed + i, settings)
        else:
            todo.append(i)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        images = generate(
            pipe, [prompts[i] for i in batch], preset, [seed + i for i in batch], batch_size=len(batch), **sampling
        )
        for i, img in zip(batch, images):
            tmp = out / f".{image_name(i)}.tmp"
            img.save(tmp, format="PNG", pnginfo=_png_text(prompts[i], seed + i, settings))
            tmp.replace(out / image_name(i))  # a PNG is either complete or absent
    done = set(todo)
    return {"assigned": list(indices), "generated": todo, "skipped": [i for i in indices if i not in done]}


def write_share_record(folder: Path, rank: int, world: int, record: dict[str, list[int]]) -> None:
    """shares/rank<r>.json: which prompts this rank was given, generated and skipped in this run."""
    (folder / "shares").mkdir(parents=True, exist_ok=True)
    (folder / "shares" / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world_size": world, **record}))


def write_manifest(folder: Path, pairs: Sequence[tuple[str, Optional[str]]], seed: int) -> list[Sample]:
    """manifest.json (index, file, prompt, style, seed per image) once every image exists; returns the samples."""
    missing = [image_name(i) for i in range(len(pairs)) if not (folder / "images" / image_name(i)).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} images missing in {folder / 'images'} (first: {missing[0]})")
    rows = [
        {"index": i, "file": f"images/{image_name(i)}", "prompt": p, "style": s, "seed": seed + i}
        for i, (p, s) in enumerate(pairs)
    ]
    (folder / "manifest.json").write_text(json.dumps(rows, indent=1))
    return [Sample(folder / r["file"], r["prompt"], r["style"]) for r in rows]
