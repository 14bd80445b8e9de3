"""Random-access sources: HF datasets (saved with `save_to_disk`, parquet files, an imagefolder) and plain folders of
images with sidecar `.txt` captions. Each is a sequence of raw records; which indices a worker reads is decided in
`koala.data.stream`."""

from __future__ import annotations

import glob
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from koala.choice import Choice
from koala.data.records import IMAGE_EXTENSIONS, Raw, clean_caption


class HfFormat(Choice):
    """`data.hf_format`: how an HF dataset is stored (`auto`: told apart by its files)."""

    auto = "auto"  # (a name that shadows enum.auto in this class body: values written out)
    disk = "disk"  # a save_to_disk folder
    parquet = "parquet"  # parquet file(s)
    imagefolder = "imagefolder"  # datasets' imagefolder layout


class FolderSource:
    """Images under a folder (recursively), each captioned by the `.txt` file next to it with the same stem."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.files = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file()
        )
        if not self.files:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Raw:
        path = self.files[index]
        sidecar = path.with_suffix(".txt")
        caption = clean_caption(sidecar.read_text(errors="replace")) if sidecar.exists() else None
        return Raw(key=str(path.relative_to(self.root).with_suffix("")), image=path.read_bytes(), caption=caption)


def hf_format_of(path: str, fmt: str = HfFormat.auto) -> str:
    """The format `load_hf_dataset` reads `path` as: the one given, or (auto) what the path holds."""
    fmt = HfFormat(fmt)
    if fmt is not HfFormat.auto:
        return fmt.value
    if path.endswith(".parquet") or glob.glob(os.path.join(path, "*.parquet")):
        return "parquet"
    if any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
        return "disk"
    return "imagefolder"


def folder_problem(path: str, kind: str, fmt: str = HfFormat.auto) -> str | None:
    """Why a data folder cannot be read (it holds nothing of its kind), or None; stops at the first file found."""
    if kind == "folder":
        images = (p for p in Path(path).rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
        return None if next(images, None) else f"holds no {'/'.join(IMAGE_EXTENSIONS)} images"
    if kind == "hf" and hf_format_of(path, fmt) == "imagefolder" and next(Path(path).rglob("*.*"), None) is None:
        return "holds no dataset: no parquet files, no save_to_disk folder (state.json), no images"
    return None


def load_hf_dataset(path: str, fmt: str = HfFormat.auto, split: str = "train") -> Any:
    """A `datasets.Dataset` from a `save_to_disk` folder, parquet file(s) (glob allowed) or an imagefolder."""
    import datasets

    fmt = hf_format_of(path, fmt)
    if fmt == "disk":
        ds = datasets.load_from_disk(path)
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    if fmt == "parquet":
        files = path if path.endswith(".parquet") else os.path.join(path, "*.parquet")
        return datasets.load_dataset("parquet", data_files=sorted(glob.glob(files)), split=split)
    return datasets.load_dataset("imagefolder", data_dir=path, split=split)


class HFSource:
    """Rows of an HF dataset: `image_key` column (an Image feature, bytes or a path) and `caption_key` column."""

    def __init__(self, dataset: Any, image_key: str, caption_key: str) -> None:
        import datasets

        for column in (image_key, caption_key):
            if column not in dataset.column_names:
                raise KeyError(f"column {column!r} not in the dataset; columns: {', '.join(dataset.column_names)}")
        if isinstance(dataset.features[image_key], datasets.Image):
            dataset = dataset.cast_column(image_key, datasets.Image(decode=False))  # bytes: decoding happens later
        self.dataset, self.image_key, self.caption_key = dataset, image_key, caption_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Raw:
        row = self.dataset[index]
        image = row[self.image_key]
        if isinstance(image, dict):
            image = image.get("bytes") or (Path(image["path"]).read_bytes() if image.get("path") else None)
        elif isinstance(image, str):
            image = Path(image).read_bytes()
        return Raw(key=str(row.get("key", index)), image=image, caption=clean_caption(row[self.caption_key]))


def index_order(
    length: int, *, seed: int, worker: int, workers: int, epochs: int | None, shuffle: bool
) -> Iterator[int]:
    """The indices one global worker reads: each epoch's (shuffled) permutation dealt round-robin to the workers."""
    epoch = 0
    while epochs is None or epoch < epochs:
        order = list(range(length))
        if shuffle:
            random.Random(f"epoch:{seed}:{epoch}").shuffle(order)
        yield from order[worker::workers]
        epoch += 1
