"""Wiring at the edge: turn the (already checked, koala.config.checks) config into real objects.

The training loop and `koala.bench train` build their parts here, so both run the same student, task, optimizer,
schedule and EMA.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs
from diffusers import UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from koala.data.conditioning import CachedConditioner, SDXLConditioner, conditioning_dtype
from koala.devices import DTYPES, multi_cpu
from koala.distill.pairing import check_pair_shapes, pair_taps
from koala.distill.task import DistillationTask, LossWeights
from koala.models.inherit import InheritanceReport, inherit_weights
from koala.models.teacher import load_teacher
from koala.models.unets import Plan, build_student
from koala.train.deepspeed import deepspeed_kwargs, deepspeed_requested, describe_engine
from koala.train.diffusion import TimestepSampler, build_noise_scheduler
from koala.train.sharding import accelerator_kwargs
from koala.train.step import Noising, NonFiniteGuard, Trainable
from koala.train.tracking import resolve_trackers

if TYPE_CHECKING:
    from koala.config.schema import OptimConfig, TrainConfig

log = logging.getLogger("koala.train")


def make_accelerator(cfg: TrainConfig, project_dir: str | Path | None = None) -> Accelerator:
    """The run's Accelerator: mixed precision, accumulation, trackers (with a run folder); gloo for CPU processes."""
    # accelerate keeps its settings process-wide; a second run in the same process (a notebook, an in-process
    # sweep, the tests) may ask for another mixed precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        cpu=multi_cpu() and not deepspeed_requested(),  # DeepSpeed on CPU ranks: gloo, set up by deepspeed_kwargs
        mixed_precision=cfg.mixed_precision,
        # a plugin, not gradient_accumulation_steps=: accelerate would let a launch setting override that one
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum),
        log_with=(resolve_trackers(cfg.report_to) or None) if project_dir is not None else None,
        project_dir=None if project_dir is None else str(project_dir),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout_s))],  # at first init
        **accelerator_kwargs(),  # FSDP2 when the launch config asks for it (koala/train/sharding.py)
        **deepspeed_kwargs(cfg),  # DeepSpeed ZeRO-2 when it asks for that (koala/train/deepspeed.py)
    )


def load_frozen(
    cfg: TrainConfig, device: torch.device
) -> tuple[SDXLConditioner | CachedConditioner, Noising, UNet2DConditionModel]:
    """Conditioner (text encoders + VAE; for a cache, none of them), how latents are noised, and the teacher in its
    stored precision."""
    if cfg.data.kind == "cached" and cfg.data.caption_dropout_mode == "zeros":  # nothing to encode during training
        conditioner = CachedConditioner.from_pretrained(
            cfg.teacher.pipeline, vae=cfg.teacher.vae, device=device, config=cfg.teacher.config
        )
    else:
        conditioner = SDXLConditioner.from_pretrained(
            cfg.teacher.pipeline, vae=cfg.teacher.vae, device=device, dtype=DTYPES[conditioning_dtype(cfg, device)],
            caption_dropout_mode=cfg.data.caption_dropout_mode, config=cfg.teacher.config,
        )  # fmt: skip
    teacher = load_teacher(cfg.teacher, dtype=None)  # stored precision: the student inherits unrounded weights
    noise_scheduler = build_noise_scheduler(cfg.teacher.pipeline, cfg.teacher.config)
    return conditioner, make_noising(cfg, noise_scheduler), teacher


def make_noising(cfg: TrainConfig, scheduler) -> Noising:
    """Timestep sampling, noise offset and Min-SNR around the teacher's noise schedule."""
    sample_t = TimestepSampler(
        cfg.timesteps, scheduler.config.num_train_timesteps, cfg.teacher.steps, cfg.timestep_jitter
    )
    return Noising(scheduler, sample_t, cfg.noise_offset, cfg.snr_gamma)


def make_student(teacher: UNet2DConditionModel, plan: Plan) -> tuple[UNet2DConditionModel, InheritanceReport]:
    """The student U-Net of the run's resolved plan, built from the loaded teacher's config and initialised from its
    weights."""
    student = build_student(dict(teacher.config), plan).to(teacher.device)
    report = inherit_weights(student, teacher, plan)
    student.train().requires_grad_(True)  # fp32 master weights: build_unet builds in fp32
    return student, report


def make_task(
    cfg: TrainConfig, student, teacher: UNet2DConditionModel, plan: Plan, latent_size: int
) -> DistillationTask:
    """The distillation task of `cfg.distill`: its tap pairs (shapes checked on meta) and loss weights."""
    d = cfg.distill
    pairs = pair_taps(plan, d, student, teacher)
    check_pair_shapes(pairs, student, teacher, sample_size=latent_size, sa_point=d.sa_point)
    weights = LossWeights(d.task_weight, d.out_weight, d.feat_weight)
    return DistillationTask(student, teacher, pairs, weights, feature_loss=d.loss, sa_point=d.sa_point)


def make_optimizer(optim_cfg: OptimConfig, params) -> torch.optim.Optimizer:
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


def make_ema(cfg: TrainConfig, student: UNet2DConditionModel) -> EMAModel | None:
    """diffusers' EMA of the student (foreach), initialised from the inherited weights; None when `ema=false`."""
    if not cfg.ema:
        return None
    low = {str(p.dtype) for p in student.parameters() if p.dtype != torch.float32}
    if low:  # an EMA of low-precision copies loses its small updates to rounding (DeepSpeed's bf16 mode did that)
        raise ValueError(f"the EMA needs the student's fp32 weights; its parameters are {sorted(low)}")
    return EMAModel(
        student.parameters(),
        decay=cfg.ema_decay,
        model_cls=UNet2DConditionModel,
        model_config=student.config,
        foreach=True,
    )


def build_trainable(
    cfg: TrainConfig,
    accelerator: Accelerator,
    teacher: UNet2DConditionModel,
    noising: Noising,
    plan: Plan,
    latent_size: int,
) -> Trainable:
    """Student (of the resolved `plan`, inherited from the teacher), its task, EMA, optimizer and LR schedule,
    prepared by accelerate."""
    student, report = make_student(teacher, plan)
    log.info("student %s: %s", cfg.unet.name, report.summary().splitlines()[0])
    task = make_task(cfg, student, teacher, plan, latent_size)
    log.info("distilling %d feature pairs (distill=%s)", len(task.pairs), cfg.distill.name)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.to(accelerator.device)
    optimizer = make_optimizer(cfg.optim, student.parameters())
    lr_scheduler = get_scheduler(  # accelerate steps a prepared scheduler once per process
        cfg.optim.scheduler,
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_steps * accelerator.num_processes,
    )
    student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    if deepspeed_requested():
        log.info(describe_engine(student))
    ema = make_ema(cfg, accelerator.unwrap_model(student))  # over the prepared parameters: sharded under FSDP
    if cfg.compile:
        student = torch.compile(student)
    task = task.running(student)  # the prepared (wrapped, compiled) student, tapped as the bare one was paired
    guard = NonFiniteGuard(cfg.max_nonfinite_steps)
    return Trainable(
        accelerator, task, student, optimizer, lr_scheduler, ema, noising, cfg.optim.max_grad_norm, plan, guard
    )
