"""The latent cache: `koala.cache` writes safetensors shards that read back equal to the online conditioning."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load

from koala.cache import CacheJobConfig  # the command's schema (koala_cache)
from koala.config.compose import compose_config
from koala.config.schema import TrainConfig
from koala.data import build_dataloader
from koala.data.cache_writer import build_cache
from koala.data.conditioning import CachedConditioner, SDXLConditioner
from koala.fixtures.shards import write_demo_shards
from koala.train.build import load_frozen


@pytest.fixture(scope="module")
def cache_setup(tmp_path_factory, tiny_pipeline_dir):
    root = tmp_path_factory.mktemp("cache")
    write_demo_shards(root / "shards", n=10, resolution=32, samples_per_shard=5)
    shards = f"{root}/shards/demo-{{00000..00001}}.tar"
    cfg = compose_config("cache", [
        f"data.path='{shards}'", "data.resolution=32", "data.random_flip=true",
        "data.center_crop=false", f"teacher.pipeline={tiny_pipeline_dir}",
        f"cache.out={root}/latents", "cache.dtype=fp32", "cache.batch_size=4", "cache.samples_per_shard=4",
    ], schema=CacheJobConfig)  # fmt: skip
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
    cfg = compose_config("train", ["data=cached", f"data.path={out}", "data.caption_dropout=1.0"], schema=TrainConfig)
    batch = next(iter(build_dataloader(cfg.data, batch_size=2, seed=0)))
    assert batch["dropped"].all() and batch["prompt_embeds"].any()  # the cache keeps the real embeddings
    cond = SDXLConditioner.from_pretrained(tiny_pipeline_dir)(batch)
    assert not cond["prompt_embeds"].any() and not cond["pooled_prompt_embeds"].any()  # zeros, the default


def test_training_on_a_cache_loads_no_text_encoder_and_no_vae(cache_setup, tiny_pipeline_dir):
    _, out = cache_setup
    args = ["data=cached", f"data.path={out}", "data.caption_dropout=0.5", f"teacher.pipeline={tiny_pipeline_dir}"]
    conditioner = load_frozen(compose_config("train", args, schema=TrainConfig), torch.device("cpu"))[0]
    assert isinstance(conditioner, CachedConditioner) and not list(conditioner.parameters())
    full = SDXLConditioner.from_pretrained(tiny_pipeline_dir)
    assert conditioner.vae_scale_factor == full.vae_scale_factor == 2
    batches = iter(build_dataloader(compose_config("train", args, schema=TrainConfig).data, batch_size=4, seed=0))
    dropped = set()
    for batch in (next(batches) for _ in range(4)):
        dropped |= set(batch["dropped"].tolist())
        lean, reference = conditioner(batch), full(batch)
        assert lean.keys() == reference.keys()
        for k in lean:
            assert torch.equal(lean[k], reference[k]), k
    assert dropped == {True, False}  # both branches were compared
    with pytest.raises(ValueError, match="cached batches only"):
        conditioner({"pixel_values": torch.zeros(1, 3, 32, 32), "captions": ["x"]})
    empty = load_frozen(
        compose_config("train", [*args, "data.caption_dropout_mode=empty"], schema=TrainConfig), torch.device("cpu")
    )[0]
    assert isinstance(empty, SDXLConditioner)  # encodes "" for dropped samples: keeps its text encoders


def _png(w: int, h: int) -> bytes:
    """A grey PNG of w x h."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 150)).save(buf, format="PNG")
    return buf.getvalue()


SOURCE = [  # shard -> (key, image, caption): odd member names, samples to skip, a 4097 px wide image
    [
        ("/abs/dir/cat", _png(40, 40), "a cat"),
        ("../../up/dog", _png(40, 40), "a dog"),
        ("nocap1", _png(40, 40), None),
        ("./dot.dir/x", _png(40, 40), "an x"),
        ("nocap2", _png(40, 40), None),
    ],
    [
        ("wide", _png(4097, 8), "a strip"),
        ("broken", b"not an image", "broken"),
        ("nocap3", _png(40, 40), None),
        ("plain", _png(40, 40), "plain"),
    ],  # skips after a worker's last batch reach no batch: none here
]


@pytest.fixture(scope="module")
def hostile_cache(tmp_path_factory, tiny_pipeline_dir):
    """A cache of hand-made shards, written with two loader workers (one shard each) and fp16 storage."""
    root = tmp_path_factory.mktemp("hostile")
    for i, samples in enumerate(SOURCE):
        with tarfile.open(root / f"src-{i}.tar", "w") as tar:
            for key, image, caption in samples:
                for ext, data in (("png", image), ("txt", caption.encode() if caption else None)):
                    if data is not None:
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    cfg = compose_config("cache", [
        f"data.path='{root}/src-{{0..1}}.tar'", "data.resolution=32", "data.num_workers=2",
        f"teacher.pipeline={tiny_pipeline_dir}", f"cache.out={root}/latents",
        "cache.dtype=fp16", "cache.batch_size=2",
    ], schema=CacheJobConfig)  # fmt: skip
    return cfg, build_cache(cfg)


def test_cache_member_names_are_clean_relative_paths(hostile_cache):
    cfg, out = hostile_cache
    names = [m.name for p in sorted(out.glob("*.tar")) for m in tarfile.open(p).getmembers()]
    assert sorted(names) == sorted(f"{n}.safetensors" for n in ("abs/dir/cat", "up/dog", "dot_dir/x", "wide", "plain"))
    cached_cfg = OmegaConf.merge(cfg.data, {"kind": "cached", "path": str(out), "num_workers": 0, "resampled": False})
    keys = [k for batch in build_dataloader(cached_cfg, batch_size=2, seed=0) for k in batch["keys"]]
    assert sorted(keys) == sorted(["/abs/dir/cat", "../../up/dog", "./dot.dir/x", "wide", "plain"])  # as the source


def test_cache_counts_the_skips_of_every_worker(hostile_cache):
    _, out = hostile_cache
    info = json.loads((out / "info-000.json").read_text())
    assert info["samples"] == 5
    assert info["skipped"] == {"corrupt_image": 1, "unsupported_image": 0, "missing_caption": 3, "too_small": 0,
                               "bad_shard": 0}  # fmt: skip
    marker = json.loads((out / "cache.json").read_text())
    assert marker["samples"] == 5 and marker["skipped"] == info["skipped"]
    assert marker["shards"] == sorted(p.name for p in out.glob("*.tar"))


def test_cache_keeps_time_ids_exact_at_any_size(hostile_cache):
    _, out = hostile_cache
    blobs = {m.name: t.extractfile(m).read() for p in out.glob("*.tar") for t in [tarfile.open(p)] for m in t}
    wide = load(blobs["wide.safetensors"])
    assert wide["latents"].dtype == torch.float16 and wide["time_ids"].dtype == torch.float32
    # original (h, w) = (8, 4097); resized to (32, 16388) and centre-cropped at left 8178: not representable in fp16
    assert wide["time_ids"].tolist() == [8, 4097, 0, 8178, 32, 32]


def cache_config(root, tiny_pipeline_dir, source: str, *extra: str):
    """A `koala.cache` config of `source` shards at 32 px into `root/latents`."""
    return compose_config("cache", [
        f"data.path='{source}'", "data.resolution=32", "data.num_workers=0", f"teacher.pipeline={tiny_pipeline_dir}",
        f"cache.out={root}/latents", "cache.batch_size=4", *extra,
    ], schema=CacheJobConfig)  # fmt: skip


def train_config(tiny_pipeline_dir, cache):
    return compose_config("train", ["data=cached", f"data.path={cache}", "data.resolution=32", "data.resampled=false",
                                    f"teacher.pipeline={tiny_pipeline_dir}", "output_dir=unused"],
                          schema=TrainConfig)  # fmt: skip


def test_a_stopped_or_mixed_cache_is_refused_and_recaching_replaces_only_koala_files(
    tmp_path, tiny_pipeline_dir, monkeypatch
):
    from koala.config.checks import ConfigError, check_config
    from koala.data import cache_writer

    write_demo_shards(tmp_path / "src", n=12, resolution=32, samples_per_shard=4)
    source = f"{tmp_path}/src/demo-{{00000..00002}}.tar"
    cfg = cache_config(tmp_path, tiny_pipeline_dir, source, "cache.samples_per_shard=4")
    calls = []

    def stopped(*args):  # the process dies after its first shard is on disk (nothing runs after a SIGKILL either)
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(cache_writer.write_batch.__wrapped__(*args))

    stopped.__wrapped__ = cache_writer.write_batch
    with monkeypatch.context() as m:
        m.setattr(cache_writer, "write_batch", stopped)
        with pytest.raises(KeyboardInterrupt):
            build_cache(cfg)
    out = tmp_path / "latents"
    assert sorted(p.name for p in out.glob("*.tar")) == ["000-00000.tar", "000-00001.tar"]  # 8 of 12 samples
    with pytest.raises(ConfigError, match="holds no cache.json: the cache is incomplete"):
        check_config(train_config(tiny_pipeline_dir, out))  # before: trained on 8 of 12 samples, silently
    with pytest.raises(ConfigError, match="already holds a koala cache or part of one.*cache.overwrite=true"):
        build_cache(cfg)
    (out / "notes.txt").write_text("mine")
    build_cache(cache_config(tmp_path, tiny_pipeline_dir, source, "cache.samples_per_shard=12", "cache.overwrite=true"))
    assert sorted(p.name for p in out.iterdir()) == [
        "000-00000.tar",
        "cache.json",
        "empty_prompt.safetensors",
        "info-000.json",
        "notes.txt",
    ]  # the old shards are gone (before: kept, and trained on with the new ones); the user's file stays
    check_config(train_config(tiny_pipeline_dir, out))
    keys = [k for b in build_dataloader(train_config(tiny_pipeline_dir, out).data, batch_size=4, seed=0)
            for k in b["keys"]]  # fmt: skip
    assert sorted(keys) == [f"{i:08d}" for i in range(12)]
    (out / "000-00007.tar").write_bytes((out / "000-00000.tar").read_bytes())  # a shard the cache did not write
    with pytest.raises(ConfigError, match=r"holds shards its cache did not write \(000-00007.tar\)"):
        check_config(train_config(tiny_pipeline_dir, out))


def test_cache_counts_a_bad_shard_after_the_last_batch(tmp_path, tiny_pipeline_dir):
    write_demo_shards(tmp_path / "src", n=4, resolution=32, samples_per_shard=4)
    (tmp_path / "src" / "demo-00001.tar").write_bytes(b"not a tar at all" * 64)  # read after the last batch
    cfg = cache_config(tmp_path, tiny_pipeline_dir, f"{tmp_path}/src/demo-{{00000..00001}}.tar")
    out = build_cache(cfg)
    info = json.loads((out / "info-000.json").read_text())
    assert info["samples"] == 4 and info["skipped"]["bad_shard"] == 1  # before: 0


@pytest.mark.slow
def test_two_cpu_processes_each_cache_their_own_share(cache_setup, tmp_path):
    import subprocess
    from pathlib import Path

    from conftest import two_process_launch

    cfg, single = cache_setup
    args = [f"data.path='{cfg.data.path}'", "data.resolution=32", f"teacher.pipeline={cfg.teacher.pipeline}",
            f"cache.out={tmp_path / 'latents'}", "cache.dtype=fp32", "cache.samples_per_shard=4"]  # fmt: skip
    repo = Path(__file__).resolve().parent.parent
    res = subprocess.run(
        two_process_launch("koala.cache", *args), capture_output=True, text=True, cwd=repo, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    infos = [json.loads((tmp_path / "latents" / f"info-{r:03d}.json").read_text()) for r in (0, 1)]
    names = [m.name for p in (tmp_path / "latents").glob("*.tar") for m in tarfile.open(p).getmembers()]
    assert infos[0]["samples"] > 0 and infos[1]["samples"] > 0  # two ranks, not two copies of rank 0
    assert sorted(names) == sorted(m.name for p in single.glob("*.tar") for m in tarfile.open(p).getmembers())


def test_cache_encodes_in_conditioning_dtype_and_training_refuses_another(cache_setup, tiny_pipeline_dir, tmp_path):
    from koala.config.checks import ConfigError, check_config
    from koala.data.conditioning import conditioning_dtype

    cfg, out = cache_setup  # conditioning.dtype=auto on CPU: fp32
    assert json.loads((out / "info-000.json").read_text())["conditioning_dtype"] == "fp32"
    bf16 = build_cache(OmegaConf.merge(cfg, {"conditioning": {"dtype": "bf16"}, "cache": {"out": str(tmp_path)}}))
    assert json.loads((bf16 / "info-000.json").read_text())["conditioning_dtype"] == "bf16"
    embeds = {}
    for path, dtype in ((out, torch.float32), (bf16, torch.bfloat16)):  # the cached embeddings are those encoders'
        cached_cfg = OmegaConf.merge(cfg.data, {"kind": "cached", "path": str(path), "num_workers": 0})
        batch = next(iter(build_dataloader(cached_cfg, batch_size=4, seed=0)))
        encoders = SDXLConditioner.from_pretrained(tiny_pipeline_dir, dtype=dtype)
        expected = encoders.encode_prompts([c["caption"] for c in batch_captions(path, batch["keys"])])[0]
        torch.testing.assert_close(batch["prompt_embeds"], expected.float(), rtol=0, atol=0)
        embeds[dtype] = batch["prompt_embeds"]
    assert not torch.equal(embeds[torch.float32], embeds[torch.bfloat16])

    args = ["data=cached", f"data.path={out}", f"teacher.pipeline={tiny_pipeline_dir}", "data.resolution=32"]
    check_config(compose_config("train", args, schema=TrainConfig))  # auto: the cache's precision
    assert (
        conditioning_dtype(compose_config("train", args, schema=TrainConfig), "cuda") == "fp32"
    )  # even where auto would say fp16
    check_config(compose_config("train", [*args, "conditioning.dtype=fp32"], schema=TrainConfig))
    with pytest.raises(ConfigError, match="conditioning.dtype=bf16 differs from the cache's: .* encoded in fp32"):
        check_config(compose_config("train", [*args, "conditioning.dtype=bf16"], schema=TrainConfig))
    (out / "info-001.json").write_text(json.dumps({"conditioning_dtype": "bf16"}))  # a second rank's, of another
    try:
        with pytest.raises(ConfigError, match=r"mixes conditioning precisions \['bf16', 'fp32'\]"):
            check_config(compose_config("train", args, schema=TrainConfig))
    finally:
        (out / "info-001.json").unlink()


def batch_captions(cache: Path, keys: list[str]) -> list[dict]:
    """The metadata (caption, sizes) a cache recorded for each of `keys`."""
    from koala.data.cached import decode_meta

    metas = [decode_meta(t.extractfile(m).read()) for p in cache.glob("*.tar") for t in [tarfile.open(p)] for m in t]
    by_key = {m["key"]: m for m in metas}
    return [by_key[k] for k in keys]
