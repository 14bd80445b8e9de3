"""`python -m koala.lora lora=<sdxl_lora.safetensors> out=<student_lora.safetensors> (run_dir=<run> | unet=<spec>)`.

Carries an SDXL LoRA over to a student through the weight-inheritance map and prints what was kept and dropped;
the output loads with stock `pipe.load_lora_weights(...)` on the exported student (koala/ship/lora_remap.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from koala.config.compose import run_command
from koala.config.schema import TeacherConfig, UNetConfig
from koala.models.plans import config_plan, run_plan
from koala.models.unets import Plan
from koala.ship.lora_remap import RemapReport, remap_file


@dataclass
class LoraRemapConfig:
    """Settings of `python -m koala.lora` (configs/lora.yaml)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    lora: Optional[str] = None  # the SDXL LoRA (.safetensors, PEFT/diffusers or kohya layout)
    out: Optional[str] = None  # the student LoRA to write
    run_dir: Optional[str] = None  # take teacher and unet from this run's config.yaml instead


def _teacher_and_plan(cfg: LoraRemapConfig) -> tuple[dict, Plan]:
    """The teacher U-Net config and the student plan, from a run's config.yaml or from the composed groups."""
    return run_plan(cfg.run_dir) if cfg.run_dir else config_plan(cfg)


def lora_command(cfg: LoraRemapConfig) -> RemapReport:
    """Remap the LoRA a composed `lora` config names and print the report."""
    if not cfg.lora or not cfg.out:
        raise SystemExit(
            "usage: python -m koala.lora lora=<sdxl_lora.safetensors> out=<student.safetensors> "
            "(run_dir=<run> | unet=<spec> [teacher.pipeline=<sdxl folder>])"
        )
    teacher_config, plan = _teacher_and_plan(cfg)
    report = remap_file(cfg.lora, cfg.out, teacher_config, plan)
    print(f"{cfg.lora} -> {cfg.out} (student {plan.spec.name})\n{report.summary()}")
    return report


def main(argv: list[str] | None = None) -> RemapReport:
    """CLI: compose `configs/lora.yaml` with key=value overrides, remap and print the report."""
    return run_command("lora", lora_command, argv, schema=LoraRemapConfig)


if __name__ == "__main__":
    main()
