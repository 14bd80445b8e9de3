"""Sample the shapes world's fixed prompts and judge the pictures (the library of `koala.shapes.evaluate`, the demo
and `koala.bench ablation`).

`eval_prompts` gives distinct world captions in a fixed order; `sample` draws picture i from its own generator
seeded `seed + i`; `judge` scores every picture against its caption (`koala.shapes.score`) and, given reference
pictures of the same prompts and seeds, their agreement.
"""

from __future__ import annotations

import random
from pathlib import Path

from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image

from koala.shapes.score import agreement, caption_accuracy
from koala.shapes.world import COLOURS, RESOLUTION, SHAPES, caption
from koala.ship.presets import Preset
from koala.ship.sampling import generate


def eval_prompts(n: int = 36, seed: int = 0) -> list[str]:
    """`n` distinct world captions in a fixed order: each run of 18 has every (shape, colour) pair once."""
    pairs = [(s, c) for s in SHAPES for c in COLOURS]
    random.Random(seed).shuffle(pairs)
    rounds = [[caption(s, c, [b for b in COLOURS if b != c][(k + i) % (len(COLOURS) - 1)])
               for i, (s, c) in enumerate(pairs)] for k in range(len(COLOURS) - 1)]  # fmt: skip
    prompts = [p for r in rounds for p in r]
    if not 0 < n <= len(prompts):
        raise ValueError(f"n={n}: the shapes world has {len(prompts)} distinct captions")
    return prompts[:n]


def load_pipeline(folder: str | Path, unet: UNet2DConditionModel | None = None) -> StableDiffusionXLPipeline:
    """A shapes pipeline in fp32 on CPU, optionally with another U-Net (e.g. a student) in place of its own."""
    kwargs = {"unet": unet} if unet is not None else {}
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, use_safetensors=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: StableDiffusionXLPipeline, prompts: list[str], preset: str | Preset = "base", seed: int = 0,
           batch_size: int = 16) -> list[Image.Image]:  # fmt: skip
    """One picture per prompt at the world's resolution; picture i from its own generator seeded `seed + i`."""
    return generate(pipe, prompts, preset, seeds=seed, height=RESOLUTION, width=RESOLUTION, batch_size=batch_size)


def judge(images: list[Image.Image], prompts: list[str], reference: list[Image.Image] | None = None) -> dict:
    """Caption accuracy (%) and, against reference pictures of the same prompts and seeds, PSNR and MAE."""
    result = {"caption_accuracy": caption_accuracy(images, prompts), "n": len(images)}
    if reference is not None:
        result.update(agreement(images, reference))
    return result
