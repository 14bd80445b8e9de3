"""Inference presets: sampler, steps and guidance per teacher kind (KOALA.md section 5).

v1 students (SDXL-Base teacher) sample like SDXL: Euler, 25 steps, guidance 7.5, the scheduler's own spacing.
KOALA-Lightning samples with Euler and `timestep_spacing="trailing"`, 10 steps, guidance 3.5 (the released
scheduler config says "leading", which is why the export overrides it). KOALA-Turbo: Euler trailing, 4 steps,
no guidance (SDXL-Turbo itself is typically sampled in 1 step; the student gets a few more).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from diffusers import EulerDiscreteScheduler

from koala.config.choice import Choice


@dataclass(frozen=True)
class Preset:
    """How a model is sampled by default; every field can be overridden per call."""

    name: str
    steps: int
    guidance: float
    timestep_spacing: Optional[str]  # None keeps the model's own scheduler spacing


PRESETS: dict[str, Preset] = {
    "v1": Preset("v1", steps=25, guidance=7.5, timestep_spacing=None),
    "lightning": Preset("lightning", steps=10, guidance=3.5, timestep_spacing="trailing"),
    "turbo": Preset("turbo", steps=4, guidance=0.0, timestep_spacing="trailing"),
}
KIND_PRESETS = {"base": "v1", "lightning": "lightning", "turbo": "turbo"}  # teacher kind -> its students' preset
# The teacher's own sampling (`koala.synth`), by teacher kind; its steps are `teacher.steps`. SDXL-Base samples as
# v1; SDXL-Lightning and SDXL-Turbo as their model cards do: Euler on trailing timesteps, no guidance.
TEACHER_PRESETS: dict[str, Preset] = {
    "base": Preset("sdxl", steps=25, guidance=7.5, timestep_spacing=None),
    "lightning": Preset("sdxl-lightning", steps=4, guidance=0.0, timestep_spacing="trailing"),
    "turbo": Preset("sdxl-turbo", steps=4, guidance=0.0, timestep_spacing="trailing"),
}
PresetName = Choice("PresetName", list(PRESETS))  # generate.preset, evaluate.preset(s): a key of PRESETS
TeacherKind = Choice("TeacherKind", list(KIND_PRESETS))  # teacher.kind: a key of KIND_PRESETS


def get_preset(name: str) -> Preset:
    """Look up a preset by name, naming the valid choices when it is unknown."""
    return PRESETS[PresetName(name)]


def preset_for_kind(kind: str) -> Preset:
    """The preset a student of a `base`, `lightning` or `turbo` teacher samples with."""
    return PRESETS[KIND_PRESETS[TeacherKind(kind)]]


def teacher_preset(kind: str, steps: int | None = None) -> Preset:
    """How a `base`, `lightning` or `turbo` teacher itself samples, with `steps` (its `teacher.steps`) when given."""
    preset = TEACHER_PRESETS[TeacherKind(kind)]
    return preset if steps is None else Preset(preset.name, steps, preset.guidance, preset.timestep_spacing)


def euler_scheduler(scheduler_config: dict[str, Any], preset: Preset) -> EulerDiscreteScheduler:
    """An Euler scheduler from a model's scheduler config, with the preset's timestep spacing applied."""
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    if preset.timestep_spacing is not None:
        config["timestep_spacing"] = preset.timestep_spacing
    return EulerDiscreteScheduler.from_config(config)
