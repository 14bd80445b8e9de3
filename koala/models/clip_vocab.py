"""SDXL's two CLIP tokenizers, offline: derived from CLIP's BPE merge list shipped in koala.

Both SDXL tokenizers (openai/clip-vit-large-patch14's, and the same vocabulary padded with "!" for OpenCLIP bigG) use
CLIP's byte-level BPE of 49,408 tokens. Its merge list is `bpe_simple_vocab_16e6.txt.gz` (OpenAI CLIP, MIT licence),
shipped here as the open_clip_torch 3.3.0 wheel ships it. The vocabulary is what CLIP's own `SimpleTokenizer`
builds from it: the 256 byte characters, the same with `</w>`, one token per merge (the first 48,894), then
`<|startoftext|>` and `<|endoftext|>`; `merges.txt` is those merges under a `#version: 0.2` line. That is, token for
token, the `vocab.json` / `merges.txt` of openai/clip-vit-large-patch14 (tests/test_teacher_file.py compares them with
the copy ComfyUI vendors, and checks known token ids).
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import cache
from pathlib import Path

from transformers import CLIPTokenizer

BPE_MERGES = Path(__file__).resolve().parents[1] / "assets" / "sdxl-base" / "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary is 49,408 = 2 x 256 byte tokens + merges + 2 special tokens
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@cache
def clip_vocab(merges_file: Path = BPE_MERGES) -> tuple[dict[str, int], tuple[str, ...]]:
    """(vocab.json contents, merge lines) of CLIP's tokenizer, built as CLIP's SimpleTokenizer builds them."""
    lines = gzip.open(merges_file).read().decode("utf-8").split("\n")
    merges = tuple(lines[1 : N_MERGES + 1])  # line 0 is a header
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + list(SPECIAL)
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: str | Path, settings: dict) -> Path:
    """Write a complete CLIPTokenizer folder: derived vocab.json and merges.txt plus `settings` (tokenizer_config)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))
    return folder


def clip_tokenizer(settings_folder: str | Path) -> CLIPTokenizer:
    """A CLIPTokenizer with the derived vocabulary and the settings (pad token, length) of `settings_folder`."""
    settings = json.loads((Path(settings_folder) / "tokenizer_config.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp, settings))
