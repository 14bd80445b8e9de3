"""`python -m koala.demo [overrides]` (`make demo`): the main job on its built-in default, offline, on CPU.

Distils the shipped shapes-world teacher (`teacher=shapes`: an SDXL-layout pipeline trained to draw "a red circle on
a blue background" and the like) into its KOALA-700M-shaped student with the KOALA objective (task + output KD +
self-attention KD), exports the student as a stock diffusers SDXL pipeline, and reports caption accuracy, agreement
with the teacher and eps error for the teacher, the inherited student before distillation and the student after it,
on the same prompts and seeds (koala/shapes/demo.py).
"""

from __future__ import annotations

import sys

from koala.config.compose import run_command
from koala.config.schema import TrainConfig
from koala.shapes.demo import PROMPTS, run_demo


def main(argv: list[str] | None = None, prompts: int = PROMPTS, samples: int | None = None) -> dict:
    """Run the demo with train overrides `argv` (default: the command line) on `prompts` evaluation prompts, writing
    `samples` training pictures when the shards are missing (default: the data preset's)."""
    argv = sys.argv[1:] if argv is None else argv
    return run_command(
        "train", lambda cfg: run_demo(cfg, prompts, samples), ["experiment=demo", *argv], schema=TrainConfig
    )


if __name__ == "__main__":
    main()
