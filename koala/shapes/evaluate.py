"""`python -m koala.shapes.evaluate model=<pipeline folder> [compare=<folder>] [n=36] [seed=0] [out=<dir>]`.

Samples a fixed set of shapes-world prompts (image i seeded `seed + i`, the model's own preset), scores every
picture against its caption (`koala.shapes.score`) and, given `compare`, the agreement of the two models' pictures
of the same prompts and seeds. Writes `grid.png` (model row(s) above compare row(s)) and `scores.json` to `out`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from koala.config.compose import run_command
from koala.shapes.judge import eval_prompts, judge, load_pipeline, sample
from koala.ship.presets import PresetName
from koala.ship.sampling import make_grid


@dataclass
class ShapesEvaluateConfig:
    """Settings of `python -m koala.shapes.evaluate` (configs/shapes_evaluate.yaml)."""

    model: Optional[str] = None  # the pipeline folder to score
    compare: Optional[str] = None  # a second pipeline, sampled on the same prompts and seeds (e.g. the teacher)
    n: int = 36  # prompts, one picture each
    seed: int = 0  # picture i is seeded seed + i
    preset: PresetName = PresetName.base
    out: Optional[str] = None  # default samples/<model folder name>-shapes


def evaluate_shapes(cfg: ShapesEvaluateConfig) -> dict:
    """Sample and score what a composed `shapes_evaluate` config names; write the grid and the scores."""
    if not cfg.model:
        raise SystemExit("usage: python -m koala.shapes.evaluate model=<pipeline folder> [compare=<folder>] [n=36] "
                         "[seed=0] [preset=base] [out=<dir>]")  # fmt: skip
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
