"""Weight inheritance as data: which teacher module every student module starts from, and the copy itself.

`module_map(plan)` is the table (student module prefix -> teacher module prefix) for every layer a spec re-indexes;
`inherit_weights` copies tensors along it and refuses anything it cannot place. Feature pairing reads the same table
(with its own layer rule), so what is distilled lines up with what was inherited.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from koala.models.specs import LayerSelect
from koala.models.unets import Plan

# ---------------------------------------------------------------------------------------------------------------


def select_layers(n_teacher: int, n_student: int, rule: LayerSelect) -> tuple[int, ...]:
    """Which of a teacher transformer's `n_teacher` layers a `n_student`-layer transformer takes."""
    if n_student > n_teacher:
        raise ValueError(f"cannot select {n_student} layers from {n_teacher}")
    rule = LayerSelect(rule)
    if rule is LayerSelect.first:
        return tuple(range(n_student))
    if rule is LayerSelect.last:
        return tuple(range(n_teacher - n_student, n_teacher))
    if n_student == 1:  # uniform
        return (0,)
    return tuple(round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student))


def module_map(plan: Plan, layer_select: LayerSelect | None = None) -> dict[str, str]:
    """Student module prefix -> teacher module prefix for every layer the spec re-indexes.

    Names not covered by a rule (conv_in, time embeddings, down/upsamplers, conv_out, ...) map to themselves.
    `layer_select` overrides the spec's rule for transformer layers (feature pairing may differ from init).
    """
    rule = layer_select or plan.spec.layer_select
    out: dict[str, str] = {}

    for kind, keep, sdep, tdep, attn in (
        ("down_blocks", plan.encoder_keep, plan.encoder_depth, plan.teacher.down_depth, plan.teacher.has_attn_down),
        ("up_blocks", plan.decoder_keep, plan.decoder_depth, plan.teacher.up_depth, plan.teacher.has_attn_up),
    ):
        for i, kept in enumerate(keep):
            for j, k in enumerate(kept):
                out[f"{kind}.{i}.resnets.{j}"] = f"{kind}.{i}.resnets.{k}"
                if attn[i]:
                    s_att, t_att = f"{kind}.{i}.attentions.{j}", f"{kind}.{i}.attentions.{k}"
                    out[s_att] = t_att
                    for a, b in enumerate(select_layers(tdep[i][k], sdep[i][j], rule)):
                        out[f"{s_att}.transformer_blocks.{a}"] = f"{t_att}.transformer_blocks.{b}"
    if plan.mid == "keep":
        for a, b in enumerate(select_layers(plan.teacher.mid_depth, plan.mid_depth, rule)):
            out[f"mid_block.attentions.0.transformer_blocks.{a}"] = f"mid_block.attentions.0.transformer_blocks.{b}"
    return out


def longest_prefix(name: str, table: dict[str, str]) -> tuple[str, list[str]] | None:
    """The longest dotted prefix of `name` that `table` maps, and the remaining name parts (None if none does)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            return prefix, parts[cut:]
    return None


def map_name(name: str, mapping: dict[str, str]) -> str:
    """Translate a student parameter or module name to its teacher name by the longest matching prefix rule."""
    hit = longest_prefix(name, mapping)
    return name if hit is None else ".".join([mapping[hit[0]], *hit[1]])


@dataclass
class InheritanceReport:
    """What `inherit_weights` copied: student tensor -> teacher tensor, plus those left random by request."""

    copied: dict[str, str]
    random_init: list[str]

    def renamed(self) -> dict[str, str]:
        return {s: t for s, t in self.copied.items() if s != t}

    def summary(self) -> str:
        blocks = sorted({_block_of(s) + " <- " + _block_of(t) for s, t in self.renamed().items()})
        lines = [
            f"copied {len(self.copied)} tensors ({len(self.renamed())} re-indexed), {len(self.random_init)} left random"
        ]
        lines += [f"  {b}" for b in blocks]
        return "\n".join(lines)


def _block_of(name: str) -> str:
    parts = name.split(".")
    for key in ("transformer_blocks", "resnets", "attentions"):
        if key in parts:
            i = parts.index(key)
            return ".".join(parts[: i + 2])
    return ".".join(parts[:2])


def inherit_weights(
    student: torch.nn.Module, teacher: torch.nn.Module, plan: Plan, strict_shapes: bool = True
) -> InheritanceReport:
    """Copy teacher tensors into the student along `module_map(plan)`.

    Every student tensor gets a teacher source unless it falls under `spec.random_init`; a missing source or a
    shape mismatch raises, naming the tensor.
    """
    mapping = module_map(plan)
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    copied, random, problems = {}, [], []
    for name, tensor in s_state.items():
        if any(name == p or name.startswith(p + ".") for p in plan.spec.random_init):
            random.append(name)
            continue
        src = map_name(name, mapping)
        if src not in t_state:
            problems.append(f"{name}: no teacher tensor {src!r}")
        elif t_state[src].shape != tensor.shape:
            problems.append(f"{name}: shape {tuple(tensor.shape)} but teacher {src} has {tuple(t_state[src].shape)}")
        else:
            copied[name] = src
    if problems:
        raise ValueError(f"cannot inherit {len(problems)} student tensors:\n  " + "\n  ".join(problems[:10]))
    with torch.no_grad():  # in place, one tensor at a time (casting as it copies): no second copy of the student
        for s, t in copied.items():
            s_state[s].copy_(t_state[t])
    return InheritanceReport(copied, random)
