"""Prompt lists of the published protocols, read from files the user supplies (nothing is downloaded).

Formats: `.txt` (one prompt a line; blank lines and # comments skipped); `.json` as a list of strings (HPSv2's
benchmark files), a list of objects with `prompt` / `caption` / `text`, or an object of objects with `prompt` and
optionally `category` (MJHQ-30K's meta_data.json); `.csv` with a `caption`, `text` or `prompt` column (BK-SDM's
COCO-30K metadata.csv: file_name,text). A folder reads every .txt/.json/.csv file in it, the file name being the
prompt's style (HPSv2: anime, concept-art, paintings, photo).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

from koala.ship.sampling import read_prompts

TEXT_FIELDS = ("prompt", "caption", "text")
SUFFIXES = (".txt", ".json", ".csv")


def _text_of(row: dict, path: Path) -> str:
    """The prompt of one record: its first field among TEXT_FIELDS."""
    for key in TEXT_FIELDS:
        if key in row:
            return str(row[key]).strip()
    raise ValueError(f"{path}: a record has none of the fields {', '.join(TEXT_FIELDS)} (found {sorted(row)})")


def _read_file(path: Path, style: Optional[str]) -> list[tuple[str, Optional[str]]]:
    """(prompt, style) pairs of one file; JSON objects may carry their own `category` as style."""
    if path.suffix == ".txt":
        return [(p, style) for p in read_prompts(path)]
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return [(_text_of(row, path), style) for row in csv.DictReader(f)]
    data = json.loads(path.read_text())
    rows = list(data.values()) if isinstance(data, dict) else data
    return [(r.strip(), style) if isinstance(r, str) else (_text_of(r, path), r.get("category", style)) for r in rows]


def read_prompt_set(path: str | Path | None, key: str = "protocol.prompts") -> list[tuple[str, Optional[str]]]:
    """(prompt, style) pairs from a file or a folder of per-style files; errors name the key and the path."""
    if not path:
        raise FileNotFoundError(f"{key} is not set: it must name a prompt file or folder (see README, Evaluation)")
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{key}={path}: no {'/'.join(SUFFIXES)} prompt files in the folder")
        return [pair for f in files for pair in _read_file(f, f.stem)]
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path}: no such prompt file (see README, Evaluation, for where to get it)")
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{key}={path}: unknown prompt file type {path.suffix!r}; valid: {', '.join(SUFFIXES)}")
    pairs = [(p, s) for p, s in _read_file(path, None) if p]
    if not pairs:
        raise ValueError(f"{key}={path} holds no prompts")
    return pairs
