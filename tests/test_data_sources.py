"""HF datasets (save_to_disk, parquet) and image folders read into the same batches as shards."""

import io

import pytest
from omegaconf import OmegaConf
from PIL import Image

from koala.config.schema import DataConfig
from koala.data import build_dataloader


def png(h: int, w: int, colour=(10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def read_keys_and_captions(cfg, **kw) -> dict:
    out = {}
    for batch in build_dataloader(cfg, batch_size=2, seed=0, **kw):
        assert batch["pixel_values"].shape[1:] == (3, 16, 16)
        out.update(zip(batch["keys"], batch["captions"]))
    return out


@pytest.fixture
def hf_dataset():
    import datasets

    rows = {"image": [Image.new("RGB", (20 + i, 24), (i * 40, 0, 0)) for i in range(5)],
            "text": [f"caption {i}" for i in range(5)]}  # fmt: skip
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict(rows, features=features)


def test_hf_save_to_disk(tmp_path, hf_dataset):
    hf_dataset.save_to_disk(str(tmp_path / "ds"))
    cfg = OmegaConf.structured(DataConfig(kind="hf", path=str(tmp_path / "ds"), caption_key="text", resolution=16,
                                          num_workers=0, resampled=False))  # fmt: skip
    assert read_keys_and_captions(cfg) == {str(i): f"caption {i}" for i in range(5)}
    two = [read_keys_and_captions(cfg, rank=r, world_size=2) for r in range(2)]
    assert not set(two[0]) & set(two[1]) and len(two[0]) + len(two[1]) == 5


def test_hf_parquet_and_bad_column(tmp_path, hf_dataset):
    hf_dataset.to_parquet(str(tmp_path / "train.parquet"))
    cfg = OmegaConf.structured(DataConfig(kind="hf", path=str(tmp_path / "train.parquet"), caption_key="text",
                                          resolution=16, num_workers=0, resampled=False))  # fmt: skip
    assert len(read_keys_and_captions(cfg)) == 5
    with pytest.raises(KeyError, match="columns: image, text"):
        read_keys_and_captions(OmegaConf.merge(cfg, {"caption_key": "caption"}))


def test_folder_with_sidecar_captions(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, caption in [("a", "first"), ("b", None), ("sub/c", "third")]:
        (tmp_path / f"{name}.png").write_bytes(png(18, 30))
        if caption:
            (tmp_path / f"{name}.txt").write_text(caption + "\n")
    (tmp_path / "broken.jpg").write_bytes(b"garbage")
    (tmp_path / "broken.txt").write_text("never decoded")
    cfg = OmegaConf.structured(DataConfig(kind="folder", path=str(tmp_path), resolution=16, num_workers=0,
                                          resampled=False))  # fmt: skip
    batches = list(build_dataloader(cfg, batch_size=8, seed=0))
    assert dict(zip(batches[0]["keys"], batches[0]["captions"])) == {"a": "first", "sub/c": "third"}
    assert batches[-1]["skipped"]["missing_caption"] == 1 and batches[-1]["skipped"]["corrupt_image"] == 1
