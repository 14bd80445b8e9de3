"""One training step, as the units the loop and `koala.bench train` both run.

`Trainable` holds what a step changes or reads (built once by koala.train.build); `train_step` is one micro-step:
noise and timesteps, the teacher and student forwards with their taps and every loss (`distill_losses`), then
backward, clipping, optimizer and schedule (`optimizer_step`), EMA on the micro-step that syncs, and the logged terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from torch import Tensor

from koala.distill.task import DistillationTask
from koala.models.unets import Plan
from koala.timing import Timer, no_timer
from koala.train.diffusion import TimestepSampler, min_snr_weights, sample_noise, task_target


@dataclass
class Noising:
    """How a clean latent becomes a training input: the noise schedule, timestep sampler, noise offset, Min-SNR."""

    scheduler: DDPMScheduler
    sample_t: TimestepSampler
    noise_offset: float = 0.0
    snr_gamma: float | None = None


@dataclass
class Trainable:
    """The parts one step runs: the (prepared) student inside its task, its optimizer, schedule and EMA."""

    accelerator: Accelerator
    task: DistillationTask
    student: Any  # the prepared (and possibly compiled) student the task runs
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: EMAModel | None
    noising: Noising
    max_grad_norm: float
    plan: Plan  # which teacher layer each student layer came from (pairing other presets, export)


def distill_losses(run: Trainable, cond: dict[str, Tensor], timer: Timer = no_timer) -> dict[str, Tensor]:
    """Every loss term of one batch of conditioning (latents + text embeddings + time ids); `loss` is the objective."""
    n = run.noising
    with timer("noise"):
        latents = cond["latents"].to(run.accelerator.device)
        noise = sample_noise(latents, n.noise_offset)
        t = n.sample_t(latents.shape[0], latents.device)
        noisy = n.scheduler.add_noise(latents, noise, t)
        target = task_target(n.scheduler, latents, noise, t)
        snr_w = min_snr_weights(n.scheduler, t, n.snr_gamma) if n.snr_gamma else None
    with run.accelerator.autocast():  # the student's compute; the teacher runs in its own dtype
        return run.task(noisy, t, cond, target, sample_weights=snr_w, timer=timer)


def optimizer_step(run: Trainable, loss: Tensor, timer: Timer = no_timer) -> Tensor | float | None:
    """Backward, then (accelerate skips these on accumulation micro-steps) clip, step, schedule, zero the grads.

    Returns the gradient norm before clipping on the micro-step that syncs (None otherwise, or without clipping).
    Under DeepSpeed the engine steps and clips inside `backward` (`gradient_clipping`, koala/train/deepspeed.py);
    accelerate's `clip_grad_norm_` then only reports the norm it clipped, and the optimizer calls are no-ops.
    """
    acc = run.accelerator
    with timer("backward"):
        acc.backward(loss)
    norm = None
    with timer("clip"):
        if acc.sync_gradients and run.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(run.student.parameters(), run.max_grad_norm)
    with timer("optimizer"):
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return norm


def train_step(run: Trainable, cond: dict[str, Tensor], metrics: Any, timer: Timer = no_timer) -> dict[str, Tensor]:
    """One micro-step; EMA follows the optimizer on the micro-step that syncs. Returns the loss terms."""
    acc = run.accelerator
    with acc.accumulate(run.student):
        losses = distill_losses(run, cond, timer)
        norm = optimizer_step(run, losses["loss"], timer)
    if acc.sync_gradients and run.ema is not None:
        with timer("ema"):
            run.ema.step(acc.unwrap_model(run.student).parameters())
    with timer("logging"):
        metrics.add(losses, cond["latents"].shape[0])
        if norm is not None:
            metrics.add_step({"grad_norm": norm})
    return losses
