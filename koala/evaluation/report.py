"""Results of an evaluation run: one JSON, one Markdown table (a row per model, a column per number), image grids."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from koala.evaluation.registry import Sample
from koala.ship.sampling import make_grid


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """Models as rows, metrics as columns (in first-seen order)."""
    columns = list(dict.fromkeys(k for row in results.values() for k in row))
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for model, row in results.items():
        cells = [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, results: dict[str, dict[str, float]], meta: dict[str, Any]) -> str:
    """results.json (numbers + settings) and results.md (settings + table); returns the table."""
    table = markdown_table(results)
    (out / "results.json").write_text(json.dumps({**meta, "results": results}, indent=1))
    settings = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    (out / "results.md").write_text(f"# Evaluation: {meta.get('protocol')}\n\n{settings}\n\n{table}\n")
    return table


def _with_header(grid: Image.Image, names: Sequence[str]) -> Image.Image:
    """The grid under a white strip naming each column."""
    strip = 16
    out = Image.new("RGB", (grid.width, grid.height + strip), "white")
    out.paste(grid, (0, strip))
    draw, col = ImageDraw.Draw(out), grid.width / len(names)
    for i, name in enumerate(names):
        draw.text((i * col + 2, 2), name, fill="black")
    return out


def _tile(sample: Sample, size: int) -> Image.Image:
    """An image shrunk to fit size x size (grids of 1024 px samples stay small)."""
    img = Image.open(sample.file).convert("RGB")
    img.thumbnail((size, size), Image.BICUBIC)
    return img


def write_grids(out: Path, samples: dict[str, Sequence[Sample]], count: int, size: int = 256) -> list[Path]:
    """grids/<model>.png with the first `count` images of each model, and grids/side_by_side.png: one row per
    prompt, one column per model (same prompt and seed across a row); tiles at most `size` px."""
    (out / "grids").mkdir(parents=True, exist_ok=True)
    written = []
    for model, rows in samples.items():
        path = out / "grids" / f"{model}.png"
        make_grid([_tile(s, size) for s in rows[:count]]).save(path)
        written.append(path)
    names = list(samples)
    tiles = [_tile(samples[m][i], size) for i in range(min(count, *(len(v) for v in samples.values()))) for m in names]
    _with_header(make_grid(tiles, cols=len(names)), names).save(out / "grids" / "side_by_side.png")
    return written + [out / "grids" / "side_by_side.png"]
