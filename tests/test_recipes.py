"""Every shipped experiment runs as shipped: its own precision (bf16 teacher and autocast), sampling, accumulation,
checkpointing, EMA, caption dropout, optimizer and timesteps. Only the teacher's weights are swapped for the tiny
SDXL-shaped ones, the data for the generated shards (or their cache), and sizes and cadences shrunk."""

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from koala.cache import CacheJobConfig  # the command's schema (koala_cache)
from koala.config.compose import CONFIG_DIR, compose_config
from koala.config.schema import TrainConfig
from koala.data.cache_writer import build_cache
from koala.fixtures.shards import write_demo_shards
from koala.ship.export import export_run
from koala.train.loop import train

SHIPPED = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
TINY_SPEC = {"koala-700m": "tiny-700m", "koala-1b": "tiny-1b"}  # the same recipe at the tiny teacher's size


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_pipeline_dir):
    """Demo shards and their cache, made from the tiny teacher at 32 px."""
    root = tmp_path_factory.mktemp("recipes")
    write_demo_shards(root / "shards", n=24, resolution=32, samples_per_shard=8)
    shards = f"{root}/shards/demo-{{00000..00002}}.tar"
    cache = compose_config("cache", [
        f"data.path='{shards}'", "data.resolution=32", f"teacher.pipeline={tiny_pipeline_dir}",
        f"cache.out={root}/cache", "cache.batch_size=8",
    ], schema=CacheJobConfig)  # fmt: skip
    build_cache(cache)
    return {"pipeline": tiny_pipeline_dir, "shards": shards, "cache": root / "cache"}


def shrunk(name: str, assets: dict, out: Path) -> list[str]:
    """The experiment's own config with the tiny teacher's weights, the generated data, and small sizes."""
    cfg = compose_config("train", [f"experiment={name}"], schema=TrainConfig)
    data_path = assets["cache"] if cfg.data.kind == "cached" else assets["shards"]
    overrides = {
        "teacher.pipeline": assets["pipeline"], "teacher.arch": "tiny",
        "data.path": f"'{data_path}'", "data.resolution": 32, "data.min_size": 0,
        "batch_size": 2, "max_steps": 1, "log_every": 1, "checkpoint_every": 1, "sample_every": 1,
        "sample_steps": 2, "data.num_workers": 2,
        "output_dir": out,
    }  # fmt: skip
    if cfg.data.caption_key.startswith("json."):
        overrides["data.caption_key"] = "json.long_caption"  # the generated shards' json field
    unet = [f"unet={TINY_SPEC[cfg.unet.name]}"] if cfg.unet.name in TINY_SPEC else []
    return [f"experiment={name}", *unet, *(f"{k}={v}" for k, v in overrides.items())]


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_experiment_trains_samples_checkpoints_and_exports_as_shipped(name, assets, tmp_path):
    shipped = compose_config("train", [f"experiment={name}"], schema=TrainConfig)
    cfg = compose_config("train", shrunk(name, assets, tmp_path / "run"), schema=TrainConfig)
    for key in (
        "mixed_precision",
        "teacher.dtype",
        "grad_accum",
        "ema",
        "ema_decay",
        "gradient_checkpointing",
        "data.caption_dropout",
        "data.caption_dropout_mode",
        "timesteps",
        "optim",
        "distill",
        "report_to",
    ):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(shipped, key), key  # nothing but sizes and paths differ
    run = train(cfg)
    assert (run / "checkpoints" / "step-00000001" / "COMPLETE").exists()
    for grid in ("teacher.png", "student-00000001.png"):
        pixels = np.asarray(Image.open(run / "samples" / grid))
        assert pixels.std() > 0, grid  # a real picture, not a blank (NaN) one
    export = export_run(run, ema=cfg.ema)
    assert (export / "model_index.json").is_file() and (export / "unet" / "config.json").is_file()


def test_every_experiment_is_covered():
    assert {
        "koala-1b",
        "koala-700m",
        "koala-700m-24gb",
        "koala-lightning-1b",
        "koala-lightning-700m",
        "koala-turbo-700m",
        "smoke",
        "demo",
    } <= set(SHIPPED)
