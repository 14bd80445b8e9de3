"""Compose the project's Hydra configs, and the one way every command but `koala.train` reads its command line.

Every command has a config `configs/<name>.yaml` whose defaults list starts with its schema (`koala_<name>`, the
dataclass the command passes as `schema=`, which `register_schema` stores under that name: nothing here imports a
command). `run_command(name, fn, argv, schema=...)` composes it with the `key=value` / `group=option` overrides
through Hydra's compose API and returns `fn(cfg)`; a config that cannot work (a misspelt key or group option, a
value the schema's type refuses, a `ConfigError`) prints `error: <one line>` and exits with status 2 before any
model is loaded. `koala.train` keeps `@hydra.main` (for sweeps), registers its schema with `register_schema` and
reports errors the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from koala.config.checks import usable_output_dir
from koala.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
COMPOSE_ERRORS = (HydraException, OmegaConfBaseException)  # what Hydra / OmegaConf raise for a config they refuse
T = TypeVar("T")


_registered: dict[str, type] = {}  # ConfigStore name -> the schema stored under it (ConfigStore is process-wide)


def asset_path(name: str) -> str:
    """Absolute path of a folder shipped in the package (koala/assets/<name>): the `${koala_asset:<name>}` resolver."""
    return str(Path(__file__).resolve().parents[1] / "assets" / name)


def register_schema(config_name: str, schema: type) -> None:
    """Register `schema` with Hydra's ConfigStore as `koala_<config_name>` (what `configs/<config_name>.yaml`'s
    defaults list starts with), and the `koala_asset` resolver; storing again only what changed."""
    name = f"koala_{config_name}"
    if _registered.get(name) is not schema:  # storing converts the dataclass (tens of ms); a compose calls this
        ConfigStore.instance().store(name=name, node=schema)
        _registered[name] = schema
    if not OmegaConf.has_resolver("koala_asset"):
        OmegaConf.register_new_resolver("koala_asset", asset_path)
    if not OmegaConf.has_resolver("koala_run_dir"):  # Hydra's run folder: the output_dir, once it is usable
        OmegaConf.register_new_resolver("koala_run_dir", usable_output_dir)


def compose_config(config_name: str, overrides: list[str] | None = None, *, schema: type) -> DictConfig:
    """The composed config `configs/<config_name>.yaml` with `overrides`, checked against `schema` (its dataclass),
    as its command sees it."""
    register_schema(config_name, schema)
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


def run_command(config_name: str, fn: Callable[[DictConfig], T], argv: list[str] | None = None, *, schema: type) -> T:
    """Compose `configs/<config_name>.yaml` against `schema` with `argv` (default: the command line) and return
    `fn(cfg)`; a config Hydra refuses, or a ConfigError raised by `fn`, is reported by `exit_config_error`."""
    overrides = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = compose_config(config_name, overrides, schema=schema)
    except COMPOSE_ERRORS as e:
        exit_config_error(e)
    try:
        return fn(cfg)
    except ConfigError as e:
        exit_config_error(e)
