"""`python -m koala.shapes.evaluate model=<pipeline folder> [compare=<folder>] [n=36] [seed=0] [out=<dir>]`.

Samples a fixed set of shapes-world prompts (image i seeded `seed + i`, the model's own preset), scores every
picture against its caption (`koala.shapes.score`) and, given `compare`, the agreement of the two models' pictures
of the same prompts and seeds. Writes `grid.png` (model row(s) above compare row(s)) and `scores.json` to `out`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from omegaconf import DictConfig
from PIL import Image

from koala.config.compose import run_command
from koala.generate import generate, make_grid
from koala.shapes.score import agreement, caption_accuracy
from koala.shapes.world import COLOURS, RESOLUTION, SHAPES, caption
from koala.ship.presets import Preset, PresetName


@dataclass
class ShapesEvaluateConfig:
    """Settings of `python -m koala.shapes.evaluate` (configs/shapes_evaluate.yaml)."""

    model: Optional[str] = None  # the pipeline folder to score
    compare: Optional[str] = None  # a second pipeline, sampled on the same prompts and seeds (e.g. the teacher)
    n: int = 36  # prompts, one picture each
    seed: int = 0  # picture i is seeded seed + i
    preset: PresetName = PresetName.v1
    out: Optional[str] = None  # default samples/<model folder name>-shapes


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


def sample(pipe: StableDiffusionXLPipeline, prompts: list[str], preset: str | Preset = "v1", seed: int = 0,
           batch_size: int = 16) -> list[Image.Image]:  # fmt: skip
    """One picture per prompt at the world's resolution; picture i from its own generator seeded `seed + i`."""
    return generate(pipe, prompts, preset, seeds=seed, height=RESOLUTION, width=RESOLUTION, batch_size=batch_size)


def judge(images: list[Image.Image], prompts: list[str], reference: list[Image.Image] | None = None) -> dict:
    """Caption accuracy (%) and, against reference pictures of the same prompts and seeds, PSNR and MAE."""
    result = {"caption_accuracy": caption_accuracy(images, prompts), "n": len(images)}
    if reference is not None:
        result.update(agreement(images, reference))
    return result


def evaluate_shapes(cfg: DictConfig) -> dict:
    """Sample and score what a composed `shapes_evaluate` config names; write the grid and the scores."""
    if not cfg.model:
        raise SystemExit("usage: python -m koala.shapes.evaluate model=<pipeline folder> [compare=<folder>] [n=36] "
                         "[seed=0] [preset=v1] [out=<dir>]")  # fmt: skip
    prompts, seed, preset = eval_prompts(cfg.n), cfg.seed, cfg.preset
    images = sample(load_pipeline(cfg.model), prompts, preset, seed)
    reference = sample(load_pipeline(cfg.compare), prompts, preset, seed) if cfg.compare else None
    result = judge(images, prompts, reference)
    out = Path(cfg.out or f"samples/{Path(cfg.model).resolve().name}-shapes")
    out.mkdir(parents=True, exist_ok=True)
    cols = min(len(prompts), 10)
    make_grid(images + (reference or []), cols=cols).save(out / "grid.png")
    (out / "scores.json").write_text(json.dumps({**result, "prompts": prompts}, indent=1))
    print(json.dumps(result), f"\nwrote {out / 'grid.png'} and {out / 'scores.json'}")
    return result


def main(argv: list[str] | None = None) -> dict:
    """CLI: compose `configs/shapes_evaluate.yaml` with key=value overrides, sample and score."""
    return run_command("shapes_evaluate", evaluate_shapes, argv, schema=ShapesEvaluateConfig)


if __name__ == "__main__":
    main()
