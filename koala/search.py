"""`python -m koala.search [teacher=<teacher>] [data=<data>] [search.params=<n or ratio> | search.flops=...]
[search.name=<spec>] [search.comfyui=true] [search.dry_run=true]`.

Measures the teacher's sensitivity to removing each unit a student spec can remove (every transformer block, every
encoder / decoder layer pair, the mid block) on a fixed calibration set, writes the table and a heat map, and with
a budget writes `configs/unet/<search.name>.yaml`, a student `koala.train unet=<search.name>` trains directly. The
library is `koala/pruning/`; docs/search.md explains the method and its choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from koala.config.compose import run_command
from koala.config.schema import TrainConfig
from koala.models.specs import LayerSelect


@dataclass
class SearchSettings:
    """`search.<key>=...`: the calibration set, the budget and what is written."""

    params: Optional[float] = None  # budget: a parameter count (> 1) or a ratio of the teacher's (<= 1)
    flops: Optional[float] = None  # budget: FLOPs of one forward at data.resolution, or a ratio of the teacher's
    tolerance: float = 0.01  # a result within this fraction of the target is on budget
    comfyui: bool = False  # only layouts ComfyUI detects (KOALA_700M, KOALA_1B, SSD1B, Segmind_Vega)
    name: Optional[str] = None  # the spec written: configs/unet/<name>.yaml (needed with a budget)
    spec_dir: Optional[str] = None  # where the spec is written; null: the project's configs/unet
    layer_select: LayerSelect = LayerSelect.first  # which teacher blocks a shallower transformer keeps
    remeasure: bool = True  # re-measure every candidate after each removal (false: sum the table's errors)
    greedy_samples: Optional[int] = None  # calibration latents the re-measuring greedy uses (null: all `samples`)
    samples: int = 256  # calibration noisy latents
    batch_size: int = 16  # calibration latents per forward
    seed: int = 0  # data order, noise and timesteps of the calibration set
    device: Optional[str] = None  # default: cuda when available
    compare: list[str] = field(default_factory=list)  # registered specs whose inherited error is reported beside
    dry_run: bool = False  # print the units, costs and expected compute, load nothing
    out: str = "outputs/search/${teacher.name}"


@dataclass
class SearchConfig(TrainConfig):
    """The schema of configs/search.yaml: the train groups (teacher, data, timesteps ...), plus `search`."""

    search: SearchSettings = field(default_factory=SearchSettings)


def search(cfg: SearchConfig) -> dict[str, Any]:
    """Run the search a composed config describes."""
    from koala.pruning.run import run_search

    return run_search(cfg)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: compose `configs/search.yaml` with the overrides and search."""
    return run_command("search", search, argv, schema=SearchConfig)


if __name__ == "__main__":
    main()
