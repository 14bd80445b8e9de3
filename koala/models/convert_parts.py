"""Diffusers -> original (SGM) key layout for SDXL's text encoders and VAE, and the whole single-file checkpoint.

The inverse of what diffusers' single-file loader reads (`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`,
`convert_ldm_vae_checkpoint`), as the SDXL checkpoints of Stability, A1111 and ComfyUI store the parts:
CLIP-L keeps transformers' names under `conditioner.embedders.0.transformer.text_model.`; OpenCLIP-bigG uses open_clip's
(one fused `in_proj` per attention, `text_projection` stored as an (in, out) matrix); the VAE uses the original
autoencoder's names (`down.{i}.block.{j}`, `mid.attn_1.q` as a 1x1 convolution, decoder stages numbered from the
bottom). Tests check each against diffusers' reader: converting back gives the same tensors.
"""

from __future__ import annotations

import re

import torch

from koala.models.convert import diffusers_to_original
from koala.models.single_file import PARTS

# Inside a bigG encoder layer: transformers -> open_clip.
OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
# Inside the VAE: diffusers -> original, for names that differ.
VAE_NAMES = {"conv_shortcut": "nin_shortcut", "conv_norm_out": "norm_out", "group_norm": "norm", "to_q": "q",
             "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}  # fmt: skip
_CLIP_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = re.compile(r"^self_attn\.([qkv])_proj$")


def _text_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text model's tensors named from inside `text_model` (transformers >= 5.6 already drops the prefix)."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def clip_l_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP-L (transformers CLIPTextModel) -> `conditioner.embedders.0.transformer.text_model.*`."""
    prefix = PARTS["text_encoder"] + "text_model."
    out = {prefix + k: v for k, v in _text_model_keys(state).items()}
    width = out[prefix + "embeddings.position_embedding.weight"].shape[0]
    out[prefix + "embeddings.position_ids"] = torch.arange(width).unsqueeze(0)  # as SDXL's own file carries it
    return out


def open_clip_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP-bigG (transformers CLIPTextModelWithProjection) -> `conditioner.embedders.1.model.*`."""
    prefix, out, qkv = PARTS["text_encoder_2"], {}, {}
    for key, value in _text_model_keys(state).items():
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()  # open_clip multiplies x @ P
        elif key in OPEN_CLIP_TOP:
            out[prefix + OPEN_CLIP_TOP[key]] = value
        elif m := _CLIP_LAYER.match(key):
            layer, module, kind = m.groups()
            if q := _QKV.match(module):
                qkv.setdefault((layer, kind), {})[q.group(1)] = value
            else:
                out[f"{prefix}transformer.resblocks.{layer}.{OPEN_CLIP_LAYER[module]}.{kind}"] = value
        else:
            raise KeyError(f"no original-layout name for text encoder tensor {key!r}")
    for (layer, kind), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def _vae_key(key: str, n_up: int) -> str:
    """One diffusers VAE key under its original name."""
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_up - 1 - int(m.group(1))}.block.", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_up - 1 - int(m.group(1))}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", key)
    key = key.replace("mid_block.attentions.0.", "mid.attn_1.")
    for new, old in VAE_NAMES.items():
        key = key.replace(f".{new}.", f".{old}.")
    return key


def vae_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL -> `first_stage_model.*` (mid-block attention as 1x1 convolutions)."""
    n_up = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    out = {}
    for key, value in state.items():
        name = _vae_key(key, n_up)
        if ".mid.attn_1." in name and name.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value.reshape(*value.shape, 1, 1)  # (C, C) linear -> (C, C, 1, 1) convolution
        out[PARTS["vae"] + name] = value
    return out


def pipeline_to_original(
    unet: dict[str, torch.Tensor],
    text_encoder: dict[str, torch.Tensor],
    text_encoder_2: dict[str, torch.Tensor],
    vae: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The four parts' diffusers state dicts as one original-layout SDXL checkpoint (the Load Checkpoint file)."""
    out = diffusers_to_original(unet)
    for part in (clip_l_to_original(text_encoder), open_clip_to_original(text_encoder_2), vae_to_original(vae)):
        out.update(part)
    return out
