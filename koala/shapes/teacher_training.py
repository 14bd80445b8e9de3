"""Training the shapes-world teacher on CPU (the library of `python -m koala.shapes.teacher`).

A small `AutoencoderKL` (64 px -> 16 x 16 x 4 latents) trained to reconstruct the world's pictures (`train_vae`);
the latents of fresh scenes encoded once (`encode_scenes`); an SDXL-layout U-Net and the two tiny CLIP text
encoders trained together as a text-to-image epsilon-prediction model (`train_unet`); the pipeline folder written
atomically with fp16 weights (`save_pipeline`).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file, save_file

from koala.models.forward import unet_forward
from koala.shapes.world import RESOLUTION, draw_scene
from koala.train.diffusion import min_snr_weights

if TYPE_CHECKING:
    from koala.shapes.teacher import TeacherTrainConfig


def build_shapes_vae() -> AutoencoderKL:
    """A three-level VAE (scale factor 4) with SDXL's four latent channels; scaling_factor is set after training."""
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        mid_block_add_attention=False, sample_size=RESOLUTION, scaling_factor=1.0, force_upcast=True,
    )  # fmt: skip


def scene_batch(rng: random.Random, n: int) -> tuple[torch.Tensor, list[str]]:
    """`n` fresh scenes as pixels in [-1, 1] (n, 3, 64, 64) and their captions."""
    images, captions = [], []
    for _ in range(n):
        image, meta = draw_scene(rng)
        images.append(np.asarray(image))
        captions.append(meta["caption"])
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, captions


class Logger:
    """Append JSON lines to a file and echo them, with the elapsed minutes."""

    def __init__(self, path: Path) -> None:
        self.path, self.t0 = path, time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, **row) -> None:
        row = {**row, "minutes": round((time.perf_counter() - self.t0) / 60, 2)}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def train_vae(cfg: TeacherTrainConfig, rng: random.Random, log: Logger) -> AutoencoderKL:
    """Reconstruction (L1 + MSE) plus a tiny KL term; returns the VAE in eval mode, scaling factor unset."""
    vae = build_shapes_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = get_scheduler("cosine", opt, num_warmup_steps=100, num_training_steps=cfg.vae_steps)
    for step in range(1, cfg.vae_steps + 1):
        x, _ = scene_batch(rng, cfg.vae_batch)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec + cfg.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0:
            log(stage="vae", step=step, recon=round(rec.item(), 5))
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # top row: pictures, bottom row: their reconstructions
        x, _ = scene_batch(rng, 8)
        pair = torch.cat([x, vae.decode(vae.encode(x).latent_dist.mean).sample]).clamp(-1, 1)
    from koala.ship.sampling import make_grid

    images = [Image.fromarray(((p.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for p in pair]
    make_grid(images, cols=8).save(log.path.with_name(log.path.name.replace("train_log.jsonl", "vae.png")))
    return vae


@torch.no_grad()
def encode_scenes(vae: AutoencoderKL, rng: random.Random, n: int, batch: int = 64) -> tuple[torch.Tensor, list[str]]:
    """Posterior-mean latents (unscaled) and captions of `n` fresh scenes."""
    latents, captions = [], []
    for start in range(0, n, batch):
        x, caps = scene_batch(rng, min(batch, n - start))
        latents.append(vae.encode(x).latent_dist.mean)
        captions += caps
    return torch.cat(latents), captions


def encode_text(pipe: StableDiffusionXLPipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's prompt embeddings (penultimate hidden states of both encoders) and pooled embedding, with grad."""
    hidden, pooled = [], None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids  # fmt: skip
        out = encoder(ids, output_hidden_states=True)
        if out[0].ndim == 2:
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def train_unet(cfg: TeacherTrainConfig, pipe: StableDiffusionXLPipeline, latents: torch.Tensor, captions: list[str], log: Logger,
               save) -> None:  # fmt: skip
    """Text-to-image training of the U-Net and both text encoders (epsilon prediction, min-SNR weighting)."""
    unet, encoders = pipe.unet.train(), [pipe.text_encoder.train(), pipe.text_encoder_2.train()]
    params = list(unet.parameters()) + [p for e in encoders for p in e.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=cfg.warmup)
    ema = EMAModel(params, decay=cfg.ema_decay)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    g = torch.Generator().manual_seed(cfg.seed)
    time_ids = torch.tensor([[RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION]], dtype=torch.float32)
    total = 0.0
    for step in range(1, cfg.unet_steps + 1):
        idx = torch.randint(0, len(latents), (cfg.unet_batch,), generator=g)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        prompt_embeds, pooled = encode_text(pipe, [captions[i] for i in idx])
        keep = (torch.rand(len(idx), generator=g) >= cfg.caption_dropout).float()
        prompt_embeds, pooled = prompt_embeds * keep[:, None, None], pooled * keep[:, None]
        cond = {
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled,
            "time_ids": time_ids.expand(len(idx), -1),
        }
        pred = unet_forward(unet, noisy, t, cond)
        w = min_snr_weights(noise_scheduler, t, cfg.snr_gamma)
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.step(params)
        total += loss.item()
        if step % cfg.log_every == 0:
            log(stage="unet", step=step, loss=round(total / cfg.log_every, 5), lr=sched.get_last_lr()[0])
            total = 0.0
        if step % cfg.save_every == 0 or step == cfg.unet_steps:
            ema.store(params)
            ema.copy_to(params)
            save(step)
            ema.restore(params)
    for module in (unet, *encoders):
        module.eval()


def save_pipeline(pipe: StableDiffusionXLPipeline, out: Path) -> Path:
    """Write the pipeline folder atomically, weights stored as fp16 safetensors (diffusers loads them as fp32)."""
    import shutil

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for file in tmp.rglob("*.safetensors"):  # halves the shipped size; the rounding is far below what matters here
        state = load_file(file)
        save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, file)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
