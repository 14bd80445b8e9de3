"""Describe a teacher and its student side by side: per-stage structure and exact parameter counts, built on the
meta device (full-size SDXL needs no weights and almost no memory). What `koala.inspect` prints first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from koala.models.plans import student_plan, teacher_unet_config
from koala.models.unets import build_student, build_unet, count_parameters, count_self_attention, stage_rows

if TYPE_CHECKING:
    from koala.config.schema import TeacherConfig, UNetConfig


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


def build_meta_pair(teacher_cfg: TeacherConfig, unet_cfg: UNetConfig):
    """Teacher and student on the meta device, with the resolved plan."""
    t_config = teacher_unet_config(teacher_cfg)
    plan = student_plan(t_config, unet_cfg)  # fail early with the reason
    return plan, build_unet(t_config, device="meta"), build_student(t_config, plan, device="meta")


def inspect_unets(teacher_cfg: TeacherConfig, unet_cfg: UNetConfig, models=None) -> str:
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
