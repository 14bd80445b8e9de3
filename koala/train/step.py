"""One training step, as the units the loop and `koala.bench train` both run.

`Trainable` holds what a step changes or reads (built once by koala.train.build); `train_step` is one micro-step:
noise and timesteps, the teacher and student forwards with their taps and every loss (`distill_losses`), then
backward, clipping, optimizer and schedule (`optimizer_step`), EMA on the micro-step that syncs, and the logged terms.
`NonFiniteGuard` skips an optimizer step (and its EMA update) whose loss or gradient norm is not finite.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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
from koala.train.sharding import local_part

log = logging.getLogger("koala.train")


@dataclass
class Noising:
    """How a clean latent becomes a training input: the noise schedule, timestep sampler, noise offset, Min-SNR."""

    scheduler: DDPMScheduler
    sample_t: TimestepSampler
    noise_offset: float = 0.0
    snr_gamma: float | None = None


class NonFiniteSteps(RuntimeError):
    """The loss or gradient norm was not finite for `max_nonfinite_steps` optimizer steps in a row: the run diverged."""


class NonFiniteGuard:
    """Skips an optimizer step whose loss (on any micro-step, on any rank) or gradient norm is not finite, counting
    the skips; `limit` skips in a row stop the run with NonFiniteSteps.

    The check costs one host sync per optimizer step: the micro-steps' flags stay on the device, and the ranks agree
    through one all-reduced number. Under fp16 loss scaling an infinite gradient is the scaler's business (it skips
    the step and lowers the scale), so only the loss is checked there.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row, self.skipped = limit, 0, 0
        self._bad: Tensor | None = None  # any non-finite loss among this optimizer step's micro-steps (on the device)

    def watch(self, loss: Tensor) -> None:
        """Note one micro-step's loss (no sync)."""
        bad = ~torch.isfinite(loss.detach())
        self._bad = bad if self._bad is None else self._bad | bad

    def allows(self, acc: Accelerator, grad_norm: Tensor | float | None) -> bool:
        """Whether this optimizer step may be taken: the same answer on every rank. Raises NonFiniteSteps at the limit."""
        bad = self._bad.reshape(1).float()
        self._bad = None
        if grad_norm is not None:  # a tensor (a DTensor under FSDP), or DeepSpeed's float
            norm = local_part(grad_norm).detach() if isinstance(grad_norm, Tensor) else torch.tensor(grad_norm)
            bad = bad + (~torch.isfinite(norm.float())).reshape(1).to(bad.device)
        if acc.num_processes > 1:
            bad = acc.reduce(bad, reduction="sum")
        if not bad.item():
            self.in_a_row = 0
            return True
        self.in_a_row, self.skipped = self.in_a_row + 1, self.skipped + 1
        log.warning(
            "non-finite loss or gradient norm: optimizer step skipped (%d in a row, %d in this session; the run stops "
            "at max_nonfinite_steps=%d in a row)", self.in_a_row, self.skipped, self.limit,
        )  # fmt: skip
        if self.in_a_row >= self.limit:
            raise NonFiniteSteps(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient norm, so the run diverged "
                f"(max_nonfinite_steps={self.limit}); none of them changed the weights. Resume from the last checkpoint "
                "with a lower optim.lr"
            )
        return False


def checked_norm(run: Trainable, clipped: Tensor | float | None) -> Tensor | float | None:
    """The gradient norm the guard checks: the one clipping measured (`clipped`), else computed; None under fp16
    loss scaling (the scaler skips infinite gradients itself) and where the gradients live in the engine (DeepSpeed
    without clipping, which skips a non-finite norm itself)."""
    if run.accelerator.scaler is not None:
        return None
    if clipped is not None:
        return clipped
    grads = [p.grad for p in run.student.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, foreach=True) if grads else None


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
    guard: NonFiniteGuard | None = None  # skips steps with a non-finite loss or gradient norm
    held: list = field(default_factory=list)  # this optimizer step's micro-steps' (loss terms, images), not yet logged


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


def optimizer_step(run: Trainable, loss: Tensor, timer: Timer = no_timer) -> tuple[bool, Tensor | float | None]:
    """Backward, then (accelerate skips these on accumulation micro-steps) clip, step, schedule, zero the grads.

    Returns whether the update was taken (False when the guard skipped it; the schedule still advances, so steps stay
    aligned with the data) and the gradient norm before clipping on the micro-step that syncs (None otherwise, or
    without clipping). Under DeepSpeed the engine steps and clips inside `backward` (`gradient_clipping`,
    koala/train/deepspeed.py); accelerate's `clip_grad_norm_` then only reports the norm it clipped, and the
    optimizer calls are no-ops. DeepSpeed skips an update whose gradient norm is not finite itself (its fp32 ZeRO
    optimizer checks the norm), so the guard's skip there agrees with what the engine did.
    """
    acc = run.accelerator
    with timer("backward"):
        acc.backward(loss)
    if run.guard is not None:
        run.guard.watch(loss)
    stepped, norm = True, None
    with timer("clip"):
        if acc.sync_gradients and run.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(run.student.parameters(), run.max_grad_norm)
        if acc.sync_gradients and run.guard is not None:
            stepped = run.guard.allows(acc, checked_norm(run, norm))
    with timer("optimizer"):
        if stepped:
            run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return stepped, norm


def train_step(run: Trainable, cond: dict[str, Tensor], metrics: Any, timer: Timer = no_timer) -> dict[str, Tensor]:
    """One micro-step; EMA follows the optimizer on the micro-step that syncs (not after a skipped update). Returns
    the loss terms."""
    acc = run.accelerator
    with acc.accumulate(run.student):
        losses = distill_losses(run, cond, timer)
        stepped, norm = optimizer_step(run, losses["loss"], timer)
    if acc.sync_gradients and stepped and run.ema is not None:
        with timer("ema"):
            run.ema.step(acc.unwrap_model(run.student).parameters())
    with timer("logging"):
        log_terms(run, metrics, losses, cond["latents"].shape[0], stepped, norm)
    return losses


def log_terms(run: Trainable, metrics: Any, losses: dict[str, Tensor], images: int, stepped: bool,
              norm: Tensor | float | None) -> None:  # fmt: skip
    """Hand this micro-step's loss terms to the metrics log once its optimizer step is judged: the terms of every
    micro-step of a taken step (and its gradient norm) are added, those of a skipped one dropped (their non-finite
    values would make the logged averages NaN)."""
    run.held.append(({k: v.detach() for k, v in losses.items()}, images))
    if not run.accelerator.sync_gradients:
        return  # an accumulation micro-step: judged with the step's last one
    if stepped:
        for terms, n in run.held:
            metrics.add(terms, n)
        if norm is not None:
            metrics.add_step({"grad_norm": norm})
    run.held.clear()
