"""The latent cache: `koala.cache` writes safetensors shards that read back equal to the online conditioning."""

import tarfile

import pytest
import torch
from omegaconf import OmegaConf

from koala.cache import build_cache
from koala.conditioning import SDXLConditioner
from koala.data import build_dataloader
from koala.data.demo import write_demo_shards
from koala.hydra_utils import compose_config


@pytest.fixture(scope="module")
def cache_setup(tmp_path_factory, tiny_pipeline_dir):
    root = tmp_path_factory.mktemp("cache")
    write_demo_shards(root / "shards", n=10, resolution=32, samples_per_shard=5)
    shards = f"{root}/shards/demo-{{00000..00001}}.tar"
    cfg = compose_config("cache", [
        f"data.path='{shards}'", "data.create_demo=false", "data.resolution=32", "data.random_flip=true",
        "data.center_crop=false", f"teacher.pipeline={tiny_pipeline_dir}", "teacher.create_tiny=false",
        f"cache.out={root}/latents", "cache.dtype=fp32", "cache.batch_size=4", "cache.samples_per_shard=4",
    ])  # fmt: skip
    return cfg, build_cache(cfg)


def test_cache_holds_safetensors_shards_only(cache_setup):
    _, out = cache_setup
    shards = sorted(out.glob("*.tar"))
    assert [p.name for p in shards] == ["000-00000.tar", "000-00001.tar", "000-00002.tar"]
    names = [m.name for p in shards for m in tarfile.open(p).getmembers()]
    assert len(names) == 10 and all(n.endswith(".safetensors") for n in names)
    assert (out / "empty_prompt.safetensors").exists() and not list(out.glob("*.tmp"))


def test_cached_batches_equal_the_online_conditioning(cache_setup, tiny_pipeline_dir):
    cfg, out = cache_setup
    online_cfg = OmegaConf.merge(cfg.data, {"resampled": False, "shuffle": False, "num_workers": 0})
    cached_cfg = OmegaConf.merge(online_cfg, {"kind": "cached", "path": str(out)})
    conditioner = SDXLConditioner.from_pretrained(tiny_pipeline_dir)
    online = {}
    for batch in build_dataloader(online_cfg, batch_size=3, seed=cfg.seed):
        cond = conditioner(batch)
        online.update({k: {n: v[i] for n, v in cond.items()} for i, k in enumerate(batch["keys"])})
    cached = list(build_dataloader(cached_cfg, batch_size=4, seed=0))
    assert sum(len(b["keys"]) for b in cached) == 10 and set(cached[0]) >= {"latents", "time_ids", "skipped"}
    for batch in cached:
        assert batch["latents"].shape[1:] == (4, 16, 16) and batch["prompt_embeds"].shape[1:] == (77, 64)
        for i, key in enumerate(batch["keys"]):
            for name in ("latents", "prompt_embeds", "pooled_prompt_embeds", "time_ids"):
                torch.testing.assert_close(batch[name][i], online[key][name], atol=1e-5, rtol=1e-5)
        assert conditioner(batch)["latents"] is not None  # passes through: no VAE, no text encoder


def test_cached_caption_dropout_marks_samples_for_the_conditioner(cache_setup, tiny_pipeline_dir):
    _, out = cache_setup
    cfg = compose_config("train", ["data=cached", f"data.path={out}", "data.caption_dropout=1.0"])
    batch = next(iter(build_dataloader(cfg.data, batch_size=2, seed=0)))
    assert batch["dropped"].all() and batch["prompt_embeds"].any()  # the cache keeps the real embeddings
    cond = SDXLConditioner.from_pretrained(tiny_pipeline_dir)(batch)
    assert not cond["prompt_embeds"].any() and not cond["pooled_prompt_embeds"].any()  # zeros, the default
