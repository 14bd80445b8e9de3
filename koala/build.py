"""Wiring at the edge: turn the config into real objects (checked first, built second)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from koala.dtypes import DTYPES
from koala.inherit import InheritanceReport, inherit_weights
from koala.specs import student_spec, teacher_unet_config
from koala.unets import Plan, build_student, resolve

TEACHER_KINDS = ("base", "lightning", "turbo")
MIXED_PRECISION = ("no", "fp16", "bf16")


def _is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def check_config(cfg) -> None:
    """Fail before any model is loaded: unknown choices and missing paths are named here."""
    t = cfg.teacher
    if t.kind not in TEACHER_KINDS:
        raise ValueError(f"unknown teacher.kind {t.kind!r}; valid choices: {', '.join(TEACHER_KINDS)}")
    if t.dtype not in DTYPES:
        raise ValueError(f"unknown teacher.dtype {t.dtype!r}; valid choices: {', '.join(DTYPES)}")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"unknown mixed_precision {cfg.mixed_precision!r}; valid choices: {', '.join(MIXED_PRECISION)}")
    if not t.pipeline:
        raise ValueError("teacher.pipeline is required: a local diffusers SDXL folder (text encoders, VAE, scheduler)")
    if not t.create_tiny and not Path(t.pipeline).is_dir():
        raise FileNotFoundError(f"teacher.pipeline={t.pipeline!r} does not exist")
    if t.unet and not Path(t.unet).exists():
        raise FileNotFoundError(f"teacher.unet={t.unet!r} does not exist")
    if t.vae and not Path(t.vae).exists():
        raise FileNotFoundError(f"teacher.vae={t.vae!r} does not exist")
    from koala.diffusion import TIMESTEP_SAMPLERS
    from koala.distill.losses import FEATURE_LOSSES
    from koala.distill.taps import KINDS, STAGES

    if cfg.timesteps not in TIMESTEP_SAMPLERS:
        raise ValueError(f"unknown timesteps {cfg.timesteps!r}; valid choices: {', '.join(TIMESTEP_SAMPLERS)}")
    d = cfg.distill
    for kind in d.kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown distill kind {kind!r}; valid choices: {', '.join(KINDS)}")
    for stage in d.stages:
        if stage not in STAGES:
            raise ValueError(f"unknown distill stage {stage!r}; valid choices: {', '.join(STAGES)}")
    if d.loss not in FEATURE_LOSSES:
        raise ValueError(f"unknown distill.loss {d.loss!r}; valid choices: {', '.join(FEATURE_LOSSES)}")
    # The student spec must fit the teacher: resolved on configs alone, no weights.
    resolve(teacher_unet_config(t), student_spec(cfg.unet))


def make_student(cfg, teacher: UNet2DConditionModel) -> tuple[UNet2DConditionModel, Plan, InheritanceReport]:
    """The student U-Net, built from the loaded teacher's config and initialised from its weights."""
    spec = student_spec(cfg.unet)
    config = dict(teacher.config)
    plan = resolve(config, spec)
    student = build_student(config, spec).to(teacher.device)
    report = inherit_weights(student, teacher, plan)
    student.train().requires_grad_(True)  # fp32 master weights: build_unet builds in fp32
    return student, plan, report


def make_optimizer(optim_cfg, params) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW when asked for and installed."""
    kwargs = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay, eps=optim_cfg.eps)
    if optim_cfg.use_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("optim.use_8bit=true needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(params, **kwargs)
    # fused: one kernel for all tensors instead of a Python loop over them (measured: -0.07 of the CPU step ratio)
    return torch.optim.AdamW(params, **kwargs, fused=True)
