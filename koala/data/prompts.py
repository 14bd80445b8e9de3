"""Prompt sources for `koala.synth`: text, CSV, JSON, JSON Lines and parquet files, folders of them, and the captions
of webdataset shards, read into one list of prompts in a fixed order.

Every reader fails on a bad file with one line naming the file and the line (or the row of a parquet file) that is
wrong (`PromptFileError`, a `ConfigError`: the command prints `error: ...` and exits with status 2 before any model is
loaded). Shard captions are data, not a file the user wrote: a sample without a caption is skipped and counted, as
training does.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from koala.data.records import UnreadableSource, caption_from_sample
from koala.data.shards import expand_shards, read_tar
from koala.errors import ConfigError

log = logging.getLogger("koala.data")

COLUMNS = ("prompt", "caption", "text")  # the column (or object key) a table or record names its prompt by


class PromptFileError(ConfigError):
    """A prompt file that cannot be read; the message is `<file>:<line>: <what is wrong>`."""


class Options:
    """How records are read: the column or key holding the prompt (None: the first of COLUMNS present) and the
    shard member holding a caption (`txt` or `json.<field>`)."""

    def __init__(self, column: str | None = None, caption_key: str = "txt") -> None:
        self.column, self.caption_key = column, caption_key


def _fail(path: Path | str, where: str | int, what: str) -> PromptFileError:
    """The error for line (or row) `where` of `path`."""
    return PromptFileError(f"{path}:{where}: {what}")


def _prompt(value: Any, path: Path, where: str | int) -> str:
    """A non-empty prompt string, or the error naming where it is."""
    if not isinstance(value, str):
        raise _fail(path, where, f"expected a prompt string, found {type(value).__name__} {str(value)[:40]!r}")
    if not value.strip():
        raise _fail(path, where, "empty prompt")
    return value.strip()


def _column(names: list[str], opts: Options, path: Path, where: str | int) -> str:
    """The column (or record key) that holds the prompt."""
    wanted = [opts.column] if opts.column else list(COLUMNS)
    for name in wanted:
        if name in names:
            return name
    want = f"column {opts.column!r}" if opts.column else f"a column named {' or '.join(COLUMNS)} (or set column=)"
    raise _fail(path, where, f"expected {want}; found {', '.join(map(repr, names)) or 'none'}")


def _from_record(record: Any, opts: Options, path: Path, where: str | int) -> str:
    """The prompt of one JSON / JSON Lines record: a string, or an object holding it under the prompt column."""
    if isinstance(record, dict):
        return _prompt(record.get(_column(list(record), opts, path, where)), path, where)
    return _prompt(record, path, where)


def _text(path: Path) -> str:
    """A file's text as UTF-8; a bad byte is reported at its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _fail(path, data[: e.start].count(b"\n") + 1, "not UTF-8 text") from None


def read_txt(path: Path, opts: Options) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped (as koala.generate's prompts=)."""
    lines = (line.strip() for line in _text(path).splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def read_csv(path: Path, opts: Options) -> list[str]:
    """A CSV file with a header row; the prompt column is `column`, else the first of COLUMNS present."""
    rows = csv.reader(io.StringIO(_text(path), newline=""), strict=True)
    try:
        header = next(rows, [])
        name = header.index(_column(header, opts, path, 1))
        prompts = []
        for row in rows:
            if not row:  # a blank line
                continue
            if len(row) != len(header):
                raise _fail(path, rows.line_num, f"{len(row)} fields where the header has {len(header)}")
            prompts.append(_prompt(row[name], path, rows.line_num))
    except csv.Error as e:
        raise _fail(path, rows.line_num, f"malformed CSV: {e}") from None
    return prompts


def read_json(path: Path, opts: Options) -> list[str]:
    """A JSON list of prompt strings or of objects holding one; each error names the line its entry starts on."""
    text, decoder = _text(path), json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip(pos: int) -> int:  # past white space
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    pos, prompts = skip(0), []
    if not text[pos : pos + 1] == "[":
        raise _fail(path, line_of(pos), "expected a JSON list of prompts ([...])")
    pos = skip(pos + 1)
    while pos < len(text) and text[pos] != "]":
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _fail(path, e.lineno, f"invalid JSON: {e.msg}") from None
        prompts.append(_from_record(value, opts, path, line_of(pos)))
        pos = skip(end)
        if text[pos : pos + 1] == ",":
            pos = skip(pos + 1)
        elif text[pos : pos + 1] != "]":
            raise _fail(path, line_of(pos), "invalid JSON: expected ',' or ']' after an entry")
    if skip(pos + 1) != len(text):
        raise _fail(path, line_of(min(pos, len(text))), "invalid JSON: the list is not closed, or text follows it")
    return prompts


def read_jsonl(path: Path, opts: Options) -> list[str]:
    """JSON Lines: one prompt string or object per line; blank lines are skipped."""
    prompts = []
    for n, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(path, n, f"invalid JSON: {e.msg}") from None
        prompts.append(_from_record(record, opts, path, n))
    return prompts


def read_parquet(path: Path, opts: Options) -> list[str]:
    """A parquet table's prompt column; a bad value is reported by its row (1 = the first data row)."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise _fail(path, "row 1", f"not a parquet file ({str(e).splitlines()[0]})") from None
    name = _column(schema.names, opts, path, "header")
    values = pq.read_table(path, columns=[name]).column(name).to_pylist()
    return [_prompt(v, path, f"row {i}") for i, v in enumerate(values, 1)]


def read_shard_captions(url: str, opts: Options) -> list[str]:
    """The captions of one webdataset shard (`caption_key`: txt or json.<field>); a caption list gives its first."""
    prompts, missing = [], 0
    try:
        for sample in read_tar(url):
            caption = caption_from_sample(sample, opts.caption_key)
            caption = caption[0] if isinstance(caption, list) else caption
            if caption:
                prompts.append(caption)
            else:
                missing += 1
    except UnreadableSource as e:
        raise PromptFileError(f"{url}: unreadable shard ({e.__cause__ or e})") from None
    if missing:
        log.warning("%s: %d samples without a %r caption skipped", url, missing, opts.caption_key)
    return prompts


READERS: dict[str, Callable[[Any, Options], list[str]]] = {
    ".txt": read_txt, ".csv": read_csv, ".json": read_json, ".jsonl": read_jsonl, ".parquet": read_parquet,
    ".tar": read_shard_captions,
}  # fmt: skip


def prompt_files(path: Path) -> list[Path]:
    """The prompt files of a folder (any depth, by suffix), in sorted order."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in READERS)
    if not files:
        raise PromptFileError(f"{path}: no prompt files (expected {', '.join(READERS)})")
    return files


def read_prompts(source: str, column: str | None = None, caption_key: str = "txt") -> list[str]:
    """Every prompt of `source` in order: a file by its suffix, a folder of them, or a shard pattern (`{a..b}`, glob,
    `::`-joined list) whose captions are the prompts."""
    opts = Options(column, caption_key)
    path = Path(source)
    if path.is_dir():
        files: list[Path | str] = list(prompt_files(path))
    elif path.is_file():
        files = [path]
    elif any(c in source for c in "{*?[") or "::" in source:
        try:
            files = expand_shards(source)
        except FileNotFoundError as e:
            raise PromptFileError(str(e)) from None
    else:
        raise PromptFileError(f"{source}: no such prompt file or folder")
    prompts = []
    for file in files:
        suffix = Path(file).suffix.lower()
        if suffix not in READERS:
            raise PromptFileError(f"{file}: unknown prompt file type {suffix!r}: expected {', '.join(READERS)}")
        prompts += READERS[suffix](str(file) if suffix == ".tar" else Path(file), opts)  # shards may be URLs
    if not prompts:
        raise PromptFileError(f"{source}: holds no prompts")
    return prompts
