"""Sampling with presets and per-image seeds; grids."""

import json

import numpy as np
import pytest
from PIL import Image

from koala.generate import main
from koala.ship.presets import get_preset
from koala.ship.sampling import generate, load_pipeline, make_grid


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return load_pipeline(tiny_pipeline_dir, device="cpu")


def test_presets():
    assert (get_preset("base").steps, get_preset("base").guidance, get_preset("base").timestep_spacing) == (
        25,
        7.5,
        None,
    )
    assert (get_preset("lightning").steps, get_preset("lightning").guidance) == (10, 3.5)
    assert get_preset("turbo").guidance == 0.0 and get_preset("turbo").timestep_spacing == "trailing"
    for name in ("fast", "v1"):  # v1: the base preset's name before issue 23, refused naming the choices
        with pytest.raises(
            ValueError, match=f"'{name}' is not a valid PresetName: expected one of base, lightning, turbo"
        ):
            get_preset(name)


def test_seeds_are_per_image(pipe):
    prompts = ["a koala", "a red car", "a koala"]
    kw = dict(steps=2, height=32, width=32)
    batched = generate(pipe, prompts, "lightning", seeds=5, batch_size=3, **kw)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    single = generate(pipe, prompts[1:], "lightning", seeds=[6, 7], **kw)
    a, b = (np.asarray(x, dtype=np.int16) for x in (batched[1], single[0]))
    assert np.abs(a - b).max() <= 2  # same seed, same image, whatever the batch
    assert np.abs(np.asarray(batched[0], dtype=np.int16) - np.asarray(batched[2], dtype=np.int16)).max() > 2


def test_make_grid():
    imgs = [Image.new("RGB", (8, 6), c) for c in ("red", "green", "blue")]
    grid = make_grid(imgs, cols=2)
    assert grid.size == (16, 12) and grid.getpixel((9, 0)) == (0, 128, 0) and grid.getpixel((9, 7)) == (255, 255, 255)
    assert make_grid(imgs).size == (16, 12)


def test_cli_writes_images_and_grid(tiny_pipeline_dir, tmp_path):
    (tmp_path / "p.txt").write_text("# prompts\na koala\n\na red car\n")
    out = main(
        [
            f"model={tiny_pipeline_dir}",
            f"prompts={tmp_path / 'p.txt'}",
            "preset=turbo",
            "seed=3",
            "steps=1",
            "height=32",
            "width=32",
            "device=cpu",
            f"out={tmp_path / 'out'}",
        ]
    )
    index = json.loads((out / "index.json").read_text())
    assert [(r["prompt"], r["seed"]) for r in index] == [("a koala", 3), ("a red car", 4)]
    assert Image.open(out / "grid.png").size == (64, 32)
    assert Image.open(out / index[0]["file"]).size == (32, 32)
