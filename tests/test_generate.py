"""Sampling with presets and per-image seeds; grids."""

import json

import numpy as np
import pytest
from PIL import Image

from koala.generate import main
from koala.ship.presets import PRESETS, get_preset, preset_scheduler, shipped_scheduler_config
from koala.ship.sampling import generate, load_pipeline, make_grid


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return load_pipeline(tiny_pipeline_dir, device="cpu")


def test_presets():
    base = get_preset("base")
    assert (base.steps, base.guidance, base.timestep_spacing) == (25, 7.5, None)
    assert (get_preset("lightning").steps, get_preset("lightning").guidance) == (10, 3.5)
    assert get_preset("turbo").guidance == 0.0 and get_preset("turbo").timestep_spacing == "trailing"
    for name in ("fast", "v1"):  # v1: the base preset's name before issue 23, refused naming the choices
        with pytest.raises(ValueError, match=f"'{name}' is not a valid PresetName: expected one of base, lightning"):
            get_preset(name)


@pytest.mark.parametrize("kind", list(PRESETS))
def test_each_preset_samples_as_its_teacher_ships(kind):
    """The preset of a teacher kind, applied to the scheduler config a student's pipeline carries (SDXL-Base's: the
    export copies the teacher folder's), gives the scheduler the teacher's release ships: class, spacing, betas,
    timesteps, sigmas and the same step (ancestral noise included) from the same generator."""
    import diffusers
    import torch

    shipped = shipped_scheduler_config(kind)
    assert shipped["_source"]  # where the data came from
    preset = get_preset(kind)
    ours = preset_scheduler(shipped_scheduler_config("base"), preset)
    theirs = getattr(diffusers, shipped["_class_name"]).from_config(shipped)
    assert type(ours) is type(theirs)
    keys = ("timestep_spacing", "beta_start", "beta_end", "beta_schedule", "steps_offset", "prediction_type")
    assert {k: ours.config[k] for k in keys} == {k: theirs.config[k] for k in keys}
    for s in (ours, theirs):
        s.set_timesteps(preset.steps)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    x, eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 4, 8, 8)
    steps = [
        s.step(eps, s.timesteps[0], s.scale_model_input(x, s.timesteps[0]), generator=torch.Generator().manual_seed(1))
        for s in (ours, theirs)
    ]
    assert torch.equal(steps[0].prev_sample, steps[1].prev_sample)


def test_seeds_are_per_image(pipe):
    prompts = ["a koala", "a red car", "a koala"]
    kw = dict(steps=2, height=32, width=32)
    batched = generate(pipe, prompts, "lightning", seeds=5, batch_size=3, **kw)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    single = generate(pipe, prompts[1:], "lightning", seeds=[6, 7], **kw)
    a, b = (np.asarray(x, dtype=np.int16) for x in (batched[1], single[0]))
    assert np.abs(a - b).max() <= 2  # same seed, same image, whatever the batch
    assert np.abs(np.asarray(batched[0], dtype=np.int16) - np.asarray(batched[2], dtype=np.int16)).max() > 2
    # Euler-ancestral (turbo) draws its per-step noise from each image's own generator: still per image
    batched = generate(pipe, prompts, "turbo", seeds=5, batch_size=3, **kw)
    assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    single = generate(pipe, prompts[1:], "turbo", seeds=[6, 7], **kw)
    assert np.abs(np.asarray(batched[1], dtype=np.int16) - np.asarray(single[0], dtype=np.int16)).max() <= 2


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
