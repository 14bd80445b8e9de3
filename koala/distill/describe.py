"""Describe what a `distill` config distils: every tap point of a model, and the feature pairs (counts per stage and
kind, one line per pair with its shape at the training resolution). What `koala.inspect` prints after the
structure (koala.models.describe).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from koala.distill.pairing import TapPair, check_pair_shapes, pair_counts, pair_taps
from koala.distill.taps import Stage, TapKind, list_tap_points
from koala.models.describe import build_meta_pair, inspect_unets

if TYPE_CHECKING:
    from koala.config.schema import DistillConfig, TeacherConfig, UNetConfig


def format_tap_points(unet, title: str) -> str:
    """Every tap point of a model, one per line, with its kind and stage."""
    points = list_tap_points(unet)
    lines = [f"{title}: {len(points)} tap points"]
    lines += [f"  {p.kind:<4} {p.stage:<8} {p.name}" for p in points]
    return "\n".join(lines)


def format_pairs(
    pairs: list[TapPair], shapes: dict[str, tuple[int, ...]], distill_cfg: DistillConfig, resolution: int
) -> str:
    """The distilled pairs: a count table per stage and kind, then one line per pair with its shape."""
    counts = pair_counts(pairs)
    kinds = [k for k in TapKind if any(kk == k for _, kk in counts)]
    lines = [
        f"distill: {distill_cfg.name}   kinds {list(distill_cfg.kinds)}   stages {list(distill_cfg.stages)}   "
        f"pairing {distill_cfg.pairing}   sa_point {distill_cfg.sa_point}   {len(pairs)} pairs at {resolution} px "
        f"(latent {resolution // 8})",
    ]
    if not pairs:
        return "\n".join(lines + ["  no feature pairs (output / task loss only)"])
    lines.append(f"  {'stage':<8} " + " ".join(f"{k:>5}" for k in kinds) + f" {'total':>6}")
    for stage in [s for s in Stage if s in distill_cfg.stages]:
        row = [counts.get((stage, k), 0) for k in kinds]
        lines.append(f"  {stage:<8} " + " ".join(f"{n:>5}" for n in row) + f" {sum(row):>6}")
    lines += ["", "  " + weight_rule(distill_cfg, len(pairs))]
    for p in pairs:
        shape = "x".join(str(d) for d in shapes[p.student.name])
        weight = distill_cfg.feat_weight * p.weight  # the pair's effective weight in the objective
        lines.append(f"  {p.student.kind:<4} {p.student.name:<52} <- {p.teacher.name:<52} w={weight:.4g}  {shape}")
    return "\n".join(lines)


def weight_rule(distill_cfg: DistillConfig, n: int) -> str:
    """How the effective weight `w` of each pair below is made (koala.distill.pairing.pair_weights)."""
    per = f" / {n} pairs" if distill_cfg.reduction == "mean" else ""
    return (
        f"w = feat_weight {distill_cfg.feat_weight:g} x kind weight x stage weight{per} "
        f"(distill.reduction={distill_cfg.reduction}: the feature term is the {distill_cfg.reduction} over pairs)"
    )


def inspect_distill(
    teacher_cfg: TeacherConfig,
    unet_cfg: UNetConfig,
    distill_cfg: DistillConfig,
    resolution: int,
    list_taps: bool = False,
) -> str:
    """Structure, parameter counts, tap points (optional) and the tap pairs a distill config gives."""
    models = build_meta_pair(teacher_cfg, unet_cfg)
    plan, teacher, student = models
    out = [inspect_unets(teacher_cfg, unet_cfg, models)]
    if list_taps:
        out += ["", format_tap_points(teacher, "teacher"), "", format_tap_points(student, "student")]
    pairs = pair_taps(plan, distill_cfg, student, teacher)
    shapes = check_pair_shapes(pairs, student, teacher, resolution // 8, sa_point=distill_cfg.sa_point)
    out += ["", format_pairs(pairs, shapes, distill_cfg, resolution)]
    return "\n".join(out)
