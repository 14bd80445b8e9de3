"""Which student tap is compared with which teacher tap, with what weight, and a shape check before training.

A student tap's teacher partner is the module the weight-inheritance map assigns it (`koala.models.inherit.
module_map` of the run's resolved plan), with the transformer-layer rule chosen by `distill.pairing` (first / uniform
/ last) rather than the spec's init rule: KOALA-700M's `up_blocks.0.attentions.1.transformer_blocks.4.attn1` pairs
with SDXL's `up_blocks.0.attentions.2.transformer_blocks.4.attn1` under `first` (block 9 under `uniform`). A pair's
weight is `distill.kind_weights[kind] * distill.stage_weights[stage]`; pairs of weight 0 are dropped. Shapes are
checked by a forward pass on the meta device, which costs no memory even for SDXL at 1024 px.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from diffusers import UNet2DConditionModel

from koala.distill.losses import Reduction
from koala.distill.taps import FeatureTaps, TapPoint, block_names, check_blocks, list_tap_points, unwrap
from koala.models.forward import random_inputs, unet_forward
from koala.models.inherit import map_name, module_map
from koala.models.unets import Plan, build_unet

if TYPE_CHECKING:
    from koala.config.schema import DistillConfig


@dataclass(frozen=True)
class TapPair:
    """A student tap, its teacher partner and the weight of their feature loss."""

    student: TapPoint
    teacher: TapPoint
    weight: float  # its weight inside the feature term (pair_weights); feat_weight multiplies the whole term


def pair_taps(
    plan: Plan, distill_cfg: DistillConfig, student_unet: torch.nn.Module, teacher_unet: torch.nn.Module
) -> list[TapPair]:
    """Pair every student tap selected by the `distill` section with its teacher tap; zero-weight taps are dropped.

    Raises listing every student tap whose teacher partner does not exist (or is not a tap of the same kind).
    """
    kinds, stages = list(distill_cfg.kinds), list(distill_cfg.stages)
    students = selected_taps(student_unet, distill_cfg)
    teachers = {p.name: p for p in list_tap_points(teacher_unet, kinds, stages, None, distill_cfg.sa_point)}
    mapping = module_map(plan, layer_select=distill_cfg.pairing)
    matched, unmatched = [], []
    for s in students:
        t = teachers.get(map_name(s.name, mapping))
        if t is None or t.kind != s.kind:
            unmatched.append(f"{s.name} -> {map_name(s.name, mapping)}")
        else:
            matched.append((s, t))
    if unmatched:
        raise ValueError(f"{len(unmatched)} student taps have no teacher partner:\n  " + "\n  ".join(unmatched))
    weights = pair_weights(distill_cfg, [s for s, _ in matched])
    return [TapPair(s, t, w) for (s, t), w in zip(matched, weights) if w != 0.0]


def selected_taps(unet: torch.nn.Module, distill_cfg: DistillConfig) -> list[TapPoint]:
    """The taps `distill` selects, in forward order: its kinds and stages, each kind in its `kind_blocks` entry's
    blocks when it has one, else in `blocks` (null: every block)."""
    blocks = list(distill_cfg.blocks) if distill_cfg.blocks is not None else None
    per_kind = {k: list(v) for k, v in dict(distill_cfg.kind_blocks or {}).items() if v is not None}
    names = block_names(unwrap(unet))
    given = {"distill.blocks": blocks or [], **{f"distill.kind_blocks.{k}": v for k, v in per_kind.items()}}
    for key, chosen in given.items():
        try:
            check_blocks(chosen, names)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    points = list_tap_points(unet, distill_cfg.kinds, distill_cfg.stages, None, distill_cfg.sa_point)
    return [p for p in points if (allowed := per_kind.get(p.kind, blocks)) is None or p.block in allowed]


def pair_weights(distill_cfg: DistillConfig, points: list[TapPoint]) -> list[float]:
    """Each pair's weight inside the feature term (one function, so every rule that scales a pair composes here):
    distill.kind_weights[kind] x distill.stage_weights[stage], divided by the number of weighted pairs when
    `distill.reduction=mean`. A pair's effective weight in the objective is feat_weight times this."""
    kind_w, stage_w = dict(distill_cfg.kind_weights), dict(distill_cfg.stage_weights)
    weights = [float(kind_w.get(p.kind, 1.0)) * float(stage_w.get(p.stage, 1.0)) for p in points]
    if Reduction(distill_cfg.reduction) is Reduction.mean:
        n = sum(w != 0.0 for w in weights) or 1  # the pairs that count (zero-weight ones are dropped)
        weights = [w / n for w in weights]
    return weights


def pair_counts(pairs: list[TapPair]) -> dict[tuple[str, str], int]:
    """Number of pairs per (stage, kind)."""
    return dict(Counter((p.student.stage, p.student.kind) for p in pairs))


def record_shapes(
    unet: torch.nn.Module, points: list[TapPoint], sample_size: int, batch_size: int = 1, sa_point: str = "attn1"
) -> dict[str, tuple[int, ...]]:
    """Shapes of the given taps from one forward pass of a meta-device copy of `unet` (no memory, no weights)."""
    model = unwrap(unet)
    config = dict(model.config)
    if next(model.parameters()).device.type != "meta":
        model = build_unet(config, device="meta")
    with torch.no_grad(), FeatureTaps(model, points, detach=True, sa_point=sa_point) as taps:
        x = random_inputs(
            config,
            sample_size,
            batch_size,
            vae_scale=1,  # latent = sample_size
            dtype=next(model.parameters()).dtype,
        )
        unet_forward(model, x["noisy"], x["t"], x)
    return {name: tuple(f.shape) for name, f in taps.features.items()}


def check_pair_shapes(
    pairs: list[TapPair],
    student_unet: UNet2DConditionModel,
    teacher_unet: UNet2DConditionModel,
    sample_size: int,
    batch_size: int = 1,
    sa_point: str = "attn1",
) -> dict[str, tuple[int, ...]]:
    """Student tap name -> feature shape at latent size `sample_size`; raises listing every mismatched pair."""
    s_shapes = record_shapes(student_unet, [p.student for p in pairs], sample_size, batch_size, sa_point)
    t_shapes = record_shapes(teacher_unet, [p.teacher for p in pairs], sample_size, batch_size, sa_point)
    bad = [
        f"{p.student.name} {s_shapes.get(p.student.name)} vs teacher {p.teacher.name} {t_shapes.get(p.teacher.name)}"
        for p in pairs
        if p.student.name not in s_shapes or s_shapes[p.student.name] != t_shapes.get(p.teacher.name)
    ]
    if bad:
        raise ValueError(f"{len(bad)} tap pairs differ in shape:\n  " + "\n  ".join(bad))
    return {p.student.name: s_shapes[p.student.name] for p in pairs}
