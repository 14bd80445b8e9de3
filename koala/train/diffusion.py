"""Small pieces of diffusion math for training: noise scheduler, timestep sampling, noise, targets, weighting."""

from __future__ import annotations

from enum import auto
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from koala.choice import Choice
from koala.models.pipeline_parts import PipelineSource


class TimestepKind(Choice):
    """`timesteps`: which training timesteps are drawn."""

    uniform = auto()  # uniform over [0, T)
    teacher_schedule = auto()  # only a step-distilled teacher's own trailing steps, optionally jittered


def build_noise_scheduler(pipeline_dir: str | Path, config: str | Path | None = None) -> DDPMScheduler:
    """The training noise schedule, from the teacher pipeline's own scheduler config (betas, prediction type); for a
    single-file teacher, from its config folder."""
    source = PipelineSource(Path(pipeline_dir), Path(config) if config else None)
    return DDPMScheduler.from_config(source.component_config("scheduler"))


def teacher_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """The `steps` trailing-spaced timesteps a step-distilled teacher (Lightning, Turbo) samples at."""
    t = torch.arange(num_train_timesteps, 0, -num_train_timesteps / steps).round().long() - 1
    return t.clamp(0, num_train_timesteps - 1)


class TimestepSampler:
    """Draws training timesteps: `uniform` over [0, T) or only the teacher's few steps (optionally jittered)."""

    def __init__(self, kind: str, num_train_timesteps: int, teacher_steps: int = 4, jitter: int = 0):
        self.kind, self.T, self.jitter = TimestepKind(kind), num_train_timesteps, jitter
        self.choices = teacher_timesteps(num_train_timesteps, teacher_steps)

    def __call__(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        if self.kind is TimestepKind.uniform:
            return torch.randint(0, self.T, (batch,)).to(device)
        t = self.choices[torch.randint(0, len(self.choices), (batch,))]
        if self.jitter:
            t = t + torch.randint(-self.jitter, self.jitter + 1, (batch,))
        return t.clamp(0, self.T - 1).to(device)


def sample_noise(latents: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like `latents`, plus an optional per-channel offset (Crosslabs' noise offset)."""
    noise = torch.randn(latents.shape, dtype=latents.dtype).to(latents.device)
    if offset:
        b, c = latents.shape[:2]
        noise = noise + offset * torch.randn((b, c, 1, 1), dtype=latents.dtype).to(latents.device)
    return noise


def task_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser should predict: the noise (epsilon) or the velocity, as the teacher's scheduler says."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"unsupported prediction_type {kind!r}; valid choices: epsilon, v_prediction")


def min_snr_weights(scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample Min-SNR-gamma loss weights (Hang et al. 2023), via diffusers' `compute_snr`."""
    snr = compute_snr(scheduler, t)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr
