"""Generation for evaluation, split across processes: rank r of w draws prompts r, r + w, r + 2w, ... (disjoint
shares whose union is the list), prompt i always with seed `seed + i` (so the split never changes an image), one PNG
per prompt written atomically; a prompt whose PNG exists is skipped, so an interrupted run resumes. Each PNG carries
its prompt, seed and sampling settings as text chunks: an existing image made from anything else is an error, never
silently reused. An existing PNG that does not decode (cut short by a full disk or a bad copy) is sampled again, named
on stderr and counted as `regenerated` in the share record.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from koala.evaluation.registry import Sample
from koala.ship.presets import get_preset
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


def _intact_text(path: Path) -> dict[str, str] | None:
    """The text chunks of a PNG that decodes completely, or None (with a line naming the file) where it does not."""
    try:
        with Image.open(path) as img:
            img.load()  # every pixel: a file cut short fails here
            return dict(getattr(img, "text", {}))
    except (OSError, SyntaxError) as e:  # PIL: truncated data, broken chunks, not an image at all
        print(f"warning: {path} does not decode ({type(e).__name__}: {e}); sampling it again", file=sys.stderr)
        return None


def _check_existing(path: Path, prompt: str, seed: int, settings: str) -> bool:
    """True for an intact image sampled from this prompt, seed and settings; False for one that does not decode (to
    be sampled again); an error for one made from anything else."""
    text = _intact_text(path)
    if text is None:
        return False
    made = (text.get("prompt"), text.get("seed"), text.get("settings"))
    if made != (prompt, str(seed), settings):
        raise ValueError(
            f"{path} was sampled from prompt={made[0]!r} seed={made[1]} settings={made[2]}, not "
            f"prompt={prompt!r} seed={seed} settings={settings}; remove the folder or choose another out="
        )
    return True


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
    """Sample the missing (or undecodable) images of `indices` into `out`; returns what was assigned, generated,
    skipped (found intact) and regenerated (found damaged, sampled again).

    `model` (the pipeline's path), the preset's sampler and `sampling` (koala.ship.sampling.generate's settings) are
    recorded in every PNG.
    """
    out.mkdir(parents=True, exist_ok=True)
    settings = json.dumps({"model": model, **get_preset(preset).settings(), **sampling}, sort_keys=True)
    todo, damaged = [], []
    for i in indices:
        path = out / image_name(i)
        if not path.is_file() or not _check_existing(path, prompts[i], seed + i, settings):
            todo.append(i)
            damaged += [i] if path.is_file() else []
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        images = generate(
            pipe, [prompts[i] for i in batch], preset, [seed + i for i in batch], batch_size=len(batch), **sampling
        )
        for i, img in zip(batch, images):
            _save_png(img, out / image_name(i), _png_text(prompts[i], seed + i, settings))
    done = set(todo)
    skipped = [i for i in indices if i not in done]
    return {"assigned": list(indices), "generated": todo, "skipped": skipped, "regenerated": damaged}


def _save_png(img: Any, path: Path, info: PngInfo) -> None:
    """Write a PNG atomically: temp name, fsync, rename (a PNG is either complete or absent)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        img.save(f, format="PNG", pnginfo=info)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


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
