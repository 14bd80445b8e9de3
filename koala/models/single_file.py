"""One original-layout (SGM) `.safetensors` checkpoint: what it holds, read from its header alone, and its parts.

A full SDXL checkpoint (community fine-tunes; the files A1111, Forge and ComfyUI's "Load Checkpoint" read) holds four
parts under fixed prefixes (`PARTS`): the U-Net, CLIP-L (transformers key names), OpenCLIP-bigG (open_clip key
names) and the VAE. `describe_checkpoint` says what a file is from its tensor names and shapes, without reading any
weights: a full SDXL checkpoint, an SDXL U-Net alone, or another family (SD 1.x / 2.x, the SDXL refiner, SD3, Flux,
Stable Cascade); `require_full_sdxl` turns anything but the first into one error that names it. `read_part` reads the
tensors of one part (the file is memory-mapped; nothing else is read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from koala.models.convert import ORIGINAL_PREFIX

# The parts of a full SDXL checkpoint: diffusers component -> key prefix in the file.
PARTS: dict[str, str] = {
    "unet": ORIGINAL_PREFIX,
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
    "vae": "first_stage_model.",
}
# Other families, checked in order: (what the file is, key prefixes that mark it).
OTHER_FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("an SD3 / SD3.5 (MMDiT) checkpoint", (ORIGINAL_PREFIX + "joint_blocks.", "joint_blocks.")),
    ("a Flux checkpoint", (ORIGINAL_PREFIX + "double_blocks.", "double_blocks.")),
    ("a Stable Cascade checkpoint", ("clip_txt_mapper.", "down_blocks.1.0.channelwise.")),
    ("an SDXL refiner checkpoint (one OpenCLIP-bigG text encoder, no CLIP-L)", ("conditioner.embedders.0.model.",)),
    ("an SD 2.x checkpoint (OpenCLIP-H text encoder)", ("cond_stage_model.model.",)),
    ("an SD 1.x checkpoint (CLIP-L text encoder)", ("cond_stage_model.transformer.",)),
)
SDXL_MARKER = ORIGINAL_PREFIX + "label_emb.0.0.weight"  # the text_time embedding only SDXL-family U-Nets have
STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
INDEX_DTYPES = {"I64", "I32"}  # CLIP's position_ids buffer, kept in many files
FULL_HINT = (
    "teacher.pipeline takes a full SDXL checkpoint (U-Net model.diffusion_model.*, text encoders "
    "conditioner.embedders.0/1.*, VAE first_stage_model.*) or a diffusers SDXL folder"
)


@dataclass(frozen=True)
class CheckpointInfo:
    """What one checkpoint file holds, from its header: tensor shapes and dtypes by name, and what it is."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str] = field(repr=False)
    what: str  # "full SDXL", or a phrase naming what else the file is

    @property
    def is_full_sdxl(self) -> bool:
        return self.what == "full SDXL"

    @property
    def parts(self) -> list[str]:
        """The PARTS present."""
        return [name for name, prefix in PARTS.items() if any(k.startswith(prefix) for k in self.shapes)]


def read_header(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Names -> shapes and names -> safetensors dtypes, from the header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return {k: tuple(s.get_shape()) for k, s in slices.items()}, {k: s.get_dtype() for k, s in slices.items()}
    except Exception as exc:  # not a safetensors file (a renamed pickle, a truncated download)
        raise ValueError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


def _unet_family(shapes: dict[str, tuple[int, ...]]) -> str:
    """What a U-Net without SDXL's text_time embedding is, by its cross-attention width."""
    width = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    return {768: "an SD 1.x U-Net", 1024: "an SD 2.x U-Net"}.get(width, f"a U-Net with context width {width}")


def _what(shapes: dict[str, tuple[int, ...]]) -> str:
    """The description `CheckpointInfo.what` holds."""
    keys = list(shapes)
    for what, prefixes in OTHER_FAMILIES:
        if any(k.startswith(prefixes) for k in keys):
            return what
    present = [name for name, prefix in PARTS.items() if any(k.startswith(prefix) for k in keys)]
    if "unet" in present:
        if SDXL_MARKER not in shapes:
            return _unet_family(shapes) + " (not SDXL: no text_time embedding label_emb)"
        missing = [p for p in PARTS if p not in present]
        if not missing:
            return "full SDXL"
        if missing == ["text_encoder", "text_encoder_2", "vae"]:
            return "an SDXL U-Net alone (no text encoders, no VAE): pass it as teacher.unet=<file>"
        return f"an SDXL checkpoint without its {' and '.join(missing)} ({', '.join(PARTS[m] + '*' for m in missing)})"
    if any(k.startswith("input_blocks.") for k in keys):
        return "a bare U-Net in the original layout (no model.diffusion_model. prefix): pass it as teacher.unet=<file>"
    if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys) and any("attentions" in k for k in keys):
        return "a U-Net in diffusers key layout: pass it as teacher.unet=<file>"
    return f"not a Stable Diffusion checkpoint koala recognises (first tensors: {', '.join(sorted(keys)[:3])})"


def describe_checkpoint(path: str | Path) -> CheckpointInfo:
    """What a `.safetensors` checkpoint holds, from its header (no weights are read)."""
    shapes, dtypes = read_header(path)
    return CheckpointInfo(Path(path), shapes, dtypes, _what(shapes))


def require_full_sdxl(path: str | Path) -> CheckpointInfo:
    """The description of a full SDXL checkpoint stored in fp32, fp16 or bf16; anything else raises saying what it
    is."""
    info = describe_checkpoint(path)
    if not info.is_full_sdxl:
        raise ValueError(f"{path} is {info.what}; {FULL_HINT}")
    odd = sorted({d for d in info.dtypes.values() if d not in STORED_DTYPES and d not in INDEX_DTYPES})
    if odd:
        raise ValueError(f"{path} stores tensors as {', '.join(odd)}; koala reads checkpoints in fp32, fp16 or bf16")
    return info


def read_part(path: str | Path, part: str) -> dict[str, torch.Tensor]:
    """The tensors of one part (`PARTS` key), with their full names, in their stored precision."""
    prefix = PARTS[part]
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def meta_part(info: CheckpointInfo, part: str) -> dict[str, torch.Tensor]:
    """One part as meta tensors of the stored shapes (for checking a conversion without reading weights)."""
    prefix = PARTS[part]
    return {k: torch.empty(s, device="meta") for k, s in info.shapes.items() if k.startswith(prefix)}
