"""`python -m koala.cache data=... teacher=... [cache.out=...]`: precompute the SDXL conditioning of a dataset once.

Every rank encodes its share of the data with the frozen VAE and text encoders (koala/data/cache_writer.py); train
from the result with `data=cached data.path=<out>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from koala.config.schema import TrainConfig, register_configs
from koala.data.cache_writer import build_cache


@dataclass
class CacheConfig:
    """Where and how the cache is written."""

    out: str = ".cache/koala/latents/${data.name}-${teacher.name}"
    batch_size: int = 8  # samples encoded together
    samples_per_shard: int = 1000
    dtype: str = "fp16"  # storage precision of the cached tensors: fp32 | fp16 | bf16
    device: str = "auto"  # auto (this rank's accelerator, else cpu) | cpu | cuda:N


@dataclass
class CacheJobConfig(TrainConfig):
    cache: CacheConfig = field(default_factory=CacheConfig)


ConfigStore.instance().store(name="koala_cache", node=CacheJobConfig)


@hydra.main(config_path="../configs", config_name="cache", version_base=None)
def main(cfg: DictConfig) -> None:
    print(f"cache written to {build_cache(cfg)}")


if __name__ == "__main__":
    register_configs()
    main()
