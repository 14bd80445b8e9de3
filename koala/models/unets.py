"""Compressed SDXL U-Nets from a teacher config and a student spec: resolution, the student's config, building.

`layout` reads a diffusers U-Net config (koala.models.archs, or a teacher's config.json) into per-stage, per-layer
tables; `resolve` checks a `StudentSpec` (koala.models.specs) against them and fills in every default, giving the
`Plan` of what each student layer inherits (resolved once per run: everything downstream takes the plan);
`student_config` derives the student's diffusers config from the teacher's and a plan; `build_unet` /
`build_student` instantiate them (on the meta device when asked). Weight inheritance along the plan:
koala.models.inherit.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from koala.models.specs import LayerSelect, MidMode, StudentSpec

# ---------------------------------------------------------------------------------------------------------------
# Reading a teacher config into per-layer tables
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Per-stage, per-layer structure of a U-Net config (diffusers indexing)."""

    has_attn_down: tuple[bool, ...]
    has_attn_up: tuple[bool, ...]
    down_depth: tuple[tuple[int, ...], ...]  # [stage][layer] transformer depth (0 where the block has none)
    up_depth: tuple[tuple[int, ...], ...]
    mid: MidMode
    mid_depth: int
    channels: tuple[int, ...] = ()  # block_out_channels: each stage's width (students keep the teacher's)

    @property
    def num_stages(self) -> int:
        return len(self.down_depth)


def _per_layer(value: Any, n_layers: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),) * n_layers


def layout(config: dict[str, Any]) -> Layout:
    """Read the per-layer structure of a diffusers UNet2DConditionModel config."""
    n = len(config["down_block_types"])
    lpb = config.get("layers_per_block", 2)
    lpb = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n
    tl = config.get("transformer_layers_per_block", 1)
    tl = list(tl) if isinstance(tl, (list, tuple)) else [tl] * n
    has_down = tuple("CrossAttn" in t for t in config["down_block_types"])
    has_up = tuple("CrossAttn" in t for t in config["up_block_types"])
    down = tuple(_per_layer(tl[i], lpb[i]) if has_down[i] else (0,) * lpb[i] for i in range(n))
    rev = config.get("reverse_transformer_layers_per_block")
    up = []
    for j in range(n):
        n_up = lpb[n - 1 - j] + 1
        d = rev[j] if rev is not None else tl[n - 1 - j]
        up.append(_per_layer(d, n_up) if has_up[j] else (0,) * n_up)
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    mid = {"UNetMidBlock2DCrossAttn": MidMode.keep, "UNetMidBlock2D": MidMode.resnet, None: MidMode.none}[mid_type]
    mid_depth = tl[-1][0] if isinstance(tl[-1], (list, tuple)) else int(tl[-1])
    channels = tuple(config.get("block_out_channels", ()))
    return Layout(has_down, has_up, down, tuple(up), mid, mid_depth if mid == "keep" else 0, channels)


# ---------------------------------------------------------------------------------------------------------------
# Spec -> student config
# ---------------------------------------------------------------------------------------------------------------


def _resolve_keep(keep, teacher_depth, where: str) -> tuple[tuple[int, ...], ...]:
    if keep is None:
        return tuple(tuple(range(len(d))) for d in teacher_depth)
    if len(keep) != len(teacher_depth):
        raise ValueError(f"{where}_keep has {len(keep)} stages, the teacher has {len(teacher_depth)}")
    for i, (k, d) in enumerate(zip(keep, teacher_depth)):
        bad = [x for x in k if not 0 <= x < len(d)]
        if bad or not k or len(set(k)) != len(k):
            raise ValueError(
                f"{where} stage {i} keeps layers {list(k)}, but the teacher's stage has layers {list(range(len(d)))} "
                "(each kept once, at least one)"
            )
    return tuple(tuple(int(x) for x in k) for k in keep)


def _resolve_depth(depth, keep, teacher_depth, has_attn, where: str) -> tuple[tuple[int, ...], ...]:
    if depth is None:
        return tuple(tuple(teacher_depth[i][k] for k in keep[i]) for i in range(len(keep)))
    if len(depth) != len(keep):
        raise ValueError(f"{where}_depth has {len(depth)} stages, the teacher has {len(keep)}")
    out = []
    for i, d in enumerate(depth):
        per = _per_layer(d, len(keep[i]))
        if len(per) != len(keep[i]):
            raise ValueError(f"{where} stage {i}: {len(per)} depths for {len(keep[i])} kept layers")
        if not has_attn[i]:
            per = (0,) * len(keep[i])  # blocks without attention have no transformer to size
        for j, k in enumerate(keep[i]):
            if per[j] > teacher_depth[i][k]:
                raise ValueError(
                    f"{where} stage {i} layer {j} asks for transformer depth {per[j]}, but the teacher layer it "
                    f"inherits from (layer {k}) has only {teacher_depth[i][k]}"
                )
            if has_attn[i] and per[j] < 1:
                raise ValueError(f"{where} stage {i} layer {j}: a cross-attention block needs depth >= 1")
        out.append(per)
    return tuple(out)


@dataclass(frozen=True)
class Plan:
    """A spec resolved against one teacher config: what every student layer inherits."""

    spec: StudentSpec
    teacher: Layout
    encoder_keep: tuple[tuple[int, ...], ...]
    decoder_keep: tuple[tuple[int, ...], ...]
    encoder_depth: tuple[tuple[int, ...], ...]
    decoder_depth: tuple[tuple[int, ...], ...]
    mid: MidMode
    mid_depth: int


def resolve(teacher_config: dict[str, Any], spec: StudentSpec) -> Plan:
    """Check a spec against a teacher config and resolve every default; errors say what does not fit."""
    t = layout(teacher_config)
    LayerSelect(spec.layer_select)  # a spec written in code: its choices are checked here (and `mid` below)
    ek = _resolve_keep(spec.encoder_keep, t.down_depth, "encoder")
    dk = _resolve_keep(spec.decoder_keep, t.up_depth, "decoder")
    n = t.num_stages
    for j in range(n):
        if len(dk[j]) != len(ek[n - 1 - j]) + 1:
            raise ValueError(
                f"decoder stage {j} keeps {len(dk[j])} layers but its mirrored encoder stage {n - 1 - j} keeps "
                f"{len(ek[n - 1 - j])}; a diffusers U-Net needs exactly one more decoder layer than encoder layers"
            )
    ed = _resolve_depth(spec.encoder_depth, ek, t.down_depth, t.has_attn_down, "encoder")
    dd = _resolve_depth(spec.decoder_depth, dk, t.up_depth, t.has_attn_up, "decoder")
    mid, mid_depth = MidMode(spec.mid), 0
    if mid != "none" and t.mid == "none":
        raise ValueError(f"mid={mid!r} but the teacher has no mid block to inherit from")
    if mid == "keep":
        if t.mid != "keep":
            raise ValueError("mid='keep' needs a teacher with a cross-attention mid block")
        mid_depth = spec.mid_depth if spec.mid_depth is not None else t.mid_depth
        if not 1 <= mid_depth <= t.mid_depth:
            raise ValueError(f"mid_depth {mid_depth} must be between 1 and the teacher's {t.mid_depth}")
        if mid_depth != ed[-1][0]:
            raise ValueError(
                f"mid_depth {mid_depth} differs from the deepest encoder stage's depth {ed[-1][0]}: diffusers derives "
                "the mid block's depth from transformer_layers_per_block[-1], so they must be equal"
            )
    return Plan(spec, t, ek, dk, ed, dd, mid, mid_depth)


def student_config(teacher_config: dict[str, Any], student: Plan | StudentSpec) -> dict[str, Any]:
    """The diffusers config of a student, derived from `teacher_config`: a plan resolved against that config, or a
    spec (resolved here)."""
    p = student if isinstance(student, Plan) else resolve(teacher_config, student)
    cfg = copy.deepcopy({k: v for k, v in teacher_config.items() if not k.startswith("_")})
    n = p.teacher.num_stages
    lpb = [len(k) for k in p.encoder_keep]
    cfg["layers_per_block"] = lpb[0] if len(set(lpb)) == 1 else lpb
    # Stage depths for diffusers: an int per stage where every layer agrees, else a list per layer.
    enc = [d[0] if len(set(d)) == 1 else list(d) for d in p.encoder_depth]
    enc = [e if p.teacher.has_attn_down[i] else _first_int(teacher_config, i) for i, e in enumerate(enc)]
    derived_up = [
        _per_layer(enc[n - 1 - j], len(p.decoder_keep[j]))
        if p.teacher.has_attn_up[j]
        else (0,) * len(p.decoder_keep[j])
        for j in range(n)
    ]
    symmetric = all(not isinstance(e, list) for e in enc) and tuple(derived_up) == p.decoder_depth
    cfg["transformer_layers_per_block"] = enc
    cfg.pop("reverse_transformer_layers_per_block", None)
    if not symmetric:
        cfg["transformer_layers_per_block"] = [list(_per_layer(e, lpb[i])) for i, e in enumerate(enc)]
        cfg["reverse_transformer_layers_per_block"] = [
            list(d) if p.teacher.has_attn_up[j] else [1] * len(d) for j, d in enumerate(p.decoder_depth)
        ]
    cfg["mid_block_type"] = {"keep": "UNetMidBlock2DCrossAttn", "resnet": "UNetMidBlock2D", "none": None}[p.mid]
    return cfg


def _first_int(config: dict[str, Any], stage: int) -> int:
    tl = config.get("transformer_layers_per_block", 1)
    v = tl[stage] if isinstance(tl, (list, tuple)) else tl
    return v[0] if isinstance(v, (list, tuple)) else int(v)


# ---------------------------------------------------------------------------------------------------------------
# Building and initialising
# ---------------------------------------------------------------------------------------------------------------


def build_unet(config: dict[str, Any], device: str | torch.device | None = None) -> UNet2DConditionModel:
    """Instantiate a U-Net from a config dict; `device="meta"` allocates no memory."""
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device(device or "cpu"):
        return UNet2DConditionModel(**cfg)


def build_student(
    teacher_config: dict[str, Any], student: Plan | StudentSpec, device: str | torch.device | None = None
) -> UNet2DConditionModel:
    """Build the (uninitialised) student U-Net of a plan (or a spec, resolved here) for this teacher."""
    return build_unet(student_config(teacher_config, student), device=device)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_self_attention(module: torch.nn.Module) -> int:
    return sum(1 for n, _ in module.named_modules() if n.endswith(".attn1"))


def stage_rows(unet: UNet2DConditionModel) -> list[dict[str, Any]]:
    """Per-stage structure of a built U-Net: residual blocks, transformer depths, self-attention layers."""
    rows = []
    for kind, blocks in (("encoder", unet.down_blocks), ("decoder", unet.up_blocks)):
        for i, b in enumerate(blocks):
            attns = getattr(b, "attentions", None) or []
            rows.append(
                {
                    "stage": f"{kind}.{i}",
                    "channels": b.resnets[-1].out_channels,
                    "resnets": len(b.resnets),
                    "depth": [len(a.transformer_blocks) for a in attns],
                    "self_attn": sum(len(a.transformer_blocks) for a in attns),
                }
            )
    if unet.mid_block is not None:
        attns = getattr(unet.mid_block, "attentions", None) or []
        rows.insert(
            len(unet.down_blocks),
            {
                "stage": "mid",
                "channels": unet.mid_block.resnets[-1].out_channels,
                "resnets": len(unet.mid_block.resnets),
                "depth": [len(a.transformer_blocks) for a in attns],
                "self_attn": sum(len(a.transformer_blocks) for a in attns),
            },
        )
    return rows
