"""Compose the project's Hydra config outside `@hydra.main` (benchmarks, export, tests)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from koala.config.schema import register_configs

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def compose_config(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """The composed, schema-checked config `python -m koala.train <overrides>` would see."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides or []))
