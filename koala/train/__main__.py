"""`python -m koala.train [experiment=...] [overrides]` / `accelerate launch -m koala.train ...`: KOALA distillation.

The one entry point that keeps `@hydra.main`, for sweeps (`-m distill=sa,ca,...`) and Hydra's run directories. A
config Hydra refuses at compose time (a misspelt key, group option or choice) and a `ConfigError` found before any
model loads both print one `error: ...` line and exit with status 2, as every other command does.
"""

from __future__ import annotations

import os
import sys

import hydra

from koala.config.compose import COMPOSE_ERRORS, exit_config_error, register_schema
from koala.config.schema import TrainConfig
from koala.data.stream import TooManySkips
from koala.errors import ConfigError
from koala.train.checkpoint import NonFiniteWeights
from koala.train.loop import train
from koala.train.step import NonFiniteSteps

# Errors that end a run which started well: the data skips everything, the run diverged.
RUN_STOPPERS = (TooManySkips, NonFiniteSteps, NonFiniteWeights)


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
    except RUN_STOPPERS as e:  # the run cannot go on: one line saying why, exit status 1
        # raised in a loader worker, the message ends with the worker's traceback: its last line is the error
        last = str(e).strip().splitlines()[-1]
        print(f"error: {last.removeprefix(f'{type(e).__module__}.{type(e).__name__}: ')}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    """Register the schema and run `hydra_main` on the command line, reporting a refused config in one line."""
    register_schema("train", TrainConfig)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises what it refuses (instead of printing it) so it is caught here
    try:
        hydra_main()
    except COMPOSE_ERRORS as e:  # composition: unknown key, group option or choice, a malformed override; or a
        exit_config_error(e)  # ConfigError of a resolver Hydra ran before the job (koala_run_dir)


if __name__ == "__main__":
    main()
