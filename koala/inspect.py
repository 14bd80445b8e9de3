"""`python -m koala.inspect unet=<spec> [teacher=<teacher>]`: per-stage structure and exact parameter counts.

Teacher and student are built on the meta device, so full-size SDXL needs no weights and almost no memory.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from koala.config import register_configs
from koala.specs import student_spec, teacher_unet_config
from koala.unets import (
    build_student,
    build_unet,
    count_parameters,
    count_self_attention,
    resolve,
    stage_rows,
)


def format_stage_table(teacher, student) -> str:
    """Side-by-side per-stage table: residual blocks, transformer depths, self-attention layers."""
    t_rows = {r["stage"]: r for r in stage_rows(teacher)}
    s_rows = {r["stage"]: r for r in stage_rows(student)}
    stages = list(t_rows) + [s for s in s_rows if s not in t_rows]
    head = f"{'stage':<10} {'ch':>5} | {'teacher res':>11} {'depths':<14} {'SA':>4} | {'student res':>11} {'depths':<14} {'SA':>4}"
    lines = [head, "-" * len(head)]
    for st in stages:
        t, s = t_rows.get(st), s_rows.get(st)
        cell = lambda r: (f"{r['resnets']:>11} {str(r['depth'] or '-'):<14} {r['self_attn']:>4}" if r else f"{'(none)':>11} {'':<14} {'':>4}")  # noqa: E731
        ch = (t or s)["channels"]
        lines.append(f"{st:<10} {ch:>5} | {cell(t)} | {cell(s)}")
    return "\n".join(lines)


def inspect_unets(teacher_cfg, unet_cfg) -> str:
    """Build teacher and student on the meta device and describe both."""
    t_config = teacher_unet_config(teacher_cfg)
    spec = student_spec(unet_cfg)
    resolve(t_config, spec)  # fail early with the reason
    teacher = build_unet(t_config, device="meta")
    student = build_student(t_config, spec, device="meta")
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


register_configs()


@hydra.main(version_base=None, config_path="../configs", config_name="inspect")
def main(cfg: DictConfig) -> None:
    print(inspect_unets(cfg.teacher, cfg.unet))


if __name__ == "__main__":
    main()
