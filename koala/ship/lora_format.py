"""Reading SDXL LoRA files: the diffusers / PEFT layout and the kohya layout (SGM or diffusers module names).

Every supported layout is read into one form: `{(component, module): Adapter}`, where `component` is `unet`,
`text_encoder` or `text_encoder_2`, `module` is the diffusers module name (`down_blocks.1.attentions.0.proj_in`,
`text_model.encoder.layers.0.self_attn.q_proj`) and the adapter's delta is `scale * up @ down`. Layouts (keys):

  PEFT / diffusers   unet.<module>.lora_A.weight, .lora_B.weight        (alpha from `lora_adapter_metadata`)
  older diffusers    unet.<module>.lora.down.weight, .lora.up.weight, unet.<...>.processor.to_q_lora.down.weight,
                     text_encoder.<module>.lora_linear_layer.down.weight, optional <module>.alpha
  kohya              lora_unet_<module with _>.lora_down.weight, .lora_up.weight, .alpha; U-Net modules in the
                     original SGM numbering (input_blocks_4_1_...) or diffusers' (down_blocks_1_attentions_0_...);
                     lora_te1_ / lora_te2_ for the two text encoders

A key in none of these forms, a module the teacher does not have or a shape that does not fit it raises naming
the key, before anything is written.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from koala.models.convert import diffusers_to_original

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_COMPONENTS = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save zip archive, raw pickle protocol >= 2
LAYOUTS = "PEFT/diffusers (unet.<module>.lora_A.weight) or kohya (lora_unet_<module>.lora_down.weight)"

_PEFT = re.compile(r"^(?:(unet|text_encoder|text_encoder_2)\.)?(.+)\.lora_([AB])\.weight$")
_OLD = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
_PROCESSOR = re.compile(r"^(unet)\.(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_DIFFUSERS_ALPHA = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.alpha$")
_KOHYA = re.compile(r"^lora_(unet|te1|te2|te)_(.+?)\.(?:(lora_down|lora_up)\.weight|(alpha))$")
_CLIP_KOHYA = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn|mlp)_(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$")
_CLIP_MODULE = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


@dataclass
class Adapter:
    """One low-rank update: delta W = scale * up @ down (convolutions flattened)."""

    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    scale: float = 1.0

    def norm_sq(self) -> float:
        """Squared Frobenius norm of the weight delta, without forming it: tr((UᵀU)(DDᵀ)) · scale²."""
        u, d = self.up.flatten(1).double(), self.down.flatten(1).double()
        return float(((u.T @ u) * (d @ d.T)).sum()) * self.scale**2


def read_safetensors(path: str | Path, what: str = "LoRA") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file; pickles (by suffix or content) are refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
    with path.open("rb") as f:
        head = f.read(4)
    if path.suffix.lower() in PICKLE_SUFFIXES or head.startswith(PICKLE_MAGIC):
        raise ValueError(
            f"{path}: {what} file is a pickle (torch.save / .ckpt / .bin), refused because loading it can run "
            "arbitrary code; convert it to .safetensors (safetensors.torch.save_file) and pass that"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path}: not a readable safetensors {what} file ({e})") from e


def teacher_module_tables(teacher: torch.nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Weight shape of every Linear / Conv2d of the teacher U-Net, and kohya name -> diffusers module name.

    Kohya names are the module's original (SGM) name or its diffusers name with dots as underscores. `teacher`
    may live on the meta device: only names and shapes are read.
    """
    shapes = {
        n: tuple(m.weight.shape)
        for n, m in teacher.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }
    state = {f"{n}.weight": torch.empty(0) for n in shapes}
    original = diffusers_to_original(state, prefix="")
    kohya = {}
    for (key, _), sgm in zip(state.items(), original):
        module = key[: -len(".weight")]
        kohya[sgm[: -len(".weight")].replace(".", "_")] = module
        kohya[module.replace(".", "_")] = module
    return shapes, kohya


def _metadata_scale(metadata: dict[str, str], component: str, module: str, rank: int) -> float | None:
    """lora_alpha / r (or / sqrt(r) with rsLoRA) from diffusers' `lora_adapter_metadata`, when the file has it."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    meta = json.loads(raw)
    alpha = meta.get(f"{component}.lora_alpha")
    if alpha is None:
        return None
    for pattern, value in (meta.get(f"{component}.alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = value
    return alpha / (math.sqrt(rank) if meta.get(f"{component}.use_rslora") else rank)


def _classify(key: str, kohya_unet: dict[str, str]) -> tuple[str, str, str] | None:
    """(component, diffusers module, role in down/up/alpha) of one key, or None when no layout matches."""
    if m := _PROCESSOR.match(key):
        proj = m.group(3) + (".0" if m.group(3) == "to_out" else "")
        return m.group(1), f"{m.group(2)}.{proj}", m.group(4)
    if m := _OLD.match(key):
        return m.group(1), m.group(2), m.group(3)
    if m := _PEFT.match(key):
        return m.group(1) or "unet", m.group(2), "down" if m.group(3) == "A" else "up"
    if m := _DIFFUSERS_ALPHA.match(key):
        return m.group(1), m.group(2), "alpha"
    if m := _KOHYA.match(key):
        which, name = m.group(1), m.group(2)
        role = "alpha" if m.group(4) else ("down" if m.group(3) == "lora_down" else "up")
        if which == "te":
            raise ValueError(
                f"LoRA key {key!r} is for a single text encoder (lora_te_): an SD 1.x / 2.x LoRA, not SDXL "
                "(SDXL LoRAs use lora_te1_ / lora_te2_)"
            )
        if which == "unet":
            return "unet", kohya_unet.get(name, name), role
        clip = _CLIP_KOHYA.match(name)
        module = f"text_model.encoder.layers.{clip.group(1)}.{clip.group(2)}.{clip.group(3)}" if clip else name
        return KOHYA_COMPONENTS[which], module, role
    return None


def parse_lora(
    state: dict[str, torch.Tensor],
    metadata: dict[str, str],
    teacher_shapes: dict[str, tuple[int, ...]],
    kohya_unet: dict[str, str],
    source: str = "LoRA",
) -> dict[tuple[str, str], Adapter]:
    """Group a LoRA state dict into adapters per (component, module), checked against the teacher's modules."""
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        hit = _classify(key, kohya_unet)
        if hit is None:
            unknown.append(key)
            continue
        parts.setdefault(hit[:2], {})[hit[2]] = tensor
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} keys in no LoRA layout this reads ({LAYOUTS}; LoHa / LoKr / DoRA are not "
            f"supported), e.g. {', '.join(unknown[:3])}"
        )
    _check_modules(parts, teacher_shapes, source)
    adapters = {}
    for (component, module), p in parts.items():
        if "down" not in p or "up" not in p:
            raise ValueError(f"{source}: {component} module {module!r} has {sorted(p)} but needs both down and up")
        down, up = p["down"], p["up"]
        if up.shape[1] != down.shape[0]:
            raise ValueError(
                f"{source}: {component} {module!r}: up {tuple(up.shape)} and down {tuple(down.shape)} ranks differ"
            )
        if component == "unet":
            _check_shape(module, down, up, teacher_shapes[module], source)
        rank = down.shape[0]
        scale = float(p["alpha"]) / rank if "alpha" in p else _metadata_scale(metadata, component, module, rank)
        adapters[(component, module)] = Adapter(down, up, 1.0 if scale is None else scale)
    return adapters


def _check_modules(parts: dict, teacher_shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Every U-Net module must exist in the SDXL teacher, every text-encoder one must be a CLIP projection."""
    bad_unet = sorted(m for c, m in parts if c == "unet" and m not in teacher_shapes)
    if bad_unet:
        sd1 = any(
            m.startswith(("down_blocks_0_attentions", "down_blocks.0.attentions", "input_blocks_1_1")) for m in bad_unet
        )
        hint = " (down_blocks.0 has attention layers: an SD 1.x / 2.x LoRA)" if sd1 else ""
        raise ValueError(
            f"{source}: {len(bad_unet)} LoRA modules name U-Net layers the SDXL teacher does not have{hint}, "
            f"e.g. {', '.join(bad_unet[:3])}; is it a LoRA for another base model?"
        )
    bad_text = sorted(f"{c}.{m}" for c, m in parts if c != "unet" and not _CLIP_MODULE.match(m))
    if bad_text:
        raise ValueError(f"{source}: unknown text-encoder LoRA modules, e.g. {', '.join(bad_text[:3])}")


def _check_shape(module: str, down: torch.Tensor, up: torch.Tensor, weight: tuple[int, ...], source: str) -> None:
    """The adapter's input and output widths (and kernel) must be those of the teacher layer."""
    out_f, in_f = weight[0], weight[1]
    kernel_ok = len(weight) == 2 or tuple(down.shape[2:]) == tuple(weight[2:])
    if down.shape[1] != in_f or up.shape[0] != out_f or not kernel_ok:
        raise ValueError(
            f"{source}: LoRA for {module!r} maps {down.shape[1]} -> {up.shape[0]} features (down {tuple(down.shape)}), "
            f"but the SDXL teacher's layer has weight {weight}: a LoRA for another base model (SD 1.x: 768-wide "
            "cross-attention)?"
        )
