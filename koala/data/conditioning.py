"""SDXL conditioning: frozen text encoders and VAE turn an online batch into latents, text embeddings and time ids.

`prompt_embeds` is the concatenation of the penultimate hidden states of both CLIP encoders (B, 77, 768 + 1280 in
SDXL), `pooled_prompt_embeds` the projected pooled output of the second (B, 1280): exactly what
`StableDiffusionXLPipeline.encode_prompt` computes. The VAE runs in fp32 (SDXL's overflows in fp16) unless an
fp16-fixed VAE is given. Latents are the posterior mean (deterministic, so a cache and an online run agree) times
the VAE scaling factor, unless `sample_latents` draws from the posterior.
"""

from __future__ import annotations

from enum import auto
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn
from transformers import CLIPTokenizer

from koala.choice import Choice
from koala.devices import DTYPES
from koala.models.pipeline_parts import PipelineSource

if TYPE_CHECKING:
    from koala.config.schema import TrainConfig

CONDITION_KEYS = ("latents", "prompt_embeds", "pooled_prompt_embeds", "time_ids")
ConditioningDType = Choice("ConditioningDType", ["auto", *DTYPES])  # conditioning.dtype


def conditioning_dtype(cfg: TrainConfig, device: str | torch.device) -> str:
    """The text encoders' precision (`conditioning.dtype`: a key of DTYPES), independent of `teacher.dtype`.

    `auto`: on an accelerator fp16, what SDXL inference encodes prompts in (the stock pipeline loaded in fp16); on
    CPU fp32. Training from a cache, `auto` is the precision the cache was encoded in (its info files record it), so
    what is encoded during training (the empty prompt of `caption_dropout_mode=empty`, sample grids) matches it.
    """
    name = cfg.conditioning.dtype
    if name == "auto" and cfg.data.kind == "cached":
        from koala.data.cached import recorded_conditioning_dtype

        name = recorded_conditioning_dtype(cfg.data.path) or name
    if name == "auto":
        name = "fp32" if torch.device(device).type == "cpu" else "fp16"
    return str(name)


class DropoutMode(Choice):
    """`data.caption_dropout_mode`: what a dropped caption becomes."""

    zeros = auto()  # all-zero prompt and pooled embeddings (SDXL's training, the pipeline's unconditional branch)
    empty = auto()  # the embeddings of ""


class SDXLConditioner(nn.Module):
    """Frozen SDXL text encoders + VAE (no grad): batch -> {latents, prompt_embeds, pooled_prompt_embeds, time_ids}."""

    def __init__(
        self,
        tokenizers: list[CLIPTokenizer],
        text_encoders: list[nn.Module],
        vae: AutoencoderKL,
        *,
        sample_latents: bool = False,
        caption_dropout_mode: str = DropoutMode.zeros,
    ) -> None:
        super().__init__()
        self.tokenizers = tokenizers
        self.text_encoders = nn.ModuleList(text_encoders)
        self.vae = vae
        self.sample_latents = sample_latents
        self.caption_dropout_mode = DropoutMode(caption_dropout_mode)
        self.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(
        cls,
        pipeline_dir: str | Path,
        vae: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        sample_latents: bool = False,
        caption_dropout_mode: str = DropoutMode.zeros,
        config: str | Path | None = None,
    ) -> SDXLConditioner:
        """Load tokenizers, text encoders (in `dtype`) and the VAE (fp32, or `dtype` for a given fp16-fixed VAE) from
        a diffusers folder or a full single-file checkpoint (converted onto the configs in `config`)."""
        source = PipelineSource(Path(pipeline_dir), Path(config) if config else None)
        vae_model = AutoencoderKL.from_pretrained(vae, torch_dtype=dtype) if vae else source.vae(torch.float32)
        return cls(
            source.tokenizers(),
            source.text_encoders(dtype),
            vae_model,
            sample_latents=sample_latents,
            caption_dropout_mode=caption_dropout_mode,
        ).to(device)

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SDXL's VAE)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(prompt_embeds (B, 77, D1 + D2), pooled_prompt_embeds (B, P)) as SDXL's `encode_prompt` computes them."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(
                list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids  # fmt: skip
            out = encoder(ids.to(self.device), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: the projected pooled output comes first
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    @torch.no_grad()
    def encode_images(self, pixel_values: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """VAE latents of images in [-1, 1], times the scaling factor: (B, 3, H, W) -> (B, 4, H/f, W/f)."""
        posterior = self.vae.encode(pixel_values.to(self.device, self.vae.dtype)).latent_dist
        latents = posterior.sample(generator) if self.sample_latents else posterior.mean
        return latents.float() * self.vae.config.scaling_factor

    @staticmethod
    def time_ids(original_size: Tensor, crop_top_left: Tensor, target_size: Tensor) -> Tensor:
        """SDXL micro-conditioning (B, 6): original (h, w), crop (top, left), target (h, w)."""
        return torch.cat(
            [torch.as_tensor(t).reshape(-1, 2) for t in (original_size, crop_top_left, target_size)], 1
        ).float()

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """Conditioning of an online batch, or a cached batch's tensors; dropped captions as `caption_dropout_mode`."""
        if "latents" in batch:
            cond = {k: batch[k].to(self.device) for k in CONDITION_KEYS}
        else:
            prompt_embeds, pooled = self.encode_prompts(batch["captions"])  # a dropped caption is "" here
            cond = {
                "latents": self.encode_images(batch["pixel_values"]),
                "prompt_embeds": prompt_embeds,
                "pooled_prompt_embeds": pooled,
                "time_ids": self.time_ids(batch["original_size"], batch["crop_top_left"], batch["target_size"]).to(
                    self.device
                ),
            }
        if "dropped" in batch and bool(batch["dropped"].any()):
            cond = self.drop_captions(cond, batch["dropped"].to(self.device), cached="latents" in batch)
        return cond

    def drop_captions(self, cond: dict[str, Tensor], dropped: Tensor, cached: bool) -> dict[str, Tensor]:
        """The text conditioning of dropped samples: all zeros (SDXL's training, the stock pipeline's unconditional
        input), or the embeddings of "" (already computed online; encoded here for a cached batch)."""
        if self.caption_dropout_mode == "empty" and not cached:
            return cond
        uncond = None if self.caption_dropout_mode == "zeros" else self.encode_prompts([""])
        return replace_dropped(cond, dropped, uncond)


def replace_dropped(
    cond: dict[str, Tensor], dropped: Tensor, uncond: tuple[Tensor, Tensor] | None
) -> dict[str, Tensor]:
    """`cond` with the prompt and pooled embeddings of the `dropped` samples replaced by `uncond` (batch 1), or zeros."""
    cond = dict(cond)
    if uncond is None:
        uncond = (torch.zeros_like(cond["prompt_embeds"][:1]), torch.zeros_like(cond["pooled_prompt_embeds"][:1]))
    mask = dropped.view(-1, 1)
    cond["prompt_embeds"] = torch.where(mask[:, :, None], uncond[0].to(cond["prompt_embeds"]), cond["prompt_embeds"])
    cond["pooled_prompt_embeds"] = torch.where(
        mask, uncond[1].to(cond["pooled_prompt_embeds"]), cond["pooled_prompt_embeds"]
    )
    return cond


class CachedConditioner(nn.Module):
    """The conditioning of cached batches (koala.cache) with `zeros` caption dropout: no text encoder and no VAE in
    memory, only the VAE's scale factor (its config) and the device the tensors go to."""

    def __init__(self, vae_scale_factor: int, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.vae_scale_factor = vae_scale_factor
        self._device = torch.device(device)

    @classmethod
    def from_pretrained(
        cls,
        pipeline_dir: str | Path,
        vae: str | Path | None = None,
        device: str | torch.device = "cpu",
        config: str | Path | None = None,
    ) -> CachedConditioner:
        """Read the VAE's config (not its weights) from the pipeline (folder or file's configs), or the VAE folder."""
        source = PipelineSource(Path(pipeline_dir), Path(config) if config else None)
        vae_config = AutoencoderKL.load_config(vae) if vae else source.component_config("vae")
        return cls(2 ** (len(vae_config["block_out_channels"]) - 1), device)

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """A cached batch's tensors on the device; dropped samples' text conditioning zeroed."""
        if "latents" not in batch:
            raise ValueError("CachedConditioner reads cached batches only (data.kind=cached); this batch holds images")
        cond = {k: batch[k].to(self.device) for k in CONDITION_KEYS}
        if "dropped" in batch and bool(batch["dropped"].any()):
            cond = replace_dropped(cond, batch["dropped"].to(self.device), None)
        return cond
