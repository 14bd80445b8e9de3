"""Writing the conditioning cache: the SDXL conditioning of a dataset, computed once (`python -m koala.cache`).

Every rank (accelerate / torch.distributed) encodes its share of the data with the frozen VAE and text encoders and
writes tar shards `<rank>-<n>.tar` of `<key>.safetensors` samples (see koala.data.cached; member names are clean
relative paths, the source key is kept in each sample's metadata) and `info-<rank>.json`; rank 0 adds the
empty-prompt embeddings (for caption dropout at training time) and, once every rank is done, the completeness marker
`cache.json` listing every shard. Crops and flips are drawn once, here, and recorded; caption dropout is left to
training. Train from the result with `data=cached data.path=<out>`.

A folder that already holds files koala.cache writes is refused (their shards would mix with the new ones);
`cache.overwrite=true` deletes those files, and only those, first.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import webdataset as wds
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file
from tqdm import tqdm

from koala.data import SkipTally, build_dataloader
from koala.data.cached import EMPTY_PROMPT, MARKER, WRITTEN, encode_sample
from koala.data.conditioning import SDXLConditioner, conditioning_dtype
from koala.devices import DTYPES, multi_cpu
from koala.errors import ConfigError
from koala.models.pipeline_parts import PipelineSource

if TYPE_CHECKING:
    from koala.cache import CacheJobConfig

EXACT = {"time_ids": torch.float32}  # sizes and crops are integers up to 8192+: fp16 would round them above 2048


def member_stem(key: str) -> str:
    """A source key as a tar member stem: a relative path without empty, `.` or `..` parts, and without dots (webdataset
    splits a member name at its first dot), e.g. `/data/a.b/c` -> `data/a_b/c`, `../../x` -> `x`."""
    parts = [part.replace(".", "_") for part in re.split(r"[/\\]+", key) if part not in ("", ".", "..")]
    return "/".join(parts) or "sample"


class CacheWriter:
    """Writes cached samples into `<out>/<rank>-<n>.tar` shards (or the names `shard_name(first key)` gives), each
    written under a temporary name, synced to disk and renamed into place once complete."""

    def __init__(
        self, out: Path, rank: int, samples_per_shard: int, dtype: torch.dtype,
        shard_name: Callable[[str], str] | None = None,
    ) -> None:  # fmt: skip
        self.out, self.rank, self.per_shard, self.dtype = out, rank, samples_per_shard, dtype
        self.shard_name = shard_name or (lambda key: f"{self.rank:03d}-{self.shard:05d}.tar")
        self.shard, self.count, self.sink, self.total = 0, 0, None, 0
        self.names: set[str] = set()  # member stems of the current shard: two samples never share one
        self.written: list[str] = []  # the finished shards' file names
        out.mkdir(parents=True, exist_ok=True)

    def add(
        self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], extra: dict[str, bytes] | None = None
    ) -> None:
        """Append one sample (its source key kept in the metadata; `extra` members, e.g. `jpg`, beside it); starts a
        new shard every `samples_per_shard`."""
        if self.sink is None:
            self.path = self.out / self.shard_name(key)
            self.file = open(str(self.path) + ".tmp", "wb")
            self.sink = wds.TarWriter(self.file)
            self.names = set()
        stored = {k: v.detach().to("cpu", EXACT.get(k, self.dtype)) for k, v in tensors.items()}
        stem, n = member_stem(key), 1
        while stem in self.names:
            stem, n = f"{member_stem(key)}_{n}", n + 1
        self.names.add(stem)
        self.sink.write({"__key__": stem, "safetensors": encode_sample(stored, {"key": key, **meta}), **(extra or {})})
        self.count, self.total = self.count + 1, self.total + 1
        if self.count == self.per_shard:
            self.close()

    def close(self) -> None:
        """Finish the current shard: sync it to disk, then rename `.tmp` into place (a crash leaves only `.tmp`)."""
        if self.sink is not None:
            self.sink.close()
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(str(self.path) + ".tmp", self.path)
            sync_dir(self.out)
            self.written.append(self.path.name)
            self.sink, self.count, self.shard = None, 0, self.shard + 1


def sync_dir(folder: Path) -> None:
    """fsync a folder, so a rename in it survives a power loss (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def koala_files(out: Path) -> list[Path]:
    """The files in `out` that koala.cache writes (shards, infos, empty prompt, marker, their temporaries)."""
    return sorted(p for p in out.iterdir() if p.is_file() and WRITTEN.fullmatch(p.name)) if out.is_dir() else []


def prepare_out(out: Path, overwrite: bool, state: Any) -> None:
    """Refuse (on every rank, before anything is written) a folder holding koala.cache files, unless `overwrite`:
    then rank 0 deletes those files, and only those."""
    found = koala_files(out)
    if found and not overwrite:
        raise ConfigError(
            f"cache.out={str(out)!r} already holds a koala cache or part of one ({len(found)} files, e.g. "
            f"{found[0].name}); pass cache.overwrite=true to replace it (only the files koala.cache writes are "
            "deleted), or choose another cache.out"
        )
    state.wait_for_everyone()  # every rank has looked before rank 0 deletes
    if found and state.process_index == 0:
        for path in found:
            path.unlink(missing_ok=True)
    state.wait_for_everyone()


def write_marker(out: Path, world: int, settings: dict) -> None:
    """Merge every rank's info into the completeness marker and write it last, atomically."""
    infos = [json.loads((out / f"info-{r:03d}.json").read_text()) for r in range(world)]
    skipped: dict[str, int] = {}
    for info in infos:
        for reason, n in info["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    shards = sorted(s for info in infos for s in info["shards"])
    seal_cache(
        out, {"shards": shards, "samples": sum(info["samples"] for info in infos), "skipped": skipped, **settings}
    )


def seal_cache(out: Path, record: dict) -> None:
    """Write the completeness marker `cache.json` (its `shards` list names every shard of the cache), synced and
    renamed into place: written last, by koala.cache and koala.synth, once the cache is complete."""
    tmp = out / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(record, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MARKER)
    sync_dir(out)


def cache_data_config(data: DictConfig) -> DictConfig:
    """The data config to cache from: one pass over everything, unshuffled, captions kept."""
    data = OmegaConf.merge(data, {"resampled": False, "epochs": 1, "shuffle": False, "caption_dropout": 0.0})
    if data.kind == "cached":
        raise ConfigError("data.kind=cached is already a cache; pick the source dataset (data=demo, webdataset, ...)")
    return data


def write_batch(writer: CacheWriter, batch: dict, cond: dict[str, torch.Tensor]) -> None:
    """Split one encoded batch into per-sample cache entries with their crop, flip and caption."""
    for i, key in enumerate(batch["keys"]):
        meta = {
            "caption": batch["captions"][i],
            "original_size": batch["original_size"][i].tolist(),
            "crop_top_left": batch["crop_top_left"][i].tolist(),
            "target_size": batch["target_size"][i].tolist(),
            "flipped": bool(batch["flipped"][i]),
        }
        writer.add(key, {k: v[i] for k, v in cond.items()}, meta)


def build_cache(cfg: CacheJobConfig) -> Path:
    """Encode this rank's share of `cfg.data` with `cfg.teacher`'s VAE and text encoders into `cfg.cache.out`."""
    from accelerate import PartialState

    state = PartialState(cpu=multi_cpu())  # gloo on CPU processes (else each would think itself rank 0 of 1)
    rank, world = state.process_index, state.num_processes
    device = state.device if cfg.cache.device == "auto" else torch.device(cfg.cache.device)
    pipeline = resolve_pipeline(cfg.teacher)
    data = cache_data_config(cfg.data)
    out = Path(cfg.cache.out)
    prepare_out(out, cfg.cache.overwrite, state)
    text_dtype = conditioning_dtype(cfg, device)  # the text encoders' precision, recorded in the info files
    conditioner = SDXLConditioner.from_pretrained(
        pipeline, vae=cfg.teacher.vae, device=device, dtype=DTYPES[text_dtype], config=cfg.teacher.config
    )
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        empty, pooled = conditioner.encode_prompts([""])
        save_file({"prompt_embeds": empty[0].cpu().contiguous(), "pooled_prompt_embeds": pooled[0].cpu().contiguous()},
                  str(out / EMPTY_PROMPT))  # fmt: skip
    loader = build_dataloader(
        data, batch_size=cfg.cache.batch_size, seed=cfg.seed, rank=rank, world_size=world, final_tally=True
    )  # final_tally: skips after a worker's last batch (an unreadable last shard) are counted too
    writer = CacheWriter(out, rank, cfg.cache.samples_per_shard, DTYPES[cfg.cache.dtype])
    skipped = SkipTally()  # each worker's batches carry its own cumulative counts: summed over workers
    with tqdm(desc=f"caching to {out}", unit="img", disable=rank != 0) as bar:
        for batch in skipped.batches(loader):
            write_batch(writer, batch, conditioner(batch))
            bar.update(len(batch["keys"]))
    writer.close()
    settings = {"data": OmegaConf.to_container(cfg.data, resolve=True), "teacher": cfg.teacher.name,
                "dtype": cfg.cache.dtype, "conditioning_dtype": text_dtype}  # fmt: skip
    info = {"samples": writer.total, "skipped": skipped.totals(), "shards": writer.written, **settings}
    (out / f"info-{rank:03d}.json").write_text(json.dumps(info, indent=1))
    state.wait_for_everyone()
    if rank == 0:
        write_marker(out, world, settings)  # last: the cache is complete
    state.wait_for_everyone()
    return out


def resolve_pipeline(teacher: DictConfig) -> str:
    """The teacher's diffusers folder, or its full single-file checkpoint (checked to fit its configs)."""
    if not teacher.pipeline:
        raise ConfigError(
            f"teacher.pipeline is not set for teacher={teacher.name}: point it at a diffusers SDXL folder or a full "
            "SDXL .safetensors checkpoint"
        )
    source = PipelineSource.of(teacher)
    if source.is_file and Path(teacher.pipeline).is_file():
        try:  # what the file is, and that every part fits its configs, before any weight is read
            source.check_file()
        except ValueError as e:
            raise ConfigError(str(e)) from e  # the message names the file and the part
    elif not (Path(teacher.pipeline) / "model_index.json").is_file():
        raise ConfigError(
            f"teacher.pipeline={teacher.pipeline!r} is neither a diffusers pipeline folder (no model_index.json) nor a "
            "full SDXL .safetensors checkpoint"
        )
    return str(teacher.pipeline)
