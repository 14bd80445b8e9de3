"""SDXL transforms: original size, crop and target recorded exactly as applied (marker pixels), buckets."""

import io
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from koala.config.compose import compose_config
from koala.config.schema import DataConfig, TrainConfig
from koala.data import build_dataloader
from koala.data.buckets import SDXL_BUCKETS_1024, nearest_bucket, sdxl_buckets
from koala.data.transforms import sdxl_transform
from koala.fixtures.shards import write_demo_shards

RED = (255, 0, 0)


def marked(h: int, w: int, y: int, x: int) -> bytes:
    """A black PNG of (h, w) with one red pixel at (y, x)."""
    image = Image.new("RGB", (w, h))
    image.putpixel((x, y), RED)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png(image: Image.Image, **kw) -> bytes:
    """`image` encoded as PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def as_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8, inverting the transform's scaling exactly."""
    return ((pixels + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def transformed(data: bytes, size: int = 8, **kw) -> np.ndarray:
    """The transform's pixels for an image of `size` x `size` at its own size (no resize, no crop)."""
    out = sdxl_transform(data, (size, size), center_crop=True, random_flip=False, rng=random.Random(0), **kw)
    return as_uint8(out.pixels)


def red_at(pixels: torch.Tensor) -> tuple[int, int]:
    """(y, x) of the single red pixel in a (3, H, W) tensor in [-1, 1]."""
    mask = (pixels[0] > 0.9) & (pixels[1] < -0.9)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    assert len(ys) == 1
    return int(ys[0]), int(xs[0])


def test_center_crop_records_original_size_and_crop():
    out = sdxl_transform(marked(32, 48, 5, 30), (32, 32), center_crop=True, random_flip=False, rng=random.Random(0))
    assert out.original_size == (32, 48) and out.target_size == (32, 32) and out.crop_top_left == (0, 8)
    assert red_at(out.pixels) == (5, 30 - 8) and not out.flipped


def test_center_crop_after_resizing_the_shorter_side():
    image = Image.new("RGB", (64, 128))  # (h, w) = (128, 64): resized to (64, 32) for a 32 px target
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    out = sdxl_transform(buf.getvalue(), (32, 32), center_crop=True, random_flip=False, rng=random.Random(0))
    assert out.original_size == (128, 64) and out.crop_top_left == (16, 0) and out.pixels.shape == (3, 32, 32)


@pytest.mark.parametrize("flip", [False, True])
def test_random_crop_and_flip_coordinates_locate_the_marker(flip):
    y, x, h, w = 20, 50, 40, 72  # no resize for a 40 px target: crops move the marker by whole pixels
    seen = set()
    for seed in range(40):
        out = sdxl_transform(marked(h, w, y, x), (40, 40), center_crop=False, random_flip=flip, rng=random.Random(seed))
        top, left = out.crop_top_left
        assert 0 <= left <= w - 40 and top == 0 and out.original_size == (h, w)
        marker_x = (w - 1 - x) if out.flipped else x  # the marker's column in the (mirrored) resized image
        if left <= marker_x < left + 40:
            assert red_at(out.pixels) == (y - top, marker_x - left)
        seen.add(out.flipped)
    assert seen == ({False, True} if flip else {False})


def test_flip_mirrors_the_crop_coordinate_like_diffusers():
    rng = next(random.Random(s) for s in range(100) if _flips(s))
    out = sdxl_transform(marked(32, 48, 3, 40), (32, 32), center_crop=False, random_flip=True, rng=rng)
    unflipped_left = 48 - 32 - out.crop_top_left[1]  # left = resized_width - left - target_width
    assert out.flipped and red_at(out.pixels) == (3, 32 - 1 - (40 - unflipped_left))


def _flips(seed: int) -> bool:
    """Whether this seed flips, with the same draws sdxl_transform makes (crop first, then the flip)."""
    rng = random.Random(seed)
    rng.randint(0, 0), rng.randint(0, 16)
    return rng.random() < 0.5


def test_sdxl_buckets_scale_with_resolution():
    assert (1024, 1024) in SDXL_BUCKETS_1024 and (768, 1344) in SDXL_BUCKETS_1024
    assert sdxl_buckets(1024) == list(SDXL_BUCKETS_1024)
    half = sdxl_buckets(512)
    assert (512, 512) in half and (384, 672) in half and all(h % 32 == 0 and w % 32 == 0 for h, w in half)
    assert nearest_bucket((1080, 1920), sdxl_buckets(1024)) == (768, 1344)
    assert nearest_bucket((500, 500), sdxl_buckets(64)) == (64, 64)


def test_bucketed_batches_hold_one_shape(tmp_path):
    write_demo_shards(tmp_path, n=40, resolution=64, samples_per_shard=20)
    cfg = OmegaConf.structured(
        DataConfig(
            path=f"{tmp_path}/demo-{{00000..00001}}.tar", resolution=64, buckets=True, num_workers=0, resampled=False
        )  # fmt: skip
    )
    shapes = set()
    for batch in build_dataloader(cfg, batch_size=4, seed=0):
        assert (batch["target_size"] == batch["target_size"][0]).all()
        assert tuple(batch["pixel_values"].shape[2:]) == tuple(batch["target_size"][0].tolist())
        shapes.add(tuple(batch["target_size"][0].tolist()))
    assert len(shapes) > 2  # the demo's aspects land in several buckets


def test_16_bit_png_is_scaled_not_clipped():
    gradient = np.arange(8, dtype=np.uint16) * 8224  # 0 .. 57568 of 65535
    image = Image.fromarray(np.tile(gradient, (8, 1)))
    assert image.mode == "I;16"
    pixels = transformed(png(image))
    assert pixels[0, :, 0].tolist() == [0, 32, 64, 96, 128, 160, 192, 224]
    assert (pixels[..., 0] == pixels[..., 2]).all()


def _transparent(mode: str) -> bytes:
    """An 8x8 PNG in `mode`: fully transparent pixels storing red (grey in LA), an opaque blue (black in LA) pixel at
    (0, 0) and a half transparent black one at (0, 1)."""
    if mode == "P":  # palette with a transparent entry (tRNS)
        image = Image.new("P", (8, 8), 0)
        image.putpalette([255, 0, 0, 0, 0, 255, 0, 0, 0])
        image.putpixel((0, 0), 1)
        return png(image, transparency=0)
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    image.putpixel((1, 0), (0, 0, 0, 128))
    return png(image.convert(mode) if mode != "RGBA" else image)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_the_background(mode):
    white = transformed(_transparent(mode))
    assert white[4, 4].tolist() == [255, 255, 255]  # not the stored colour of a transparent pixel
    assert white[0, 0].tolist() == ([0, 0, 255] if mode != "LA" else [29, 29, 29])  # opaque pixels kept
    black = transformed(_transparent(mode), background=(0, 0, 0))
    assert black[4, 4].tolist() == [0, 0, 0]
    if mode != "P":
        assert 126 <= white[0, 1, 0] <= 128 and black[0, 1].tolist() == [0, 0, 0]  # half-transparent black


def test_background_is_a_data_setting(tmp_path):
    (tmp_path / "a.png").write_bytes(_transparent("RGBA"))
    (tmp_path / "a.txt").write_text("a blue dot")
    for colour, expected in (("white", 255), ("'#000000'", 0)):
        cfg = compose_config(
            "train",
            [
                "data=folder",
                f"data.path={tmp_path}",
                "data.resolution=8",
                f"data.background={colour}",
                "data.num_workers=0",
            ],
            schema=TrainConfig,
        )
        batch = next(iter(build_dataloader(cfg.data, batch_size=1, seed=0)))
        assert as_uint8(batch["pixel_values"][0])[4, 4].tolist() == [expected] * 3
    with pytest.raises(ValueError, match=r"data\.background='blu'.*#rrggbb"):
        cfg = compose_config(
            "train", ["data=folder", f"data.path={tmp_path}", "data.background=blu"], schema=TrainConfig
        )
        build_dataloader(cfg.data, batch_size=1, seed=0)


def tiff(image: Image.Image) -> bytes:
    """`image` encoded as TIFF (the format that holds 32-bit float pictures)."""
    buf = io.BytesIO()
    image.save(buf, format="TIFF")
    return buf.getvalue()


def test_32_bit_float_image_in_0_1_is_scaled_not_black():
    gradient = np.arange(8, dtype=np.float32) / 7  # 0 .. 1
    image = Image.fromarray(np.tile(gradient, (8, 1)))
    assert image.mode == "F"
    pixels = transformed(tiff(image))
    assert pixels[0, :, 0].tolist() == [0, 36, 73, 109, 146, 182, 219, 255]  # round(255 * i / 7)
    assert (pixels[..., 0] == pixels[..., 2]).all()


def test_32_bit_float_image_of_unknown_scale_is_skipped_counted_and_explained(tmp_path, caplog):
    import logging

    from test_data import read_all, write_plain_tar

    from koala.data.records import UnsupportedImage

    wide = Image.fromarray(np.full((8, 8), 200.0, dtype=np.float32))  # 0..255 or 0..1? unknown: not guessed
    with pytest.raises(UnsupportedImage, match=r"mode F\) image with values in \[200, 200\]"):
        transformed(tiff(wide))
    ok = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32))
    write_plain_tar(tmp_path / "f.tar", {"a.tif": tiff(wide), "a.txt": b"wide", "b.tif": tiff(ok), "b.txt": b"ok"})
    cfg = OmegaConf.structured(DataConfig(path=str(tmp_path / "f.tar"), resolution=8, num_workers=0,
                                          resampled=False, shuffle=False, image_key="tif"))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="koala.data"):
        batches = read_all(cfg, final_tally=True)
    assert [k for b in batches if "keys" in b for k in b["keys"]] == ["b"]
    assert batches[-1]["skipped"]["unsupported_image"] == 1
    assert "skipping a: a 32-bit float (mode F) image with values in [200, 200]" in caplog.text
