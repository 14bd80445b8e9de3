"""What a search may change: the single spec edits ("moves") from a student spec, whether they build, and their cost.

A state of the search is a `StudentSpec` with every field explicit. From it a move removes one of:
  - `depth`: one transformer block of a kept layer (its depth minus one; the spec's `layer_select` says which
    teacher blocks the shallower transformer keeps). The deepest encoder stage's first layer sets the mid block's
    depth in diffusers, so with the mid block kept that move shallows the mid transformer too.
  - `layers`: a kept encoder layer with a kept decoder layer of the mirrored stage (a diffusers U-Net has one more
    decoder than encoder layer per stage); only pairs whose inherited student fits the teacher's tensor shapes.
  - `mid`: the mid block's transformer (keep -> resnet) or the whole mid block (-> none).
`Costs` gives the exact parameter count and FLOPs of any spec from one meta-device count of the teacher per module:
a student is the teacher minus the modules its selection drops (tests check it against the bench counters).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from enum import auto
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from koala.choice import Choice
from koala.models.forward import random_inputs, unet_forward
from koala.models.inherit import map_name, module_map
from koala.models.specs import LayerSelect, MidMode, StudentSpec
from koala.models.unets import Plan, build_unet, resolve, student_config
from koala.pruning.surgery import Selection, plan_selection, removed_paths


class MoveKind(Choice):
    """What a move removes."""

    depth = auto()  # one transformer block of a kept layer
    layers = auto()  # an encoder layer with a decoder layer of the mirrored stage
    mid = auto()  # the mid block's transformer, or the whole mid block


@dataclass(frozen=True)
class Move:
    """One spec edit: what it removes (in the teacher's module names) and the spec after it."""

    name: str
    kind: MoveKind
    block: str  # the top-level block it is in (down_blocks.i, mid_block, up_blocks.j): its "stage"
    spec: StudentSpec


def explicit_spec(plan: Plan, name: str) -> StudentSpec:
    """A spec with every field of a resolved plan written out (per-layer depths), so moves can edit it."""
    return StudentSpec(
        name,
        encoder_keep=plan.encoder_keep,
        decoder_keep=plan.decoder_keep,
        encoder_depth=plan.encoder_depth,
        decoder_depth=plan.decoder_depth,
        mid=MidMode(plan.mid),
        mid_depth=plan.mid_depth if plan.mid == MidMode.keep else None,
        layer_select=LayerSelect(plan.spec.layer_select),
    )


def teacher_spec(teacher_config: dict[str, Any], layer_select: str = LayerSelect.first) -> StudentSpec:
    """The search's starting state: the teacher itself as an explicit spec."""
    return explicit_spec(
        resolve(teacher_config, StudentSpec("teacher", layer_select=LayerSelect(layer_select))), "teacher"
    )


def _set(t: tuple, i: int, value: Any) -> tuple:
    """`t` with item `i` replaced."""
    return t[:i] + (value,) + t[i + 1 :]


def _drop(t: tuple, i: int) -> tuple:
    """`t` without item `i`."""
    return t[:i] + t[i + 1 :]


def depth_moves(plan: Plan) -> list[Move]:
    """Every kept transformer one block shallower (the mid block's along with the deepest encoder layer 0)."""
    spec, n, out = explicit_spec(plan, plan.spec.name), plan.teacher.num_stages, []
    for side, block, keep, depth in (
        ("encoder", "down_blocks", plan.encoder_keep, plan.encoder_depth),
        ("decoder", "up_blocks", plan.decoder_keep, plan.decoder_depth),
    ):
        for i, layers in enumerate(depth):
            for j, d in enumerate(layers):
                if d <= 1:
                    continue  # a cross-attention layer keeps at least one block (or has none)
                new = _set(depth, i, _set(layers, j, d - 1))
                edit = {f"{side}_depth": new}
                tied = side == "encoder" and i == n - 1 and j == 0 and plan.mid == MidMode.keep
                if tied:
                    edit["mid_depth"] = d - 1
                name = f"depth {block}.{i}.attentions.{keep[i][j]}{' + mid' if tied else ''}: {d} -> {d - 1}"
                out.append(Move(name, MoveKind.depth, f"{block}.{i}", replace(spec, **edit)))
    return out


def layer_moves(plan: Plan) -> list[Move]:
    """Every (kept encoder layer, kept decoder layer) pair of mirrored stages removed together."""
    spec, n, out = explicit_spec(plan, plan.spec.name), plan.teacher.num_stages, []
    for i in range(n):
        j = n - 1 - i
        ek, dk, ed, dd = plan.encoder_keep[i], plan.decoder_keep[j], plan.encoder_depth[i], plan.decoder_depth[j]
        if len(ek) < 2:
            continue
        for p in range(len(ek)):
            for q in range(len(dk)):
                edit = {
                    "encoder_keep": _set(plan.encoder_keep, i, _drop(ek, p)),
                    "encoder_depth": _set(plan.encoder_depth, i, _drop(ed, p)),
                    "decoder_keep": _set(plan.decoder_keep, j, _drop(dk, q)),
                    "decoder_depth": _set(plan.decoder_depth, j, _drop(dd, q)),
                }
                if i == n - 1 and p == 0 and plan.mid == MidMode.keep:
                    edit["mid_depth"] = ed[1]  # the new layer 0 sets the mid depth: only if it equals it
                    if ed[1] != plan.mid_depth:
                        continue
                name = f"layers down_blocks.{i}.{ek[p]} + up_blocks.{j}.{dk[q]}"
                out.append(Move(name, MoveKind.layers, f"down_blocks.{i}", replace(spec, **edit)))
    return out


def mid_moves(plan: Plan) -> list[Move]:
    """The mid block's transformer (keep -> resnet), or the whole mid block (-> none)."""
    spec, out = explicit_spec(plan, plan.spec.name), []
    if plan.mid == MidMode.keep:
        out.append(
            Move("mid: keep -> resnet", MoveKind.mid, "mid_block", replace(spec, mid=MidMode.resnet, mid_depth=None))
        )
    if plan.mid != MidMode.none:
        out.append(
            Move(f"mid: {plan.mid} -> none", MoveKind.mid, "mid_block", replace(spec, mid=MidMode.none, mid_depth=None))
        )
    return out


class Costs:
    """Exact parameters and FLOPs (one forward at `resolution`) of any student of one teacher, and which fit.

    Counted once on a meta-device teacher per module (`FlopCounterMode` keeps per-module totals); a student's cost is
    the teacher's minus the modules its selection drops, since every kept module sees the same input shapes.
    """

    def __init__(self, teacher_config: dict[str, Any], resolution: int, vae_scale: int = 8) -> None:
        self.config, self.resolution = teacher_config, resolution
        self.meta = build_unet(teacher_config, device="meta").eval()
        self.shapes = {k: tuple(v.shape) for k, v in self.meta.state_dict().items()}
        x = random_inputs(teacher_config, resolution, 1, vae_scale)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            unet_forward(self.meta, x["noisy"], x["t"], x)
        root = type(self.meta).__name__ + "."
        self.flops_of = {k.removeprefix(root): sum(v.values()) for k, v in counter.get_flop_counts().items()}
        self.params_of = {k: sum(p.numel() for p in m.parameters()) for k, m in self.meta.named_modules()}
        self.teacher_params = self.params_of[""]
        self.teacher_flops = self.flops_of["Global"]
        self._fits: dict[StudentSpec, bool] = {}
        self._shapes_of: dict[str, dict[str, tuple[int, ...]]] = {}

    def removed(self, spec: StudentSpec) -> list[str]:
        """Teacher modules the student of `spec` does not have."""
        return removed_paths(self.meta, plan_selection(resolve(self.config, spec)))

    def selection_cost(self, selection: Selection) -> tuple[int, int]:
        """(parameters, FLOPs) of the teacher with `selection` applied."""
        paths = removed_paths(self.meta, selection)
        params = sum(self.params_of[p] for p in paths)
        return self.teacher_params - params, self.teacher_flops - sum(self.flops_of.get(p, 0) for p in paths)

    def cost(self, spec: StudentSpec) -> tuple[int, int]:
        """(parameters, FLOPs of one forward) of the student of `spec`."""
        return self.selection_cost(plan_selection(resolve(self.config, spec)))

    def fits(self, spec: StudentSpec) -> bool:
        """Whether `spec` resolves and every student tensor inherits a teacher tensor of its shape."""
        if spec not in self._fits:
            try:
                explicit = explicit_spec(resolve(self.config, spec), spec.name)
                # Depth adds blocks shaped like the first, so the shapes fit iff they fit at depth 1 (one build per
                # choice of kept layers and mid block, not per depth).
                shallow = _depth_one(explicit)
                plan = resolve(self.config, shallow)
                shapes = self._student_shapes(student_config(self.config, shallow))
            except ValueError:
                self._fits[spec] = False
                return False
            mapping = module_map(plan)
            self._fits[spec] = all(self.shapes.get(map_name(k, mapping)) == v for k, v in shapes.items())
        return self._fits[spec]

    def _student_shapes(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Tensor shapes of the U-Net `config` describes (built once per distinct config, on meta)."""
        key = json.dumps(config, sort_keys=True)
        if key not in self._shapes_of:
            self._shapes_of[key] = {
                k: tuple(v.shape) for k, v in build_unet(config, device="meta").state_dict().items()
            }
        return self._shapes_of[key]


def _depth_one(spec: StudentSpec) -> StudentSpec:
    """`spec` with every transformer one block deep (its tensor shapes per block are unchanged)."""

    def one(depths):
        return tuple(tuple(min(d, 1) for d in layers) for layers in depths)

    mid_depth = 1 if spec.mid == MidMode.keep else None
    return replace(
        spec, encoder_depth=one(spec.encoder_depth), decoder_depth=one(spec.decoder_depth), mid_depth=mid_depth
    )


def moves(costs: Costs, spec: StudentSpec) -> list[Move]:
    """Every move from `spec` whose student builds and inherits."""
    plan = resolve(costs.config, spec)
    candidates = depth_moves(plan) + layer_moves(plan) + mid_moves(plan)
    return [m for m in candidates if m.kind != MoveKind.layers or costs.fits(m.spec)]  # only layers re-wire shapes
