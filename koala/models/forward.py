"""The one way an SDXL U-Net is called: noisy latents, timesteps and a conditioning dict in, its prediction out.

The conditioning dict is what the data path produces (koala/data/conditioning.py, the cache):
`prompt_embeds` (B, L, D), `pooled_prompt_embeds` (B, P) and `time_ids` (B, 6).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

COND_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "time_ids")
TIME_IDS = 6  # SDXL micro-conditioning: original h, w, crop top, left, target h, w


def unet_forward(
    unet: Any, noisy: Tensor, t: Tensor, cond: dict[str, Tensor], dtype: torch.dtype | None = None
) -> Tensor:
    """The U-Net's prediction for `noisy` at `t` under `cond`; inputs are cast to `dtype` when one is given.

    `time_ids` stay fp32 whatever `dtype` is: they are pixel sizes and crops, which the U-Net embeds sinusoidally in
    fp32 itself, and bf16 would round them (1023 -> 1024, 1365 -> 1368; fp16 above 2048).
    """

    def cast(x: Tensor) -> Tensor:
        return x if dtype is None else x.to(dtype)

    return unet(
        cast(noisy),
        t,
        encoder_hidden_states=cast(cond["prompt_embeds"]),
        added_cond_kwargs={"text_embeds": cast(cond["pooled_prompt_embeds"]), "time_ids": cond["time_ids"].float()},
    ).sample


def pooled_dim(config: dict[str, Any]) -> int:
    """Width of the pooled text embedding an SDXL U-Net config expects (its `text_time` input minus the time ids)."""
    return config["projection_class_embeddings_input_dim"] - TIME_IDS * config["addition_time_embed_dim"]


def random_inputs(
    config: dict[str, Any],
    resolution: int,
    batch: int = 1,
    vae_scale: int = 8,
    text_len: int = 77,
    device: Any = "meta",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Random inputs for images of `resolution` px: `noisy`, `t`, `target` and the conditioning keys (COND_KEYS)."""
    latent = resolution // vae_scale
    shape = (batch, config["in_channels"], latent, latent)

    def randn(*size: int) -> Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(size, dtype=dtype, device="meta")
        return torch.randn(size, generator=generator, dtype=dtype).to(device)

    return {
        "noisy": randn(*shape),
        "t": torch.full((batch,), 500, device=device),
        "target": randn(*shape),
        "prompt_embeds": randn(batch, text_len, config["cross_attention_dim"]),
        "pooled_prompt_embeds": randn(batch, pooled_dim(config)),
        "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, dtype=dtype,
                                 device=device),
    }  # fmt: skip
