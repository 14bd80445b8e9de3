"""A student spec at a budget: greedy removal by measured error per unit of cost.

`greedy` starts from the teacher and, while the student is over budget, applies the move with the smallest increase
of the output error per parameter (or FLOP) it removes. With `evaluate` measuring every candidate student on the
calibration set (re-measured after each removal), interactions between removals are seen; with the table's errors
summed instead (`additive_errors`), one measurement pass suffices. Moves that would land below the budget's
tolerance band are not taken while others remain; if none lands in the band, the student nearest the target wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import auto

from koala.choice import Choice
from koala.errors import ConfigError
from koala.models.specs import StudentSpec
from koala.pruning.moves import Costs, moves

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
