"""Wiring at the edge: turn the (already checked, koala.config.checks) config into real objects."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from koala.models.inherit import InheritanceReport, inherit_weights
from koala.models.specs import student_spec
from koala.models.unets import Plan, build_student, resolve


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
