"""`python -m koala.train [experiment=...] [overrides]` / `accelerate launch -m koala.train ...`: KOALA distillation.

The one entry point that keeps `@hydra.main`, for sweeps (`-m distill=sa,ca,...`) and Hydra's run directories.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from koala.config.checks import ConfigError
from koala.config.schema import register_configs
from koala.data.stream import TooManySkips
from koala.train.loop import train

register_configs()


@hydra.main(version_base=None, config_path="../../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:  # one run directory per sweep job: multirun/<name>/<overrides>
        cfg.output_dir = HydraConfig.get().runtime.output_dir
    try:
        train(cfg)
    except ConfigError as e:  # one clear message, no traceback: the config is wrong, not the code
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TooManySkips as e:  # the data (or a key into it) is wrong; raised in a loader worker or here
        print(f"error: {str(e).strip().splitlines()[-1].removeprefix('koala.data.stream.TooManySkips: ')}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
