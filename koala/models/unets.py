"""Compressed SDXL U-Nets: the teacher config as data, student specs as data, and weight inheritance.

A `StudentSpec` says, relative to *any* SDXL-shaped teacher config, which residual(+transformer) layers each
encoder and decoder stage keeps, how deep each kept transformer is, and what happens to the mid block.
`student_config` derives the diffusers config; `module_map` gives, as data, the teacher module every student
module inherits from; `inherit_weights` copies tensors along that map and refuses anything it cannot place.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from enum import auto
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from koala.config.choice import Choice


class LayerSelect(Choice):
    """Which teacher transformer layers a shallower student transformer takes (`unet.layer_select`) or is compared
    with (`distill.pairing`)."""

    first = auto()
    uniform = auto()
    last = auto()


class MidMode(Choice):
    """What a student keeps of the mid block (`unet.mid`)."""

    keep = auto()  # the cross-attention mid block
    resnet = auto()  # one resnet, no transformer
    none = auto()  # no mid block


# The SDXL-Base-1.0 U-Net (also SDXL-Lightning's and SDXL-Turbo's): 2,567,463,684 parameters.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# A tiny SDXL-shaped U-Net (same block types, text_time conditioning, depth-4 deepest stage) for tests and the
# demo. Its cross-attention width is the two tiny text encoders' hidden sizes concatenated (32 + 32), and its
# projection input is 6 time ids x 8 + the 32-wide pooled embedding.
TINY_UNET_CONFIG: dict[str, Any] = {
    **SDXL_UNET_CONFIG,
    "addition_time_embed_dim": 8,
    "attention_head_dim": [1, 2, 4],
    "block_out_channels": [32, 64, 128],
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
    "projection_class_embeddings_input_dim": 80,
    "sample_size": 32,
    "transformer_layers_per_block": [1, 2, 4],
}

# SDXL-Base-1.0's scheduler config (scheduler/scheduler_config.json): the training noise schedule of SDXL teachers
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

# A medium SDXL-shaped U-Net for CPU step-time benchmarks: big enough that convolutions and attention, not Python
# overhead, dominate a step (head dim 64 as in SDXL), small enough for two CPU cores.
MEDIUM_UNET_CONFIG: dict[str, Any] = {
    **TINY_UNET_CONFIG,
    "addition_time_embed_dim": 32,
    "attention_head_dim": [1, 2, 4],
    "block_out_channels": [64, 128, 256],
    "cross_attention_dim": 128,
    "norm_num_groups": 32,
    "projection_class_embeddings_input_dim": 6 * 32 + 64,
}

# The shapes-world teacher (koala/assets/shapes-sdxl, trained by `python -m koala.shapes.teacher`): the tiny layout
# with a narrower deepest stage (64 channels), for 16 x 16 latents of 64 px pictures; 3.8M parameters.
SHAPES_UNET_CONFIG: dict[str, Any] = {
    **TINY_UNET_CONFIG,
    "attention_head_dim": [1, 2, 2],
    "block_out_channels": [32, 48, 64],
    "sample_size": 16,
}

ARCHS: dict[str, dict[str, Any]] = {
    "sdxl": SDXL_UNET_CONFIG,
    "tiny": TINY_UNET_CONFIG,
    "medium": MEDIUM_UNET_CONFIG,
    "shapes": SHAPES_UNET_CONFIG,
}
Arch = Choice("Arch", list(ARCHS))  # teacher.arch, bench.arch: a key of ARCHS


@dataclass(frozen=True)
class StudentSpec:
    """What a student keeps of its teacher. `None` fields keep the teacher's choice.

    encoder_keep[i]: teacher layer indices kept in encoder stage i (down_blocks.i).
    decoder_keep[i]: teacher layer indices kept in decoder stage i (up_blocks.i, deepest stage first).
    encoder_depth / decoder_depth[i]: transformer depth of every kept layer of stage i (an int), or one depth
        per kept layer (a list); must not exceed the teacher layer it inherits from.
    mid: "keep" (cross-attention mid block), "resnet" (one resnet, no transformer) or "none".
    layer_select: which teacher transformer layers a shallower transformer inherits (first / uniform / last).
    random_init: student module-name prefixes left randomly initialised instead of inherited.
    """

    name: str
    description: str = ""
    encoder_keep: tuple[tuple[int, ...], ...] | None = None
    decoder_keep: tuple[tuple[int, ...], ...] | None = None
    encoder_depth: tuple[int | tuple[int, ...], ...] | None = None
    decoder_depth: tuple[int | tuple[int, ...], ...] | None = None
    mid: MidMode = MidMode.keep
    mid_depth: int | None = None
    layer_select: LayerSelect = LayerSelect.first
    random_init: tuple[str, ...] = field(default=())


# KOALA keeps 1 of 2 encoder layers and decoder layers 0 and 2 of 3 (BK-SDM's mapping, KOALA.md section 2).
_KOALA_KEEP = dict(encoder_keep=((0,), (0,), (0,)), decoder_keep=((0, 2), (0, 2), (0, 2)))

SPECS: dict[str, StudentSpec] = {
    s.name: s
    for s in [
        StudentSpec("sdxl", "identity: the teacher's own architecture"),
        StudentSpec(
            "koala-1b",
            "KOALA-1B: 1 encoder / 2 decoder layers per stage, depth 6, mid kept",
            **_KOALA_KEEP,
            encoder_depth=(1, 2, 6),
            decoder_depth=(6, 2, 1),
            mid_depth=6,
        ),
        StudentSpec(
            "koala-700m",
            "KOALA-700M: 1 encoder / 2 decoder layers per stage, depth 5, no mid block",
            **_KOALA_KEEP,
            encoder_depth=(1, 2, 5),
            decoder_depth=(5, 2, 1),
            mid=MidMode.none,
        ),
        StudentSpec(
            "ssd-1b",
            "Segmind SSD-1B: all layers, shallower transformers, mid block without transformer",
            encoder_depth=(0, 2, 4),
            decoder_depth=((4, 4, 10), (2, 1, 1), 0),
            mid=MidMode.resnet,
        ),
        StudentSpec(
            "vega",
            "Segmind-Vega: all layers, depths 1-2, mid block without transformer",
            encoder_depth=(0, 1, 2),
            decoder_depth=(2, 1, 0),
            mid=MidMode.resnet,
        ),
        # Tiny specs follow the same rules on TINY_UNET_CONFIG (deepest teacher depth 4).
        StudentSpec(
            "tiny-1b",
            "tiny KOALA-1B analogue: 1/2 layers per stage, depth 3, mid kept",
            **_KOALA_KEEP,
            encoder_depth=(1, 2, 3),
            decoder_depth=(3, 2, 1),
            mid_depth=3,
        ),
        StudentSpec(
            "tiny-700m",
            "tiny KOALA-700M analogue: 1/2 layers per stage, depth 2, no mid block",
            **_KOALA_KEEP,
            encoder_depth=(1, 2, 2),
            decoder_depth=(2, 2, 1),
            mid=MidMode.none,
        ),
    ]
}


def get_spec(name: str) -> StudentSpec:
    """Look up a registered spec, naming the valid choices when the name is unknown."""
    if name not in SPECS:
        raise KeyError(f"unknown U-Net spec {name!r}; valid choices: {', '.join(SPECS)} (or a custom spec)")
    return SPECS[name]


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


def student_config(teacher_config: dict[str, Any], spec: StudentSpec) -> dict[str, Any]:
    """The diffusers config of the student `spec` describes, derived from `teacher_config`."""
    p = resolve(teacher_config, spec)
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


def build_student(teacher_config: dict[str, Any], spec: StudentSpec, device=None) -> UNet2DConditionModel:
    """Build the (uninitialised) student U-Net `spec` describes for this teacher."""
    return build_unet(student_config(teacher_config, spec), device=device)


def spec_from_fields(name: str, **fields: Any) -> StudentSpec:
    """A spec from config: start from a registered spec (or an empty one for `custom`) and override fields."""
    base = SPECS[name] if name in SPECS else None
    if base is None and not any(v is not None for v in fields.values()):
        get_spec(name)  # raises with the valid choices
    base = base or StudentSpec(name)

    def tup(v):
        if isinstance(v, (list, tuple)):
            return tuple(tup(x) for x in v)
        return v

    given = {k: tup(v) for k, v in fields.items() if v is not None}
    return replace(base, **given)


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
