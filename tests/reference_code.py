"""The published implementations koala's protocols are tested against: pytorch-fid 0.3.0 and open_clip 3.3.0.

Both import torchvision, and the only torchvision wheel for torch 2.13 on the package index is built for CUDA torch:
beside the CPU build its compiled operators fail to load and its import stops at registering a fake for
`torchvision::nms`. Installed into the environment it would break transformers (which imports torchvision when it
finds it), so `make setup` puts the three packages into their own folder, `.venv/parity`, which only these tests put
on sys.path, after declaring the two operators torchvision's import registers fakes for without checking that its
library loaded (`nms`, `qnms`; nothing here calls them). Their Python code (the Inception blocks, the transforms,
open_clip's models and tokenizer) is then the published code, unchanged.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

PARITY = Path(sys.prefix) / "parity"  # written by `make setup`
_LIBRARY = None  # the torchvision operator declarations must outlive the import


@contextlib.contextmanager
def reference_code_importable() -> Iterator[None]:
    """Make `pytorch_fid` and `open_clip` importable while the block runs, or skip naming the missing setup step.

    The folder leaves sys.path afterwards: processes spawned later by other tests inherit the parent's sys.path,
    and there transformers would find the CUDA torchvision and fail to import."""
    global _LIBRARY
    if not (PARITY / "pytorch_fid").is_dir() or not (PARITY / "open_clip").is_dir():
        pytest.skip(f"pytorch-fid / open_clip not in {PARITY}: run `make setup`")
    try:
        torch.ops.torchvision.nms  # noqa: B018  (torchvision's own library is loaded: nothing to declare)
    except (AttributeError, RuntimeError):
        if _LIBRARY is None:
            _LIBRARY = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                _LIBRARY.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    added = str(PARITY) not in sys.path
    if added:
        sys.path.append(str(PARITY))
    try:
        yield
    finally:
        if added:
            sys.path.remove(str(PARITY))


def write_open_clip_tokenizer(folder: Path) -> Path:
    """A transformers CLIP tokenizer folder holding exactly open_clip's BPE vocabulary (its bundled
    bpe_simple_vocab_16e6.txt.gz, the file OpenAI's CLIP vocab.json / merges.txt were made from)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": "!"}))
    return folder
