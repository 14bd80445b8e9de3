"""How closely a student predicts like its teacher: relative error on held-out noisy inputs.

    rel_err = E[(eps_S - eps_T)^2] / Var(eps_T)

over fixed held-out samples, noise and timesteps (same for every model compared), so 0 means the student predicts
exactly as the teacher does and 1 means it is no closer than a constant guess at the teacher's mean.
"""

from __future__ import annotations

import torch

from koala.models.forward import unet_forward


@torch.no_grad()
def held_out_inputs(conditioner, batches, noise_scheduler, seed: int = 1234) -> list[dict]:
    """Encode held-out batches once and draw their noise and timesteps from a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    T = noise_scheduler.config.num_train_timesteps
    out = []
    for batch in batches:
        cond = conditioner(batch)
        lat = cond["latents"]
        noise = torch.randn(lat.shape, generator=g).to(lat)
        t = torch.randint(0, T, (lat.shape[0],), generator=g).to(lat.device)
        out.append({**cond, "noisy": noise_scheduler.add_noise(lat, noise, t), "t": t})
    return out


@torch.no_grad()
def _predict(unet, x: dict) -> torch.Tensor:
    return unet_forward(unet, x["noisy"], x["t"], x, dtype=next(unet.parameters()).dtype).float()


@torch.no_grad()
def relative_error(student, teacher, inputs: list[dict]) -> float:
    """E[(eps_S - eps_T)^2] / Var(eps_T) over the held-out inputs."""
    was = student.training
    student.eval()
    err, s1, s2, n = 0.0, 0.0, 0.0, 0
    for x in inputs:
        et, es = _predict(teacher, x), _predict(student, x)
        err += (es - et).pow(2).sum().item()
        s1, s2, n = s1 + et.sum().item(), s2 + et.pow(2).sum().item(), n + et.numel()
    student.train(was)
    return (err / n) / (s2 / n - (s1 / n) ** 2)
