"""Diffusers <-> original (SGM / ComfyUI) key layout for SDXL-shaped U-Net state dicts.

The original layout numbers every layer of the U-Net in one sequence: `input_blocks.0` is conv_in, then one
`input_blocks.n` per encoder layer (`.0` resnet, `.1` transformer) and one per downsampler (`.0.op`); the mid
block is `middle_block.{0,1,2}` (resnet, transformer, resnet); `output_blocks.n` holds one decoder layer (`.0`
resnet, `.1` transformer) with the stage's upsampler appended as the next index. Inside a resnet a few names differ
(tables below); inside a transformer they are identical. This is the mapping of diffusers'
`scripts/convert_diffusers_to_original_sdxl.py`, derived here from the state dict's own keys, so it fits any
SDXL-shaped U-Net: SDXL itself, the tiny test U-Net and students with fewer layers per stage.
"""

from __future__ import annotations

import re

import torch

from koala.models.inherit import longest_prefix

ORIGINAL_PREFIX = "model.diffusion_model."

# Whole-tensor prefixes outside the blocks: diffusers -> original.
TOP_LEVEL: dict[str, str] = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

# Sub-module names inside a resnet: diffusers -> original.
RESNET: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

_LAYER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.")


def _structure(keys) -> tuple[dict, dict, set]:
    """Per stage: number of resnets and which have transformers / samplers, read from diffusers keys."""
    down: dict[int, dict[str, set[int]]] = {}
    up: dict[int, dict[str, set[int]]] = {}
    mid: set[tuple[str, int]] = set()
    for k in keys:
        m = _LAYER.match(k)
        if m:
            table = down if m.group(1) == "down_blocks" else up
            table.setdefault(int(m.group(2)), {}).setdefault(m.group(3), set()).add(int(m.group(4)))
        m = _MID.match(k)
        if m:
            mid.add((m.group(1), int(m.group(2))))
    return down, up, mid


def module_prefix_map(keys) -> dict[str, str]:
    """Diffusers module prefix -> original module prefix for every block layer present in `keys`."""
    down, up, mid = _structure(keys)
    out: dict[str, str] = dict(TOP_LEVEL)
    n = 1  # input_blocks.0 is conv_in
    for i in sorted(down):
        parts = down[i]
        for j in sorted(parts.get("resnets", ())):
            out[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{n}.0"
            if j in parts.get("attentions", ()):
                out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
            n += 1
        if parts.get("downsamplers"):
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            n += 1
    has_mid_attn = any(kind == "attentions" for kind, _ in mid)
    for kind, j in sorted(mid):
        # with a transformer the order is resnet, transformer, resnet; without it two resnets in a row
        index = 2 * j + (1 if kind == "attentions" else 0) if has_mid_attn else j
        out[f"mid_block.{kind}.{j}"] = f"middle_block.{index}"
    n = 0
    for i in sorted(up):
        parts = up[i]
        resnets = sorted(parts.get("resnets", ()))
        for j in resnets:
            out[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{n}.0"
            has_attn = j in parts.get("attentions", ())
            if has_attn:
                out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
            if j == resnets[-1] and parts.get("upsamplers"):
                out[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if has_attn else 1}.conv"
            n += 1
    return out


def _convert_key(key: str, prefixes: dict[str, str]) -> str:
    """Translate one diffusers key by its longest mapped prefix, renaming resnet internals."""
    hit = longest_prefix(key, prefixes)
    if hit is None:
        raise KeyError(f"no original-layout name for U-Net tensor {key!r}")
    prefix, rest = hit
    if ".resnets." in f".{prefix}." and rest and rest[0] in RESNET:
        rest = [RESNET[rest[0]], *rest[1:]]
    return ".".join([prefixes[prefix], *rest])


def diffusers_to_original(
    state_dict: dict[str, torch.Tensor], prefix: str = ORIGINAL_PREFIX
) -> dict[str, torch.Tensor]:
    """A diffusers U-Net state dict in the original SDXL layout (keys `model.diffusion_model....` by default)."""
    prefixes = module_prefix_map(state_dict)
    out = {prefix + _convert_key(k, prefixes): v for k, v in state_dict.items()}
    if len(out) != len(state_dict):
        raise ValueError("two U-Net tensors map to the same original-layout name")
    return out


def is_original_layout(keys) -> bool:
    """Whether a state dict's keys are in the original (SGM / ComfyUI) layout rather than diffusers'."""
    keys = list(keys)
    return any(k.startswith(ORIGINAL_PREFIX) or k.startswith("input_blocks.") for k in keys)
