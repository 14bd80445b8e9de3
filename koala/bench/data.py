"""`python -m koala.bench data [bench.n=64] [bench.resolution=1024] [bench.batch_size=8] [bench.workers=0] [data.<key>=...]`.

Samples/s of one dataloader worker (workers=0: the main process) for: reading shards only, reading + decoding +
SDXL transform of `resolution` px images (online), and reading cached samples (SDXL-sized latents and text
embeddings), on temporary data generated here.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from koala.config.compose import run_command
from koala.config.schema import DataConfig
from koala.data import build_dataloader
from koala.data.cache_writer import CacheWriter
from koala.data.shards import read_tar
from koala.devices import DTYPES, DType
from koala.fixtures.shards import write_demo_shards


@dataclass
class BenchData:
    """Settings of `python -m koala.bench data` (`bench.<key>=...`)."""

    n: int = 64  # generated images (and cached samples)
    resolution: int = 1024  # target size of the SDXL transform
    batch_size: int = 8
    workers: int = 0  # dataloader workers (0: the main process)
    cache_dtype: DType = DType.fp16  # storage precision of the cached tensors


@dataclass
class BenchDataJob:
    """The schema of configs/bench_data.yaml: the bench settings and the `data` section both readers share."""

    bench: BenchData = field(default_factory=BenchData)
    data: DataConfig = field(default_factory=DataConfig)


SDXL_SHAPES = {"prompt_embeds": (77, 2048), "pooled_prompt_embeds": (1280,), "time_ids": (6,)}


def write_fake_cache(out: Path, n: int, resolution: int, dtype: torch.dtype) -> None:
    """A cache of `n` random samples with SDXL's tensor shapes (latents at 1/8 resolution)."""
    writer = CacheWriter(out, rank=0, samples_per_shard=max(1, n // 4), dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        tensors = {"latents": torch.randn(4, resolution // 8, resolution // 8, generator=g)}
        tensors.update({k: torch.randn(*s, generator=g) for k, s in SDXL_SHAPES.items()})
        writer.add(f"{i:08d}", tensors, {"caption": "bench"})
    writer.close()


def rate(loader, count_key: str = "keys") -> float:
    """Samples per second of one full pass over `loader`."""
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch[count_key])
    return n / (time.perf_counter() - start)


def bench_data(cfg: BenchDataJob) -> None:
    """Time the readers a composed `bench_data` config describes and print the rates."""
    bench = cfg.bench
    n, res, bs = bench.n, bench.resolution, bench.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_demo_shards(Path(tmp) / "shards", n, res, samples_per_shard=max(1, n // 4))
        write_fake_cache(Path(tmp) / "cache", n, res, DTYPES[bench.cache_dtype])
        data = OmegaConf.to_container(cfg.data, resolve=True)  # configs/bench_data.yaml under the data.<key> overrides
        online = OmegaConf.merge(OmegaConf.structured(DataConfig), data, {"path": f"{tmp}/shards"})
        cached = OmegaConf.merge(online, {"kind": "cached", "path": f"{tmp}/cache", "caption_dropout": 0.0})
        start = time.perf_counter()
        read = sum(1 for s in shards for _ in read_tar(str(s))) / (time.perf_counter() - start)
        mb = sum(s.stat().st_size for s in shards) / n / 2**20
        decoded = rate(build_dataloader(online, batch_size=bs, seed=0))
        from_cache = rate(build_dataloader(cached, batch_size=bs, seed=0))
        cache_mb = sum(p.stat().st_size for p in Path(tmp, "cache").glob("*.tar")) / n / 2**20
    print(f"data bench: {n} generated images, shorter side {int(0.75 * res)}-{int(1.5 * res)} px, "
          f"target {res} px, batch {bs}, workers {bench.workers} (0 = main process), {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'stage':<40}{'samples/s':>12}{'MiB/sample':>12}")
    print(f"{'read shards (tar, no decode)':<40}{read:>12.1f}{mb:>12.2f}")
    print(f"{'read + decode + SDXL transform':<40}{decoded:>12.1f}{mb:>12.2f}")
    print(f"{'read cached latents + embeddings':<40}{from_cache:>12.1f}{cache_mb:>12.2f}")
    print(f"cache speed-up over decoding: {from_cache / decoded:.1f}x (and no VAE / text encoder in the step)")


def main(argv: list[str] | None = None) -> None:
    """CLI: compose `configs/bench_data.yaml` with the overrides and run the benchmark."""
    run_command("bench_data", bench_data, argv, schema=BenchDataJob)
