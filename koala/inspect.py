"""`python -m koala.inspect unet=<spec> [teacher=<teacher>] [distill=<preset>] [list_taps=true]`.

Prints the per-stage structure and exact parameter counts of teacher and student, the feature pairs the `distill`
preset will distil (counts per stage and kind, shapes at `data.resolution`), and with `list_taps=true` every tap
point of both models (koala/models/describe.py, koala/distill/describe.py). Teacher and student are built on the
meta device, so full-size SDXL needs no weights and almost no memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from koala.config.compose import run_command
from koala.config.schema import TrainConfig
from koala.distill.describe import inspect_distill


@dataclass
class InspectConfig(TrainConfig):
    """Settings of `python -m koala.inspect` (configs/inspect.yaml): the train groups, plus"""

    list_taps: bool = False  # also list every tap point of both models


def inspect_config(cfg: InspectConfig) -> str:
    """The inspection of a composed config, printed."""
    text = inspect_distill(cfg.teacher, cfg.unet, cfg.distill, cfg.data.resolution, cfg.list_taps)
    print(text)
    return text


def main(argv: list[str] | None = None) -> str:
    """CLI: compose `configs/inspect.yaml` with the overrides and print the inspection."""
    return run_command("inspect", inspect_config, argv, schema=InspectConfig)


if __name__ == "__main__":
    main()
