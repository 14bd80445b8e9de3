"""Inference presets: sampler, steps, guidance and timestep spacing per teacher kind (KOALA.md sections 5 and 7).

A preset is named by its teacher kind (`teacher.kind`; `preset=` of generate and evaluate names the same presets).
Each teacher kind samples the way its teacher's release does; the schedulers those releases ship are kept as data in
`koala/assets/schedulers/` (with their source) and `tests/test_generate.py` checks every preset against them:
- base students (SDXL-Base teacher, the paper's "v1"): Euler, 25 steps, guidance 7.5 (KOALA's tables), the model's own spacing (SDXL-Base
  ships EulerDiscreteScheduler, "leading").
- KOALA-Lightning (SDXL-Lightning teacher): Euler with `timestep_spacing="trailing"` (SDXL-Lightning's card sets that
  on SDXL-Base's Euler config), 10 steps, guidance 3.5 (KOALA.md 5; the released KOALA-Lightning scheduler config
  says "leading", which is why the export overrides it).
- KOALA-Turbo (SDXL-Turbo teacher): Euler-ancestral, "trailing" (SDXL-Turbo ships EulerAncestralDiscreteScheduler,
  trailing), 4 steps, no guidance (SDXL-Turbo itself is typically sampled in 1 step; the student gets a few more).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from koala.choice import Choice

SAMPLERS = {"euler": EulerDiscreteScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler}
SAMPLER_NAMES = {"euler": "Euler", "euler_ancestral": "Euler ancestral"}  # as model cards and docs write them
Sampler = Choice("Sampler", list(SAMPLERS))


@dataclass(frozen=True)
class Preset:
    """How a model is sampled by default; steps and guidance can be overridden per call."""

    name: str
    sampler: str  # a key of SAMPLERS
    steps: int
    guidance: float
    timestep_spacing: Optional[str]  # None keeps the model's own scheduler spacing

    def settings(self) -> dict[str, Any]:
        """What an image sampled with this preset records about its sampler."""
        return {"preset": self.name, "sampler": self.sampler, "timestep_spacing": self.timestep_spacing}


# Keyed by teacher kind. `v1` (koala before issue 23 called the base preset so) is refused, naming these choices.
PRESETS: dict[str, Preset] = {
    "base": Preset("base", "euler", steps=25, guidance=7.5, timestep_spacing=None),
    "lightning": Preset("lightning", "euler", steps=10, guidance=3.5, timestep_spacing="trailing"),
    "turbo": Preset("turbo", "euler_ancestral", steps=4, guidance=0.0, timestep_spacing="trailing"),
}
# teacher kind -> the scheduler its teacher's release ships (koala/assets/schedulers/, each file names its source)
SHIPPED_SCHEDULERS = {"base": "sdxl-base.json", "lightning": "sdxl-lightning.json", "turbo": "sdxl-turbo.json"}
# The teacher's own sampling (`koala.synth`), by teacher kind; its steps are `teacher.steps`. SDXL-Base samples as
# the base preset does; SDXL-Lightning and SDXL-Turbo as their releases do: trailing timesteps, no guidance, Euler for
# Lightning (its card) and Euler-ancestral for Turbo (the scheduler it ships).
TEACHER_PRESETS: dict[str, Preset] = {
    "base": Preset("sdxl", "euler", steps=25, guidance=7.5, timestep_spacing=None),
    "lightning": Preset("sdxl-lightning", "euler", steps=4, guidance=0.0, timestep_spacing="trailing"),
    "turbo": Preset("sdxl-turbo", "euler_ancestral", steps=4, guidance=0.0, timestep_spacing="trailing"),
}
PresetName = Choice("PresetName", list(PRESETS))  # teacher.kind, generate.preset, evaluate.preset(s)


def get_preset(name: str) -> Preset:
    """The preset of a teacher kind (`base`, `lightning`, `turbo`), naming the valid choices when it is unknown."""
    return PRESETS[PresetName(name)]


def teacher_preset(kind: str, steps: int | None = None) -> Preset:
    """How a `base`, `lightning` or `turbo` teacher itself samples, with `steps` (its `teacher.steps`) when given."""
    preset = TEACHER_PRESETS[PresetName(kind)]
    return preset if steps is None else dataclasses.replace(preset, steps=steps)


def shipped_scheduler_config(kind: str) -> dict[str, Any]:
    """The scheduler config the teacher of `kind` ships (with `_class_name` and `_source`)."""
    path = Path(__file__).resolve().parent.parent / "assets" / "schedulers" / SHIPPED_SCHEDULERS[PresetName(kind)]
    return json.loads(path.read_text())


def preset_scheduler(scheduler_config: dict[str, Any], preset: Preset) -> SchedulerMixin:
    """The preset's sampler built from a model's scheduler config (betas, offsets), with the preset's spacing."""
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    if preset.timestep_spacing is not None:
        config["timestep_spacing"] = preset.timestep_spacing
    cls = SAMPLERS[Sampler(preset.sampler)]
    known = inspect.signature(cls.__init__).parameters  # Euler's extra keys (use_karras_sigmas ...) stay behind
    return cls.from_config({k: v for k, v in config.items() if k in known})
