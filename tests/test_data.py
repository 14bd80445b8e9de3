"""Readers: webdataset and img2dataset-style tar shards, robustness, rank/worker splits, exact resume."""

import io
import json
import logging
import tarfile

import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from koala.config.checks import check_config
from koala.config.compose import compose_config
from koala.config.schema import DataConfig, TrainConfig
from koala.data import DataKind, SkipTally, build_dataloader
from koala.data.samples import ImageCodec
from koala.data.stream import TooManySkips
from koala.fixtures.shards import ensure_demo_shards, write_demo_shards


def encode(size=(40, 48), fmt="PNG", colour=(200, 30, 30)) -> bytes:
    """An encoded solid image of (h, w) `size`."""
    buf = io.BytesIO()
    Image.new("RGB", (size[1], size[0]), colour).save(buf, format=fmt)
    return buf.getvalue()


def write_plain_tar(path, members: dict[str, bytes]) -> str:
    """A tar written with `tarfile`, as img2dataset writes shards."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def data_cfg(path, **kw):
    base = dict(path=str(path), resolution=32, num_workers=0, resampled=False, shuffle=False)
    return OmegaConf.structured(DataConfig(**{**base, **kw}))


def read_all(cfg, batch_size=4, **kw) -> list[dict]:
    return list(build_dataloader(cfg, batch_size=batch_size, seed=0, **kw))


def test_webdataset_writer_and_plain_tar_shards_both_read(tmp_path):
    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"a{i}", "png": encode(), "txt": f"wds {i}"})
    meta = {"caption": "plain json", "llava_caption": "a long llava caption"}
    write_plain_tar(tmp_path / "b.tar", {
        "b0.jpg": encode(fmt="JPEG"), "b0.txt": b"plain 0", "b0.json": json.dumps(meta).encode(),
        "b1.webp": encode(fmt="WEBP"), "b1.txt": b"plain 1", "b1.json": json.dumps(meta).encode(),
    })  # fmt: skip
    batches = read_all(data_cfg(f"{tmp_path}/{{a,b}}.tar"))
    captions = dict(zip(sum((b["keys"] for b in batches), []), sum((b["captions"] for b in batches), [])))
    assert captions == {"a0": "wds 0", "a1": "wds 1", "a2": "wds 2", "b0": "plain 0", "b1": "plain 1"}
    assert batches[0]["pixel_values"].shape[1:] == (3, 32, 32) and batches[0]["pixel_values"].dtype == torch.float32
    assert -1 <= batches[0]["pixel_values"].min() and batches[0]["pixel_values"].max() <= 1

    llava = read_all(data_cfg(tmp_path / "b.tar", caption_key="json.llava_caption"))
    assert llava[0]["captions"] == ["a long llava caption"] * 2


def test_bad_samples_and_shards_are_skipped_counted_and_reported(tmp_path, caplog):
    good = encode((40, 40))
    write_plain_tar(tmp_path / "s0.tar", {
        "ok0.png": good, "ok0.txt": b"fine",
        "corrupt.jpg": b"not an image at all", "corrupt.txt": b"broken",
        "nocap.png": good, "nocap.json": b'{"other": 1}',
        "small.png": encode((8, 8)), "small.txt": b"tiny",
        "ok1.png": good, "ok1.txt": b"fine too",
    })  # fmt: skip
    truncated = (tmp_path / "s0.tar").read_bytes()[:1536]  # a header and part of a member: a cut-off download
    (tmp_path / "s1.tar").write_bytes(truncated + b"\x07" * 100)
    paths = f"{tmp_path}/s{{0..1}}.tar::{tmp_path}/missing.tar"
    with caplog.at_level(logging.WARNING, logger="koala.data"):
        batches = read_all(data_cfg(paths, min_size=16), batch_size=8)
    keys = sum((b["keys"] for b in batches), [])
    assert sorted(keys)[:2] == ["ok0", "ok1"] and "corrupt" not in keys and "small" not in keys
    skipped = batches[-1]["skipped"]
    assert skipped["missing_caption"] == 1 and skipped["too_small"] == 1
    assert skipped["corrupt_image"] == 1 and skipped["bad_shard"] == 2
    assert "missing.tar" in caplog.text and "s1.tar" in caplog.text


def test_two_ranks_two_workers_see_disjoint_samples_covering_the_data(tmp_path):
    write_demo_shards(tmp_path, n=40, resolution=32, samples_per_shard=5)  # 8 shards
    cfg = data_cfg(f"{tmp_path}/demo-{{00000..00007}}.tar", num_workers=2, shuffle=True, shuffle_buffer=4)
    seen = [sum((b["keys"] for b in read_all(cfg, 3, rank=r, world_size=2)), []) for r in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"{i:08d}" for i in range(40)]
    assert len(set(seen[0])) == len(seen[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly_without_decoding_skipped_batches(tmp_path, workers, monkeypatch):
    write_demo_shards(tmp_path, n=24, resolution=32, samples_per_shard=6)
    cfg = data_cfg(
        f"{tmp_path}/demo-{{00000..00003}}.tar", resampled=True, shuffle=True, shuffle_buffer=8, num_workers=workers,
        center_crop=False, random_flip=True, caption_dropout=0.3, buckets=True,
    )  # fmt: skip

    def take(n, resume=0):
        it = iter(build_dataloader(cfg, batch_size=3, seed=7, resume_batches=resume))
        return [next(it) for _ in range(n)]

    full = take(9)
    decoded = []
    if workers == 0:  # count decodes in this process
        original = ImageCodec.decode
        monkeypatch.setattr(ImageCodec, "decode", lambda self, *a: decoded.append(1) or original(self, *a))
    resumed = take(4, resume=5)
    for a, b in zip(full[5:], resumed):
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["crop_top_left"], b["crop_top_left"]) and a["skipped"] == b["skipped"]
    if workers == 0:
        assert len(decoded) == 4 * 3


def test_demo_shards_written_once_atomically(tmp_path):
    pattern = f"{tmp_path}/d/demo-{{00000..00002}}.tar"
    paths = ensure_demo_shards(pattern, n=9, resolution=32)
    stamps = [p.stat().st_mtime_ns for p in map(__import__("pathlib").Path, paths)]
    assert ensure_demo_shards(pattern, n=9, resolution=32) == paths
    assert [p.stat().st_mtime_ns for p in map(__import__("pathlib").Path, paths)] == stamps
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["demo-00000.tar", "demo-00001.tar", "demo-00002.tar"]
    cfg = data_cfg(pattern)
    batches = read_all(cfg)
    assert sum(len(b["keys"]) for b in batches) == 9
    assert all(" on " in c and c.endswith("background") for b in batches for c in b["captions"])


def test_fixtures_cli_writes_the_teacher_and_the_shards(tmp_path, capsys):
    from koala.fixtures.__main__ import main

    written = main([f"pipeline={tmp_path}/tiny", f"shards='{tmp_path}/d/demo-{{0..2}}.tar'", "n=5", "resolution=16"])
    assert len(list((tmp_path / "d").glob("demo-*.tar"))) == 3 and (tmp_path / "tiny" / "model_index.json").is_file()
    assert capsys.readouterr().out.split() == written
    cfg = compose_config(
        "train",
        [f"teacher.pipeline={tmp_path}/tiny", f"data.path='{tmp_path}/d/demo-{{0..2}}.tar'"],
        schema=TrainConfig,
    )
    check_config(cfg)  # the trainer reads what the fixtures wrote


def test_skip_tally_sums_latest_counts_per_worker():
    tally = SkipTally()
    tally.update({"worker_id": 0, "skipped": {"corrupt_image": 1, "too_small": 0}})
    tally.update({"worker_id": 1, "skipped": {"corrupt_image": 2, "too_small": 1}})
    tally.update({"worker_id": 0, "skipped": {"corrupt_image": 3, "too_small": 0}})
    assert tally.totals()["corrupt_image"] == 5 and tally.totals()["too_small"] == 1


def test_unknown_kind_names_the_valid_kinds(tmp_path):
    with pytest.raises(ValueError, match=", ".join(DataKind)):  # the schema refuses it
        read_all(data_cfg(tmp_path, kind="lmdb"))
    with pytest.raises(ValueError, match=", ".join(DataKind)):  # and so does the loader given a plain config
        read_all(OmegaConf.create({**OmegaConf.to_container(data_cfg(tmp_path)), "kind": "lmdb"}))


def test_presets_compose():
    from koala.config.compose import compose_config

    for preset in ("demo", "webdataset", "laion-pop", "hf", "folder", "cached"):
        cfg = compose_config("train", [f"data={preset}"], schema=TrainConfig)
        assert cfg.data.kind in list(DataKind)
    assert compose_config("train", ["data=laion-pop"], schema=TrainConfig).data.caption_key == "json.llava_caption"


def test_data_bench_prints_side_by_side_rates(capsys):
    from koala.bench.data import main

    main(["bench.n=4", "bench.resolution=32", "bench.batch_size=2"])
    out = capsys.readouterr().out
    assert "read + decode + SDXL transform" in out and "read cached latents" in out


@pytest.mark.parametrize("seed", range(8))
def test_resampled_ranks_never_share_a_shard(tmp_path, seed):
    # The guarantee: with at least as many shards as global workers, each worker resamples only its own shards.
    write_demo_shards(tmp_path, n=24, resolution=32, samples_per_shard=6)  # 4 shards, 2 ranks x 1 worker
    cfg = data_cfg(f"{tmp_path}/demo-{{00000..00003}}.tar", resampled=True, shuffle=True, shuffle_buffer=4)
    seen = []
    for rank in range(2):
        it = iter(build_dataloader(cfg, batch_size=3, seed=seed, rank=rank, world_size=2))
        seen.append({k for _ in range(12) for k in next(it)["keys"]})
    assert not seen[0] & seen[1]


def test_skips_after_the_last_batch_reach_the_totals(tmp_path):
    write_demo_shards(tmp_path, n=8, resolution=32, samples_per_shard=4)
    (tmp_path / "demo-00002.tar").write_bytes(b"not a tar at all")  # the last shard is unreadable
    cfg = data_cfg(f"{tmp_path}/demo-{{00000..00002}}.tar", num_workers=2)
    tally = SkipTally()
    batches = list(tally.batches(build_dataloader(cfg, batch_size=4, seed=0, final_tally=True)))
    assert sum(len(b["keys"]) for b in batches) == 8 and tally.totals()["bad_shard"] == 1
    assert all("tally_only" not in b for b in read_all(cfg))  # only asked-for tally items are sent


def noisy_jpeg(size: int = 64, seed: int = 0) -> bytes:
    """A JPEG of random pixels (large enough that half of it holds the whole header)."""
    buf = io.BytesIO()
    rng = torch.Generator().manual_seed(seed)
    Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=rng, dtype=torch.uint8).numpy()).save(buf, "JPEG")
    return buf.getvalue()


def test_images_whose_data_does_not_decode_count_toward_the_skip_limit(tmp_path, caplog):
    whole = noisy_jpeg()
    cut = whole[: len(whole) // 2]  # the header reads (the cheap check passes), the data does not
    write_plain_tar(
        tmp_path / "cut.tar", {n: d for i in range(5) for n, d in ((f"c{i}.jpg", cut), (f"c{i}.txt", b"a"))}
    )
    cfg = data_cfg(tmp_path / "cut.tar", max_consecutive_skips=12, epochs=10)  # 50 records, none decodes
    with caplog.at_level(logging.WARNING, logger="koala.data"), pytest.raises(TooManySkips) as err:
        read_all(cfg)  # before: no batch, no error, no log line (an endless silent loop when resampled)
    assert "12 samples in a row were skipped (corrupt_image=12)" in str(err.value)
    assert "does not decode" in caplog.text
    good = encode((40, 40))
    write_plain_tar(tmp_path / "mix.tar", {"a.png": good, "a.txt": b"a", "b.jpg": cut, "b.txt": b"b",
                                           "c.png": good, "c.txt": b"c"})  # fmt: skip
    tally = SkipTally()
    keys = [k for b in tally.batches(read_all(data_cfg(tmp_path / "mix.tar"), final_tally=True)) for k in b["keys"]]
    assert keys == ["a", "c"] and tally.totals()["corrupt_image"] == 1
