"""Compose the project's Hydra configs, and the one way every command but `koala.train` reads its command line.

Every command has a config `configs/<name>.yaml` whose defaults list starts with its schema (`koala_<name>`, a
dataclass registered by `register_configs`, the one place that registers schemas). `run_command(name, fn, argv)`
composes it with the `key=value` / `group=option` overrides through Hydra's compose API and returns `fn(cfg)`; a
config that cannot work (a misspelt key or group option, a value the schema's type refuses, a `ConfigError`)
prints `error: <one line>` and exits with status 2 before any model is loaded. `koala.train` keeps `@hydra.main`
(for sweeps) and reports errors the same way.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from koala.config.checks import ConfigError, usable_output_dir

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
COMPOSE_ERRORS = (HydraException, OmegaConfBaseException)  # what Hydra / OmegaConf raise for a config they refuse
T = TypeVar("T")


def schemas() -> dict[str, type]:
    """Every command's schema by its ConfigStore name (imported here, so no module registers on import)."""
    from koala.bench.ablation import BenchAblationJob
    from koala.bench.data import BenchDataJob
    from koala.bench.fullsize import BenchFullsizeJob
    from koala.bench.gpu import BenchGPUJob
    from koala.bench.memory import BenchMemoryJob
    from koala.bench.train import BenchTrainJob
    from koala.bench.unet import BenchUNetJob
    from koala.cache import CacheJobConfig
    from koala.config.schema import TrainConfig
    from koala.evaluate import EvaluateConfig
    from koala.export import ExportConfig
    from koala.fixtures.__main__ import FixturesConfig
    from koala.generate import GenerateConfig
    from koala.inspect import InspectConfig
    from koala.lora import LoraRemapConfig
    from koala.shapes.evaluate import ShapesEvaluateConfig
    from koala.shapes.teacher import TeacherTrainConfig

    return {
        "koala_train": TrainConfig, "koala_cache": CacheJobConfig, "koala_inspect": InspectConfig,
        "koala_export": ExportConfig, "koala_generate": GenerateConfig, "koala_evaluate": EvaluateConfig,
        "koala_lora": LoraRemapConfig, "koala_fixtures": FixturesConfig,
        "koala_shapes_evaluate": ShapesEvaluateConfig, "koala_shapes_teacher": TeacherTrainConfig,
        "koala_bench_unet": BenchUNetJob, "koala_bench_data": BenchDataJob, "koala_bench_train": BenchTrainJob,
        "koala_bench_memory": BenchMemoryJob, "koala_bench_ablation": BenchAblationJob, "koala_bench_gpu": BenchGPUJob,
        "koala_bench_fullsize": BenchFullsizeJob,
    }  # fmt: skip


@functools.cache  # once per process: storing converts every schema (about 0.1 s), and a compose calls this
def register_configs() -> None:
    """Register every schema with Hydra's ConfigStore and the `koala_asset` resolver (idempotent)."""
    from koala.config.schema import asset_path

    store = ConfigStore.instance()
    for name, node in schemas().items():
        store.store(name=name, node=node)
    if not OmegaConf.has_resolver("koala_asset"):
        OmegaConf.register_new_resolver("koala_asset", asset_path)
    if not OmegaConf.has_resolver("koala_run_dir"):  # Hydra's run folder: the output_dir, once it is usable
        OmegaConf.register_new_resolver("koala_run_dir", usable_output_dir)


def compose_config(config_name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """The composed, schema-checked config `configs/<config_name>.yaml` with `overrides` (as its command sees it)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides or []))


def error_line(e: BaseException) -> str:
    """A refused config in one line: what Hydra could not compose and why (OmegaConf's reason, without the trailer
    lines naming the key and types), with Hydra's one-per-line lists (e.g. the options of a group) joined."""
    text = str(e).split("\nConfig search path:")[0]  # Hydra appends where it looked
    if isinstance(e.__cause__, OmegaConfBaseException):
        head = text.splitlines()[0].removeprefix("Error merging override ").rstrip(".")
        return f"{head}: {str(e.__cause__).splitlines()[0]}"
    parts: list[str] = []
    for line in text.splitlines():
        if line.startswith("\t") and parts:  # one item of a list
            parts[-1] += (" " if parts[-1].endswith(":") else ", ") + line.strip()
        elif line.strip():
            parts.append(line.strip())
    return "; ".join(parts)


def exit_config_error(e: BaseException) -> NoReturn:
    """Print `error: <message>` (no traceback: the config is wrong, not the code) and exit with status 2."""
    cause = e
    while cause is not None and not isinstance(cause, ConfigError):  # one a resolver raised (koala_run_dir)
        cause = cause.__cause__ or cause.__context__
    e = cause or e
    print(f"error: {e if isinstance(e, ConfigError) else error_line(e)}", file=sys.stderr)
    sys.exit(2)


def run_command(config_name: str, fn: Callable[[DictConfig], T], argv: list[str] | None = None) -> T:
    """Compose `configs/<config_name>.yaml` with `argv` (default: the command line) and return `fn(cfg)`; a config
    Hydra refuses, or a ConfigError raised by `fn`, is reported by `exit_config_error`."""
    overrides = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = compose_config(config_name, overrides)
    except COMPOSE_ERRORS as e:
        exit_config_error(e)
    try:
        return fn(cfg)
    except ConfigError as e:
        exit_config_error(e)
