"""`python -m koala.inspect unet=<spec> [teacher=<teacher>] [distill=<preset>] [list_taps=true]`, or `run_dir=<run>`.

Prints the per-stage structure and exact parameter counts of teacher and student, the feature pairs the `distill`
preset will distil (counts per stage and kind, shapes at `data.resolution`), and with `list_taps=true` every tap
point of both models. Each pair's weight is the one training uses (`koala.distill.pairing.pair_weight`); `run_dir=`
inspects a run from its saved config, with the balance factors `distill.balance=grad` measured for it. Teacher and
student are built on the meta device, so full-size SDXL needs no weights and
almost no memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from koala.config.checks import ConfigError
from koala.config.compose import run_command
from koala.config.schema import TrainConfig
from koala.distill.balance import describe
from koala.distill.pairing import TapPair, check_pair_shapes, pair_counts, pair_taps, rebalance
from koala.distill.taps import Stage, TapKind, list_tap_points
from koala.models.plans import student_plan, teacher_unet_config
from koala.models.unets import (
    build_student,
    build_unet,
    count_parameters,
    count_self_attention,
    stage_rows,
)


def format_stage_table(teacher, student) -> str:
    """Side-by-side per-stage table: residual blocks, transformer depths, self-attention layers."""
    t_rows = {r["stage"]: r for r in stage_rows(teacher)}
    s_rows = {r["stage"]: r for r in stage_rows(student)}
    stages = list(t_rows) + [s for s in s_rows if s not in t_rows]
    head = f"{'stage':<10} {'ch':>5} | {'teacher res':>11} {'depths':<14} {'SA':>4} | {'student res':>11} {'depths':<14} {'SA':>4}"
    lines = [head, "-" * len(head)]

    def cell(r: dict | None) -> str:
        """One model's columns of a stage row."""
        if r is None:
            return f"{'(none)':>11} {'':<14} {'':>4}"
        return f"{r['resnets']:>11} {str(r['depth'] or '-'):<14} {r['self_attn']:>4}"

    for st in stages:
        t, s = t_rows.get(st), s_rows.get(st)
        ch = (t or s)["channels"]
        lines.append(f"{st:<10} {ch:>5} | {cell(t)} | {cell(s)}")
    return "\n".join(lines)


def build_meta_pair(teacher_cfg, unet_cfg):
    """Teacher and student on the meta device, with the resolved plan."""
    t_config = teacher_unet_config(teacher_cfg)
    plan = student_plan(t_config, unet_cfg)  # fail early with the reason
    return plan, build_unet(t_config, device="meta"), build_student(t_config, plan.spec, device="meta")


def inspect_unets(teacher_cfg, unet_cfg, models=None) -> str:
    """Build teacher and student on the meta device and describe both."""
    plan, teacher, student = models or build_meta_pair(teacher_cfg, unet_cfg)
    spec = plan.spec
    tp, sp = count_parameters(teacher), count_parameters(student)
    out = [
        f"teacher: {teacher_cfg.name} ({teacher_cfg.arch})   student: {spec.name}  {spec.description}",
        "",
        format_stage_table(teacher, student),
        "",
        f"parameters   teacher {tp:,}   student {sp:,}   ratio {sp / tp:.3f}",
        f"self-attention layers   teacher {count_self_attention(teacher)}   student {count_self_attention(student)}",
    ]
    return "\n".join(out)


def format_tap_points(unet, title: str) -> str:
    """Every tap point of a model, one per line, with its kind and stage."""
    points = list_tap_points(unet)
    lines = [f"{title}: {len(points)} tap points"]
    lines += [f"  {p.kind:<4} {p.stage:<8} {p.name}" for p in points]
    return "\n".join(lines)


def format_pairs(
    pairs: list[TapPair], shapes: dict[str, tuple[int, ...]], distill_cfg, resolution: int, balanced: bool = False
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
    lines += ["", "  " + weight_rule(distill_cfg, len(pairs), balanced)]
    for p in pairs:
        shape = "x".join(str(d) for d in shapes[p.student.name])
        weight = distill_cfg.feat_weight * p.weight  # the pair's effective weight in the objective
        lines.append(f"  {p.student.kind:<4} {p.student.name:<52} <- {p.teacher.name:<52} w={weight:.4g}  {shape}")
    return "\n".join(lines)


def weight_rule(distill_cfg, n: int, balanced: bool = False) -> str:
    """How the effective weight `w` of each pair below is made (koala.distill.pairing.pair_weights)."""
    per = f" / {n} pairs" if distill_cfg.reduction == "mean" else ""
    factor = " x the kind's balance factor" if balanced else ""
    return (
        f"w = feat_weight {distill_cfg.feat_weight:g} x kind weight x stage weight{factor}{per} "
        f"(distill.reduction={distill_cfg.reduction}: the feature term is the {distill_cfg.reduction} over pairs)"
    )


def inspect_distill(
    teacher_cfg, unet_cfg, distill_cfg, resolution: int, list_taps: bool = False, balance: dict | None = None
) -> str:
    """Structure, parameter counts, tap points (optional) and the tap pairs a distill config gives, each with the
    weight training gives it (with a run's measured `balance` factors when given)."""
    models = build_meta_pair(teacher_cfg, unet_cfg)
    plan, teacher, student = models
    out = [inspect_unets(teacher_cfg, unet_cfg, models)]
    if list_taps:
        out += ["", format_tap_points(teacher, "teacher"), "", format_tap_points(student, "student")]
    pairs = pair_taps(plan, distill_cfg, student, teacher)
    shapes = check_pair_shapes(pairs, student, teacher, resolution // 8, sa_point=distill_cfg.sa_point)
    factors = (balance or {}).get("weights")
    out += ["", format_pairs(rebalance(pairs, distill_cfg, factors), shapes, distill_cfg, resolution, bool(factors))]
    if distill_cfg.balance == "grad":
        out.append(
            "  " + describe(balance)
            if balance
            else "  balance=grad: each kind's factor is measured when a run "
            "starts (the weights above leave it out); `python -m koala.inspect run_dir=<run>` shows a run's"
        )
    return "\n".join(out)


def run_balance(run_dir: Path) -> dict | None:
    """A run's measured balance factors: from its newest complete checkpoint, else its `balance.json`."""
    from koala.train.checkpoint import list_checkpoints, read_state

    for ckpt in reversed(list_checkpoints(run_dir)):
        if "balance" in read_state(ckpt):
            return read_state(ckpt)["balance"]
    path = run_dir / "balance.json"
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class InspectConfig(TrainConfig):
    """Settings of `python -m koala.inspect` (configs/inspect.yaml): the train groups, plus"""

    list_taps: bool = False  # also list every tap point of both models
    run_dir: Optional[str] = None  # inspect this run: its config.yaml and its measured balance factors


def inspect_config(cfg: DictConfig) -> str:
    """The inspection of a composed config (or of a run's saved one), printed."""
    balance = None
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"run_dir={cfg.run_dir!r} holds no config.yaml: not a koala.train run directory")
        cfg = OmegaConf.merge(OmegaConf.structured(InspectConfig), OmegaConf.load(run_dir / "config.yaml"),
                              {"list_taps": cfg.list_taps, "run_dir": str(run_dir)})  # fmt: skip
        balance = run_balance(run_dir)
    text = inspect_distill(cfg.teacher, cfg.unet, cfg.distill, cfg.data.resolution, cfg.list_taps, balance)
    print(text)
    return text


def main(argv: list[str] | None = None) -> str:
    """CLI: compose `configs/inspect.yaml` with the overrides and print the inspection."""
    return run_command("inspect", inspect_config, argv)


if __name__ == "__main__":
    main()
