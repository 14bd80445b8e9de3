"""Build a run directory in the trainer's layout (config.yaml, metrics.jsonl, checkpoints/) from tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from koala.config.compose import compose_config
from koala.config.schema import TrainConfig
from koala.models.inherit import inherit_weights
from koala.models.plans import student_spec, teacher_unet_config
from koala.models.unets import build_student, resolve
from koala.train.checkpoint import seal_checkpoint


def write_run_dir(
    root: Path, pipeline_dir: Path, kind: str = "base", step: int = 10, unet: tuple[str, ...] = ("unet=tiny-700m",)
) -> Path:
    """A finished tiny run: one complete checkpoint (unet + perturbed unet_ema), one incomplete newer one; `unet`:
    the overrides naming the student."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    run = root / "run"
    cfg = compose_config(
        "train",
        [
            f"teacher.pipeline={pipeline_dir}",
            f"teacher.kind={kind}",
            *unet,
            f"output_dir={run}",
            f"max_steps={step}",
        ],
        schema=TrainConfig,
    )
    run.mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    teacher = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    t_config = teacher_unet_config(cfg.teacher)
    spec = student_spec(cfg.unet)
    student = build_student(t_config, spec)
    inherit_weights(student, teacher, resolve(t_config, spec))
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    student.save_pretrained(ckpt / "unet")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01)
    ema = EMAModel(
        student.parameters(), decay=cfg.ema_decay, model_cls=UNet2DConditionModel, model_config=student.config
    )
    ema.save_pretrained(ckpt / "unet_ema")  # as the trainer writes it: the EMA settings ride along in config.json
    (ckpt / "state.json").write_text(json.dumps({"step": step}))
    seal_checkpoint(ckpt)
    (run / "checkpoints" / f"step-{2 * step:08d}" / "unet").mkdir(parents=True)  # a save cut short
    records = [
        {"step": s, "loss/total": 1.0 / s, "loss/task": 0.5 / s, "loss/out": 0.3 / s, "loss/feat": 0.2 / s}
        for s in range(1, step + 1)
    ]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return run
