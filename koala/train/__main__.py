"""`python -m koala.train [experiment=...] [overrides]` / `accelerate launch -m koala.train ...`: KOALA distillation.

The one entry point that keeps `@hydra.main`, for sweeps (`-m distill=sa,ca,...`) and Hydra's run directories. A
config Hydra refuses at compose time (a misspelt key, group option or choice) and a `ConfigError` found before any
model loads both print one `error: ...` line and exit with status 2, as every other command does.
"""

from __future__ import annotations

import os
import sys

import hydra
from hydra.errors import HydraException

from koala.config.compose import exit_config_error, register_schema
from koala.config.schema import TrainConfig
from koala.data.stream import TooManySkips
from koala.errors import ConfigError
from koala.train.loop import train


@hydra.main(version_base=None, config_path="../../configs", config_name="train")
def hydra_main(cfg: TrainConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:  # one run directory per sweep job: multirun/<name>/<overrides>
        cfg.output_dir = HydraConfig.get().runtime.output_dir
    try:
        train(cfg)
    except ConfigError as e:
        exit_config_error(e)
    except TooManySkips as e:  # the data (or a key into it) is wrong; raised in a loader worker or here
        print(
            f"error: {str(e).strip().splitlines()[-1].removeprefix('koala.data.stream.TooManySkips: ')}",
            file=sys.stderr,
        )
        sys.exit(1)


def main() -> None:
    """Register the schema and run `hydra_main` on the command line, reporting a refused config in one line."""
    register_schema("train", TrainConfig)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises what it refuses (instead of printing it) so it is caught here
    try:
        hydra_main()
    except HydraException as e:  # composition: unknown key, group option or choice, a malformed override
        exit_config_error(e)


if __name__ == "__main__":
    main()
