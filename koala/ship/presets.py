"""Inference presets: sampler, steps and guidance per teacher kind (KOALA.md section 5), named by the kind.

A student samples with the preset of its teacher's kind (`teacher.kind`); `preset=` of generate and evaluate names
the same presets. Base students (SDXL-Base teacher, the paper's "v1") sample like SDXL: Euler, 25 steps, guidance
7.5, the scheduler's own spacing.
KOALA-Lightning samples with Euler and `timestep_spacing="trailing"`, 10 steps, guidance 3.5 (the released
scheduler config says "leading", which is why the export overrides it). KOALA-Turbo: Euler trailing, 4 steps,
no guidance (SDXL-Turbo itself is typically sampled in 1 step; the student gets a few more).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from diffusers import EulerDiscreteScheduler

from koala.choice import Choice


@dataclass(frozen=True)
class Preset:
    """How a model is sampled by default; every field can be overridden per call."""

    name: str
    steps: int
    guidance: float
    timestep_spacing: Optional[str]  # None keeps the model's own scheduler spacing


# Keyed by teacher kind. `v1` (koala before issue 23 called the base preset so) is refused, naming these choices.
PRESETS: dict[str, Preset] = {
    "base": Preset("base", steps=25, guidance=7.5, timestep_spacing=None),
    "lightning": Preset("lightning", steps=10, guidance=3.5, timestep_spacing="trailing"),
    "turbo": Preset("turbo", steps=4, guidance=0.0, timestep_spacing="trailing"),
}
PresetName = Choice("PresetName", list(PRESETS))  # teacher.kind, generate.preset, evaluate.preset(s)


def get_preset(name: str) -> Preset:
    """The preset of a teacher kind (`base`, `lightning`, `turbo`), naming the valid choices when it is unknown."""
    return PRESETS[PresetName(name)]


def euler_scheduler(scheduler_config: dict[str, Any], preset: Preset) -> EulerDiscreteScheduler:
    """An Euler scheduler from a model's scheduler config, with the preset's timestep spacing applied."""
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    if preset.timestep_spacing is not None:
        config["timestep_spacing"] = preset.timestep_spacing
    return EulerDiscreteScheduler.from_config(config)
