"""A student spec at a budget: greedy removal by measured error per unit of cost, or a ComfyUI layout filled best.

`greedy` starts from the teacher and, while the student is over budget, applies the move with the smallest increase
of the output error per parameter (or FLOP) it removes. With `evaluate` measuring every candidate student on the
calibration set (re-measured after each removal), interactions between removals are seen; with the table's errors
summed instead (`additive_errors`), one measurement pass suffices. Moves that would land below the budget's
tolerance band are not taken while others remain; if none lands in the band, the student nearest the target wins.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import auto
from typing import Any

from koala.config.checks import ConfigError
from koala.config.choice import Choice
from koala.models.unets import SPECS, LayerSelect, StudentSpec, layout, resolve, student_config
from koala.pruning.moves import Costs, explicit_spec, moves

Evaluate = Callable[[list[StudentSpec]], list[float]]  # specs -> output error of each inherited student


class BudgetKind(Choice):
    """What a budget limits."""

    params = auto()
    flops = auto()


@dataclass(frozen=True)
class Budget:
    """A target parameter count or FLOPs per forward, with the tolerance band a result should land in."""

    kind: BudgetKind
    target: int
    tolerance: float = 0.01

    @classmethod
    def of(cls, kind: str, value: float, teacher_cost: int, tolerance: float = 0.01) -> Budget:
        """A number (> 1) or a ratio of the teacher's cost (<= 1)."""
        if value <= 0:
            raise ConfigError(f"search.{kind}={value}: give a positive count or a ratio of the teacher in (0, 1]")
        return cls(BudgetKind(kind), int(round(value * teacher_cost if value <= 1 else value)), tolerance)

    def value(self, cost: tuple[int, int]) -> int:
        """The budgeted part of a (parameters, FLOPs) cost."""
        return cost[0] if self.kind == BudgetKind.params else cost[1]

    def within(self, value: int) -> bool:
        return abs(value - self.target) <= self.tolerance * self.target


@dataclass
class Step:
    """One accepted removal."""

    move: str
    params: int
    flops: int
    error: float  # output error of the inherited student after it
    score: float  # error increase per removed unit of cost (per million parameters or GFLOP)


@dataclass
class Result:
    """The chosen spec, its cost and error, the path to it, and whether it lands in the budget's band."""

    spec: StudentSpec
    params: int
    flops: int
    error: float
    steps: list[Step] = field(default_factory=list)
    note: str = ""


def _per(budget: Budget) -> float:
    """The unit scores are given in: a million parameters or a GFLOP."""
    return 1e6 if budget.kind == BudgetKind.params else 1e9


def greedy(
    costs: Costs, start: StudentSpec, budget: Budget, evaluate: Evaluate, log=print, label: str = "eps rel. err"
) -> Result:
    """Remove moves from `start` until the student's cost is within the budget's band (or nothing is left); `label`
    names what `evaluate` returns in the log."""
    state, err = start, 0.0
    cost = costs.cost(state)
    steps: list[Step] = []
    low, high = budget.target * (1 - budget.tolerance), budget.target * (1 + budget.tolerance)
    while budget.value(cost) > high:
        options = moves(costs, state)
        if not options:
            break
        priced = [(m, costs.cost(m.spec)) for m in options]
        inside = [(m, c) for m, c in priced if budget.value(c) >= low]
        if not inside:  # every move overshoots the band: take the one nearest the target, unless staying is nearer
            m, c = min(priced, key=lambda mc: abs(budget.value(mc[1]) - budget.target))
            if abs(budget.value(c) - budget.target) >= abs(budget.value(cost) - budget.target):
                break
            inside = [(m2, c2) for m2, c2 in priced if budget.value(c2) == budget.value(c)]
        errors = evaluate([m.spec for m, _ in inside])
        gains = [(budget.value(cost) - budget.value(c)) / _per(budget) for _, c in inside]
        scores = [(e - err) / g for e, g in zip(errors, gains)]
        best = min(range(len(inside)), key=lambda i: (scores[i], errors[i]))
        (move, cost), err = inside[best], errors[best]
        state = move.spec
        steps.append(Step(move.name, cost[0], cost[1], err, scores[best]))
        log(f"  step {len(steps):>3}: {move.name:<52} params {cost[0]:>14,}  GFLOPs {cost[1] / 1e9:>10.2f}  "
            f"{label} {err:.4f}  (+{scores[best]:.3g} per {'M param' if budget.kind == 'params' else 'GFLOP'})")  # fmt: skip
    value = budget.value(cost)
    note = "" if budget.within(value) else _nearest_note(budget, value, bool(moves(costs, state)))
    return Result(state, cost[0], cost[1], err, steps, note)


def _nearest_note(budget: Budget, value: int, more: bool) -> str:
    """Why the result is outside the tolerance band."""
    why = "the nearest student the moves reach" if more else "the smallest student the spec language allows"
    return f"{budget.kind} {value:,} is {value / budget.target - 1:+.2%} from the target {budget.target:,}: {why}"


def additive_errors(table: dict[str, float], costs: Costs) -> Evaluate:
    """Estimate a student's error as the sum of the table's errors of the teacher units it removes (no forward)."""

    def estimate(spec: StudentSpec) -> float:
        return sum(table.get(unit, 0.0) for unit in removed_units(costs, spec))

    return lambda specs: [estimate(s) for s in specs]


def removed_units(costs: Costs, spec: StudentSpec) -> list[str]:
    """The table units (block paths, layer pairs, mid moves) that the student of `spec` removes from the teacher."""
    removed = costs.removed(spec)
    units = [p for p in removed if ".transformer_blocks." in p]
    n = len(costs.config["down_block_types"])
    for i in range(n):
        enc = [p.rpartition(".")[2] for p in removed if p.startswith(f"down_blocks.{i}.resnets.")]
        dec = [p.rpartition(".")[2] for p in removed if p.startswith(f"up_blocks.{n - 1 - i}.resnets.")]
        units += [f"layers down_blocks.{i}.{k} + up_blocks.{n - 1 - i}.{m}" for k, m in zip(enc, dec)]
    if "mid_block" in removed:
        units.append("mid: keep -> none")
    elif "mid_block.attentions.0" in removed:
        units.append("mid: keep -> resnet")
    return units


# ComfyUI detects a compressed SDXL U-Net by its input blocks' transformer depths, at SDXL's widths only
# (comfy/supported_models.py; KOALA.md section 7): its model class -> our registered spec of the same layout.
COMFYUI_LAYOUTS = {"KOALA_700M": "koala-700m", "KOALA_1B": "koala-1b", "SSD1B": "ssd-1b", "Segmind_Vega": "vega"}
COMFYUI_WIDTHS = {"block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
                  "projection_class_embeddings_input_dim": 2816}  # fmt: skip


def structure(config: dict[str, Any]) -> tuple:
    """A U-Net's layout as ComfyUI builds it: layers and transformer depth per layer, per stage, and its mid block."""
    lay = layout(config)
    return lay.down_depth, lay.up_depth, lay.mid, lay.mid_depth


def comfyui_layout(costs: Costs, budget: Budget) -> tuple[str, StudentSpec]:
    """The ComfyUI layout within the budget's band (the nearest if several); raises saying none fits, and why."""
    widths = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in costs.config.items() if k in COMFYUI_WIDTHS}
    if widths != COMFYUI_WIDTHS:
        raise ConfigError(
            f"search.comfyui=true: no layout fits: ComfyUI detects compressed SDXL U-Nets only at SDXL's widths "
            f"{COMFYUI_WIDTHS}, and this teacher has {widths}"
        )
    fitting, listed = [], []
    for model, name in COMFYUI_LAYOUTS.items():
        value = budget.value(costs.cost(SPECS[name]))
        listed.append(f"{model} {value:,} ({value / budget.value((costs.teacher_params, costs.teacher_flops)):.3f})")
        if budget.within(value):
            fitting.append((abs(value - budget.target), model, SPECS[name]))
    if not fitting:
        raise ConfigError(
            f"search.comfyui=true: no ComfyUI layout has {budget.kind} within {budget.tolerance:.0%} of "
            f"{budget.target:,}; ComfyUI detects: {'; '.join(listed)}"
        )
    _, model, spec = min(fitting)
    return model, spec


def layout_variants(costs: Costs, spec: StudentSpec) -> list[StudentSpec]:
    """Every spec with the same U-Net layout as `spec` (which teacher layers each stage keeps, which blocks each
    transformer keeps) whose student inherits: what a search may choose inside a fixed layout."""
    plan = resolve(costs.config, spec)
    base, out = explicit_spec(plan, spec.name), []
    n_dec, target = [len(k) for k in plan.decoder_keep], structure(student_config(costs.config, spec))
    enc_choices = [
        list(itertools.combinations(range(len(d)), len(k))) for d, k in zip(plan.teacher.down_depth, plan.encoder_keep)
    ]
    dec_choices = [list(itertools.combinations(range(len(d)), n)) for d, n in zip(plan.teacher.up_depth, n_dec)]
    for ek in itertools.product(*enc_choices):
        for dk in itertools.product(*dec_choices):
            for rule in LayerSelect:
                candidate = replace(base, encoder_keep=ek, decoder_keep=dk, layer_select=rule)
                try:
                    same = structure(student_config(costs.config, candidate)) == target
                except ValueError:  # a kept teacher layer too shallow for the layout's depth
                    continue
                if same and costs.fits(candidate):
                    out.append(candidate)
    return out
