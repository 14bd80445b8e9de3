"""The units of the sensitivity table: every transformer block of the teacher, and every layer and mid move from it.

A block unit bypasses one transformer block (the student with that block removed: exactly the spec's depth move
when it is the block the spec's `layer_select` drops, otherwise a removal the spec language cannot yet express,
measured for the picture). Layer and mid units are the teacher's own moves (`koala.pruning.moves`).
"""

from __future__ import annotations

from dataclasses import dataclass

from koala.models.unets import resolve
from koala.pruning.moves import Costs, depth_moves, layer_moves, mid_moves, teacher_spec
from koala.pruning.surgery import Selection, plan_selection, without_block


@dataclass(frozen=True)
class Unit:
    """One row of the table: what is removed, where, at what saving, and the spec move that removes it (if any)."""

    name: str  # a transformer block's teacher path, or a move's name
    kind: str  # block | layers | mid
    block: str  # the top-level block it sits in (its stage)
    layer: str  # the teacher transformer or layer it belongs to (a heat-map row)
    index: int  # its block index in that transformer (a heat-map column); -1 for layer and mid units
    selection: Selection
    params: int  # parameters removed
    flops: int  # FLOPs of one forward removed
    move: str  # the spec move from the teacher that removes it, "" if none removes it alone


def transformers(costs: Costs) -> list[tuple[str, int]]:
    """Every transformer of the teacher in forward order, with its depth: (module path, depth)."""
    lay, out = resolve(costs.config, teacher_spec(costs.config)).teacher, []
    for i, depths in enumerate(lay.down_depth):
        out += [(f"down_blocks.{i}.attentions.{k}", d) for k, d in enumerate(depths) if lay.has_attn_down[i]]
    if lay.mid == "keep":
        out.append(("mid_block.attentions.0", lay.mid_depth))
    for j, depths in enumerate(lay.up_depth):
        out += [(f"up_blocks.{j}.attentions.{k}", d) for k, d in enumerate(depths) if lay.has_attn_up[j]]
    return out


def _saving(costs: Costs, selection: Selection) -> tuple[int, int]:
    """(parameters, FLOPs) a selection removes from the teacher."""
    params, flops = costs.selection_cost(selection)
    return costs.teacher_params - params, costs.teacher_flops - flops


def table_units(costs: Costs, layer_select: str) -> list[Unit]:
    """Block units for every transformer block, then the teacher's layer and mid moves."""
    plan = resolve(costs.config, teacher_spec(costs.config, layer_select))
    alone = {}  # block path -> the depth move that removes it
    for move in depth_moves(plan):
        for path in costs.removed(move.spec):
            alone[path] = move.name
    units = []
    for path, depth in transformers(costs):
        for b in range(depth):
            sel = without_block(path, depth, b)
            name = f"{path}.transformer_blocks.{b}"
            block = path.rsplit(".", 2)[0]
            units.append(Unit(name, "block", block, path, b, sel, *_saving(costs, sel), alone.get(name, "")))
    for move in layer_moves(plan) + mid_moves(plan):
        if move.kind == "layers" and not costs.fits(move.spec):
            continue
        sel = plan_selection(resolve(costs.config, move.spec))
        units.append(Unit(move.name, str(move.kind), move.block, move.block, -1, sel, *_saving(costs, sel), move.name))
    return units
