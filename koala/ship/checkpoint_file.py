"""The student as one original-layout SDXL checkpoint: the file ComfyUI's "Load Checkpoint" node reads.

`write_checkpoint_file` writes a pipeline's U-Net, both text encoders and VAE under the SGM names
(koala.models.convert_parts), fp16 by default as SDXL's own checkpoint is stored. Whether a UI can use it depends on
its U-Net: ComfyUI picks the model class from the file's shapes (`comfy/model_detection.py`) and knows only the
SDXL-family layouts in `COMFY_SDXL_MODELS` (its `supported_models.py`); any other depth fails there with "Could not
detect model type". `comfy_model_name` predicts ComfyUI's answer from the same tensors, and export warns when it is
None (tests/test_checkpoint_file.py checks the prediction against ComfyUI's own code).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

from koala.models.convert import ORIGINAL_PREFIX
from koala.models.convert_parts import pipeline_to_original

log = logging.getLogger("koala.ship")

# What every SDXL-family model of ComfyUI shares (its unet_config keys besides the depths).
COMFY_SDXL_FAMILY = {
    "model_channels": 320,
    "context_dim": 2048,
    "adm_in_channels": 2816,
    "use_linear_in_transformer": True,
}
# ComfyUI's SDXL-family models and their `transformer_depth`: one entry per encoder layer (input block with a
# resnet), the number of transformer blocks in it.
COMFY_SDXL_MODELS: dict[str, tuple[int, ...]] = {
    "SDXL": (0, 0, 2, 2, 10, 10),
    "SSD1B": (0, 0, 2, 2, 4, 4),
    "KOALA_700M": (0, 2, 5),
    "KOALA_1B": (0, 2, 6),
    "Segmind_Vega": (0, 0, 1, 1, 2, 2),
}
_INPUT = re.compile(re.escape(ORIGINAL_PREFIX) + r"input_blocks\.(\d+)\.")
_TRANSFORMER = re.compile(re.escape(ORIGINAL_PREFIX) + r"input_blocks\.(\d+)\.1\.transformer_blocks\.(\d+)\.")


def comfy_features(shapes: dict[str, tuple[int, ...]]) -> dict:
    """What ComfyUI's detection matches on, read from an original-layout U-Net's tensor shapes as it reads them."""
    blocks = sorted({int(m.group(1)) for k in shapes if (m := _INPUT.match(k))})
    depth: dict[int, set[int]] = {}
    for k in shapes:
        if m := _TRANSFORMER.match(k):
            depth.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    has_resnet = [n for n in blocks if f"{ORIGINAL_PREFIX}input_blocks.{n}.0.in_layers.0.weight" in shapes]
    context = next(
        (s[1] for k, s in shapes.items() if k.startswith(ORIGINAL_PREFIX) and "attn2.to_k.weight" in k), None
    )
    adm = shapes.get(f"{ORIGINAL_PREFIX}label_emb.0.0.weight")
    proj_in = next(
        (s for k, s in shapes.items() if k.startswith(ORIGINAL_PREFIX) and k.endswith("1.proj_in.weight")), ()
    )
    return {
        "use_linear_in_transformer": len(proj_in) == 2,
        "model_channels": shapes[f"{ORIGINAL_PREFIX}input_blocks.0.0.weight"][0],
        "context_dim": context,
        "adm_in_channels": adm[1] if adm else None,
        "transformer_depth": tuple(len(depth.get(n, ())) for n in has_resnet),
    }


def comfy_model_name(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The ComfyUI model class that would load a checkpoint with these tensor shapes, or None (ComfyUI then fails with
    "Could not detect model type")."""
    found = comfy_features(shapes)
    if any(found[k] != v for k, v in COMFY_SDXL_FAMILY.items()):
        return None
    return next((name for name, d in COMFY_SDXL_MODELS.items() if d == found["transformer_depth"]), None)


def checkpoint_state(pipe: StableDiffusionXLPipeline, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The pipeline's U-Net, text encoders and VAE as one original-layout state dict, floats cast to `dtype`."""
    state = pipeline_to_original(
        pipe.unet.state_dict(), pipe.text_encoder.state_dict(), pipe.text_encoder_2.state_dict(), pipe.vae.state_dict()
    )
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def write_checkpoint_file(
    pipe: StableDiffusionXLPipeline, path: str | Path, dtype: torch.dtype = torch.float16
) -> Path:
    """Write the single-file checkpoint atomically (temp name, fsync, rename); returns its path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(checkpoint_state(pipe, dtype), str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def warn_unless_comfy_detects(unet_state: dict[str, torch.Tensor], path: Path) -> str | None:
    """ComfyUI's model name for the checkpoint's U-Net; a warning saying what fails when there is none."""
    shapes = {k: tuple(v.shape) for k, v in unet_state.items()}
    name = comfy_model_name(shapes)
    if name is None:
        found = comfy_features(shapes)
        known = ", ".join(f"{n} {list(d)}" for n, d in COMFY_SDXL_MODELS.items())
        log.warning(
            "%s: ComfyUI's Load Checkpoint will fail on this student (\"Could not detect model type\"): it detects "
            "SDXL-family U-Nets with %s only by their encoder transformer depths (%s); this one has channels %s, "
            "context %s, pooled+time input %s, depths %s. diffusers loads the file (from_single_file with the export "
            "folder as config) and the export folder itself.",
            path.name, COMFY_SDXL_FAMILY, known, found["model_channels"], found["context_dim"],
            found["adm_in_channels"], list(found["transformer_depth"]),
        )  # fmt: skip
    return name
