"""Tiny SDXL-shaped components built in code: the offline stand-in for SDXL weights.

`build_tiny_pipeline` gives a complete `StableDiffusionXLPipeline` (tiny U-Net of SDXL's shape, two tiny CLIP text
encoders with a byte-level tokenizer written to disk, a tiny VAE, SDXL's Euler scheduler) with random weights.
`write_tiny_pipeline` saves it as a diffusers folder, so every loader in the project reads it the way it reads real
SDXL: only the weights differ.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from koala.rng import rng_preserved
from koala.unets import TINY_UNET_CONFIG, build_unet

TEXT_HIDDEN = 32  # each tiny text encoder; the U-Net's cross-attention width is 2 x this
SDXL_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_byte_tokenizer(path: str | Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Write a byte-level CLIP tokenizer (no merges: one token per byte) and load it back."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(path)
    return CLIPTokenizer.from_pretrained(path)


def _text_config(vocab_size: int, pad_id: int, projection: bool) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=TEXT_HIDDEN,
        pad_token_id=pad_id,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        hidden_act="gelu" if projection else "quick_gelu",
    )


def build_tiny_vae() -> AutoencoderKL:
    """A two-level VAE (scale factor 2) with SDXL's latent channels and scaling factor."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def build_tiny_pipeline(seed: int = 0, unet_config: dict | None = None) -> StableDiffusionXLPipeline:
    """A complete random-weight SDXL pipeline of tiny size, deterministic in `seed` (the global RNG is left as found)."""
    with rng_preserved():
        torch.manual_seed(seed)
        return _build_tiny_pipeline(unet_config)


def _build_tiny_pipeline(unet_config: dict | None) -> StableDiffusionXLPipeline:
    """The parts of `build_tiny_pipeline`, drawn from the current global RNG."""
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_byte_tokenizer(Path(tmp) / "tokenizer")
        tok2 = write_byte_tokenizer(Path(tmp) / "tokenizer_2", pad_token="!")
    vocab = len(tok)
    text_encoder = CLIPTextModel(_text_config(vocab, tok.pad_token_id, projection=False))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab, tok2.pad_token_id, projection=True))
    unet = build_unet(unet_config or TINY_UNET_CONFIG)
    vae = build_tiny_vae()
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=scheduler,
    )


def write_tiny_pipeline(path: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Save a tiny SDXL pipeline as a diffusers folder (safetensors); reuse an existing complete one."""
    path = Path(path)
    if (path / "model_index.json").exists() and not overwrite:
        return path
    tmp = path.with_name(path.name + ".tmp")
    build_tiny_pipeline(seed).save_pretrained(tmp, safe_serialization=True)
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)  # model_index.json appears only once the whole folder is in place
    return path
