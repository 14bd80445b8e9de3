"""The inherited student as a view of its teacher: the teacher's own modules, re-listed the way the student lists them.

A `Selection` names, for every teacher module list a student re-indexes (`resnets`, `attentions`,
`transformer_blocks`), the teacher indices it keeps in order, and `None` for a module it drops (the mid block).
`plan_selection` reads it off the weight-inheritance table (`koala.models.inherit.module_map`), so what is bypassed
is what is inherited. `bypassed(teacher, selection)` swaps those lists in place for the duration of a `with` block:
diffusers' blocks iterate their lists and the U-Net slices its skip connections by `len(up_block.resnets)`, so the
swapped teacher computes what the inherited student computes, with the same modules and weights and no copy
(`tests/test_search.py` checks it against `build_student` + `inherit_weights`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from koala.distill.taps import unwrap
from koala.models.inherit import module_map
from koala.models.specs import MidMode
from koala.models.unets import Plan

Selection = dict[str, "tuple[int, ...] | None"]  # teacher module path -> kept child indices, or None: dropped

_LISTS = ("resnets", "attentions", "transformer_blocks")  # the module lists a spec re-indexes


def plan_selection(plan: Plan) -> Selection:
    """The teacher lists the student of `plan` re-indexes, with the teacher indices it keeps (from `module_map`)."""
    lists: dict[str, dict[int, int]] = {}
    for student, teacher in module_map(plan).items():
        s_parent, _, s_index = student.rpartition(".")
        if s_parent.rpartition(".")[2] in _LISTS:
            t_parent, _, t_index = teacher.rpartition(".")
            lists.setdefault(t_parent, {})[int(s_index)] = int(t_index)
    selection: Selection = {path: tuple(kept[j] for j in range(len(kept))) for path, kept in lists.items()}
    if plan.mid == MidMode.resnet:  # diffusers' UNetMidBlock2D(num_layers=0): the first resnet alone
        selection["mid_block.attentions"] = ()
        selection["mid_block.resnets"] = (0,)
    elif plan.mid == MidMode.none:
        selection["mid_block"] = None
    return selection


def without_block(path: str, depth: int, block: int) -> Selection:
    """The selection that drops transformer block `block` of the `depth`-block transformer at teacher `path`."""
    return {f"{path}.transformer_blocks": tuple(b for b in range(depth) if b != block)}


def removed_paths(unet: nn.Module, selection: Selection) -> list[str]:
    """The teacher modules a selection leaves out (the outermost one where a whole layer or block goes)."""
    model = unwrap(unet)
    out = []
    for path, kept in selection.items():
        if kept is None:
            out.append(path)
            continue
        n = len(model.get_submodule(path))
        out += [f"{path}.{i}" for i in range(n) if i not in kept]
    return sorted(out)


@contextmanager
def bypassed(unet: nn.Module, selection: Selection) -> Iterator[nn.Module]:
    """The teacher with its lists swapped as `selection` says (restored on exit, also after an error)."""
    model = unwrap(unet)
    undo: list[tuple[nn.Module, str, nn.Module | None]] = []
    try:
        # Deeper paths first: swapping `attentions` re-numbers the transformers a `transformer_blocks` path names.
        for path in sorted(selection, key=lambda p: -p.count(".")):
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path)
            old = getattr(parent, attr)
            kept = selection[path]
            undo.append((parent, attr, old))
            setattr(parent, attr, None if kept is None else nn.ModuleList([old[i] for i in kept]))
        yield model
    finally:
        for parent, attr, old in reversed(undo):
            setattr(parent, attr, old)
