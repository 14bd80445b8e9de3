"""`python -m koala.cache data=... teacher=... [cache.out=...]`: precompute the SDXL conditioning of a dataset once.

Every rank encodes its share of the data with the frozen VAE and text encoders (koala/data/cache_writer.py); train
from the result with `data=cached data.path=<out>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from koala.config.compose import run_command
from koala.config.schema import TrainConfig
from koala.data.cache_writer import build_cache
from koala.devices import DType


@dataclass
class CacheConfig:
    """Where and how the cache is written."""

    out: str = ".cache/koala/latents/${data.name}-${teacher.name}"
    batch_size: int = 8  # samples encoded together
    samples_per_shard: int = 1000
    dtype: DType = DType.fp16  # storage precision of the cached tensors: fp32 | fp16 | bf16
    device: str = "auto"  # auto (this rank's accelerator, else cpu) | cpu | cuda:N
    overwrite: bool = False  # replace a cache in `out` (deleting only the files koala.cache writes); else refused


@dataclass
class CacheJobConfig(TrainConfig):
    cache: CacheConfig = field(default_factory=CacheConfig)


def write_cache(cfg: CacheJobConfig) -> Path:
    """Write the cache a composed config describes and say where."""
    out = build_cache(cfg)
    print(f"cache written to {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    """CLI: compose `configs/cache.yaml` with the overrides and write the cache."""
    return run_command("cache", write_cache, argv, schema=CacheJobConfig)


if __name__ == "__main__":
    main()
