"""Student plans from configs: the `teacher` and `unet` sections (or a run's saved config) -> U-Net configs, spec, plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from koala.models.archs import ARCHS, Arch
from koala.models.specs import StudentSpec, spec_from_fields
from koala.models.unets import Plan, resolve

if TYPE_CHECKING:
    from koala.config.schema import TeacherConfig, TrainConfig, UNetConfig
    from koala.lora import LoraRemapConfig

SPEC_FIELDS = (
    "encoder_keep",
    "decoder_keep",
    "encoder_depth",
    "decoder_depth",
    "mid",
    "mid_depth",
    "layer_select",
    "random_init",
)


def student_spec(unet_cfg: UNetConfig) -> StudentSpec:
    """The StudentSpec a `unet` config section describes (a registered name plus overridden fields)."""
    return spec_from_fields(unet_cfg.name, **{k: _plain(getattr(unet_cfg, k, None)) for k in SPEC_FIELDS})


def teacher_unet_config(teacher_cfg: TeacherConfig) -> dict[str, Any]:
    """The teacher's U-Net config: from its folder when one is on disk, a single-file teacher's config folder, else
    the built-in `arch` config."""
    for folder in (teacher_cfg.unet, teacher_cfg.pipeline and str(Path(teacher_cfg.pipeline) / "unet")):
        if folder and (Path(folder) / "config.json").is_file():
            return json.loads((Path(folder) / "config.json").read_text())
    if teacher_cfg.pipeline:
        from koala.models.pipeline_parts import PipelineSource

        source = PipelineSource.of(teacher_cfg)
        if source.is_file:
            return source.component_config("unet")
    return dict(ARCHS[Arch(teacher_cfg.arch)])


def student_plan(teacher_config: dict[str, Any], unet_cfg: UNetConfig) -> Plan:
    """The resolved plan of the student a `unet` section describes, on the given teacher U-Net config."""
    return resolve(teacher_config, student_spec(unet_cfg))


def config_plan(cfg: TrainConfig | LoraRemapConfig) -> tuple[dict[str, Any], Plan]:
    """The teacher U-Net config and the resolved student plan of a config's `teacher` and `unet` sections."""
    teacher_config = teacher_unet_config(cfg.teacher)
    return teacher_config, student_plan(teacher_config, cfg.unet)


def run_plan(run_dir: str | Path) -> tuple[dict[str, Any], Plan]:
    """The teacher U-Net config and the resolved student plan of a run, from its saved config.yaml."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"run_dir={str(run_dir)!r} has no config.yaml: not a koala run directory")
    return config_plan(OmegaConf.load(path))


def _plain(v: Any) -> Any:
    """OmegaConf containers -> plain lists and dicts (the spec dataclass takes tuples of plain values)."""
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
