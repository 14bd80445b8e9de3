"""`python -m koala.inspect unet=<spec> [teacher=<teacher>] [distill=<preset>] [list_taps=true]`, or `run_dir=<run>`.

Prints the per-stage structure and exact parameter counts of teacher and student, the feature pairs the `distill`
preset will distil (counts per stage and kind, shapes at `data.resolution`), and with `list_taps=true` every tap
point of both models (koala/models/describe.py, koala/distill/describe.py). Each pair's weight is the one training
uses (`koala.distill.pairing.pair_weights`); `run_dir=` inspects a run from its saved config, with the balance factors
`distill.balance=grad` measured for it. Teacher and student are built on the meta device, so full-size SDXL needs no
weights and almost no memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from koala.config.compose import run_command
from koala.config.schema import TrainConfig
from koala.distill.describe import inspect_distill
from koala.errors import ConfigError
from koala.train.balance import run_balance


@dataclass
class InspectConfig(TrainConfig):
    """Settings of `python -m koala.inspect` (configs/inspect.yaml): the train groups, plus"""

    list_taps: bool = False  # also list every tap point of both models
    run_dir: Optional[str] = None  # inspect this run: its config.yaml and its measured balance factors


def inspect_config(cfg: InspectConfig) -> str:
    """The inspection of a composed config (or of a run's saved one), printed."""
    balance = None
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"run_dir={cfg.run_dir!r} holds no config.yaml: not a koala.train run directory")
        cfg = OmegaConf.merge(OmegaConf.structured(InspectConfig), OmegaConf.load(run_dir / "config.yaml"),
                              {"list_taps": cfg.list_taps, "run_dir": str(run_dir)})  # fmt: skip
        balance = run_balance(run_dir)
    text = inspect_distill(cfg.teacher, cfg.unet, cfg.distill, cfg.data.resolution, cfg.list_taps, balance)
    print(text)
    return text


def main(argv: list[str] | None = None) -> str:
    """CLI: compose `configs/inspect.yaml` with the overrides and print the inspection."""
    return run_command("inspect", inspect_config, argv, schema=InspectConfig)


if __name__ == "__main__":
    main()
