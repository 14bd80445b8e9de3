"""Data: webdataset shards, HF datasets, image folders and latent caches as deterministic, resumable batch streams.

`build_dataloader(cfg.data, batch_size=..., seed=..., rank=..., world_size=..., resume_batches=...)` is the one
entry point. Online batches carry `pixel_values` (B, 3, H, W) in [-1, 1], `captions`, `original_size`,
`crop_top_left`, `target_size` (B, 2) long, `flipped`; cached batches carry `latents`, `prompt_embeds`,
`pooled_prompt_embeds`, `time_ids`. Both carry `keys`, `skipped` (cumulative skip counts of the producing worker)
and `worker_id`; feed them to `SkipTally` to log totals. The loader is already split by rank: do not pass it to
`accelerator.prepare` (that would re-split or dispatch it).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from enum import auto
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from koala.choice import Choice
from koala.data.buckets import sdxl_buckets
from koala.data.cached import CachedCodec, cached_raw
from koala.data.indexed import FolderSource, HFSource, index_order, load_hf_dataset
from koala.data.position import DataPosition
from koala.data.records import Raw, caption_from_sample, image_from_sample
from koala.data.samples import ImageCodec
from koala.data.shards import expand_shards, shard_order, shard_records
from koala.data.stream import BatchStream, SkipTally, buffer_shuffle
from koala.data.transforms import background_rgb

if TYPE_CHECKING:
    from koala.config.schema import DataConfig

__all__ = ["DataKind", "BatchStream", "SkipTally", "build_dataloader", "build_stream"]


class DataKind(Choice):
    """`data.kind`: what `data.path` names."""

    webdataset = auto()  # tar shards (brace pattern, glob, folder, URL)
    hf = auto()  # an HF dataset (save_to_disk folder, parquet, imagefolder)
    folder = auto()  # images with sidecar .txt captions
    cached = auto()  # a koala.cache folder of latents and text embeddings


class ShardReader:
    """Records of tar shards for one global worker: its shards in order, shuffled through a buffer."""

    def __init__(self, shards: list[str], to_raw: Callable[[dict], Raw], cfg: DataConfig, seed: int) -> None:
        self.shards, self.to_raw, self.seed = shards, to_raw, seed
        self.resampled, self.epochs = cfg.resampled, cfg.epochs
        self.buffer = cfg.shuffle_buffer if cfg.shuffle else 0
        self.shuffle = cfg.shuffle

    def __call__(self, g: int, workers: int, on_bad: Callable[[str, Exception], None]) -> Iterator[Raw]:
        urls = shard_order(
            self.shards, seed=self.seed, worker=g, workers=workers, resampled=self.resampled,
            epochs=self.epochs, shuffle=self.shuffle,
        )  # fmt: skip
        mine = len(self.shards[g::workers]) or 1
        give_up = 3 * len(self.shards) if self.resampled else (2 * mine if self.epochs is None else 10**9)
        records = shard_records(urls, self.to_raw, on_bad, give_up)
        return buffer_shuffle(records, self.buffer, random.Random(f"buffer:{self.seed}:{g}"))


class IndexReader:
    """Records of a random-access source for one global worker: its share of each epoch's permutation."""

    def __init__(self, source: Any, cfg: DataConfig, seed: int) -> None:
        self.source, self.seed, self.shuffle = source, seed, cfg.shuffle
        self.epochs = None if cfg.resampled else cfg.epochs

    def __call__(self, g: int, workers: int, on_bad: Callable[[str, Exception], None]) -> Iterator[Raw]:
        for index in index_order(
            len(self.source), seed=self.seed, worker=g, workers=workers, epochs=self.epochs, shuffle=self.shuffle
        ):
            try:
                yield self.source[index]
            except Exception:  # an unreadable file or row: counted as a corrupt image by the codec
                yield Raw(key=str(index))


def _webdataset_raw(cfg: DataConfig) -> Callable[[dict], Raw]:
    """Converter from a webdataset sample to a raw image record, honouring `image_key` and `caption_key`."""

    def to_raw(sample: dict) -> Raw:
        return Raw(
            key=sample["__key__"],
            image=image_from_sample(sample, cfg.image_key),
            caption=caption_from_sample(sample, cfg.caption_key),
        )

    return to_raw


def _image_codec(cfg: DataConfig) -> ImageCodec:
    """The online codec from the data config."""
    return ImageCodec(
        cfg.resolution,
        buckets=sdxl_buckets(cfg.resolution) if cfg.buckets else None,
        min_size=cfg.min_size,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        caption_dropout=cfg.caption_dropout,
        background=background_rgb(cfg.background),
    )


def build_reader(cfg: DataConfig, seed: int) -> tuple[Callable, Any]:
    """(reader, codec) for `cfg.kind`."""
    kind = DataKind(cfg.kind)
    if not cfg.path:
        raise ValueError(f"data.path is required for data.kind={cfg.kind}")
    if kind is DataKind.webdataset:
        return ShardReader(expand_shards(cfg.path), _webdataset_raw(cfg), cfg, seed), _image_codec(cfg)
    if kind is DataKind.cached:
        return ShardReader(expand_shards(cfg.path), cached_raw, cfg, seed), CachedCodec(cfg.caption_dropout)
    if kind is DataKind.hf:
        dataset = load_hf_dataset(cfg.path, cfg.hf_format, cfg.split)
        return IndexReader(HFSource(dataset, cfg.image_key, cfg.caption_key), cfg, seed), _image_codec(cfg)
    return IndexReader(FolderSource(cfg.path), cfg, seed), _image_codec(cfg)


def build_stream(
    data_cfg: DataConfig,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    resume_batches: int = 0,
    final_tally: bool = False,
    position: DataPosition | None = None,
) -> BatchStream:
    """The batch stream (an IterableDataset of whole batches) described by `data_cfg`."""
    reader, codec = build_reader(data_cfg, seed)
    return BatchStream(
        reader, codec, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
        resume_batches=resume_batches, max_consecutive_skips=data_cfg.max_consecutive_skips, final_tally=final_tally,
        position=position,
    )  # fmt: skip


def build_dataloader(
    data_cfg: DataConfig,
    *,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    resume_batches: int = 0,
    final_tally: bool = False,
    position: DataPosition | None = None,
) -> DataLoader:
    """A DataLoader over this rank's share of the data; `resume_batches=n` continues after the first n batches, or
    `position` (koala.data.position) says where every stream stands, for any number of ranks and workers.

    `final_tally=True`: a finite stream's last skip counts arrive as `tally_only` items (use `SkipTally.batches`).
    """
    stream = build_stream(
        data_cfg,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        resume_batches=resume_batches,
        final_tally=final_tally,
        position=position,
    )
    workers = data_cfg.num_workers
    return DataLoader(
        stream,
        batch_size=None,  # the stream yields whole batches (same-bucket samples together)
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        # Its own generator: drawing worker seeds from the global RNG would shift the trainer's noise on resume.
        generator=torch.Generator().manual_seed(seed),
    )
