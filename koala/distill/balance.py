"""Equal-strength feature KD (`distill.balance=grad`): each feature kind weighted so it pulls as hard as output KD.

Under plain MSE a feature kind's term can be many times another's (whole-block outputs are large, attention outputs
small), so comparing kinds at weight 1 compares a strong term with a weak one. With `balance=grad`, before step 1 the
trainer measures, on the inherited student and a few fixed batches (the first `distill.balance_batches` batches of
the data with seed 0, noise and timesteps from a fixed seed: the same for every training seed), the norm of the
gradient with respect to the student's parameters of

    out:   MSE(eps_S, eps_T)                                   (unweighted: the reference)
    kind:  feat_weight * sum over that kind's pairs of w_pair * feature loss   (w_pair as configured)

and sets each kind's balance factor to mean ||grad out|| / mean ||grad kind|| (means over the batches), so that the
kind's term in the objective has the output-KD term's gradient norm. The factors multiply the configured pair weights
(`koala.distill.pairing.pair_weights`), are logged, written to `balance.json` and every checkpoint's state, reused on
resume (never measured again) and shown by `koala.inspect run_dir=<run>`. `none` keeps the paper's weights.

This module holds the setting and the measure; the trainer measures and applies it (`koala.train.balance`).
"""

from __future__ import annotations

import math
from enum import auto

import torch

from koala.choice import Choice

SEED = 0  # data order, noise and timesteps of the measuring batches: fixed, whatever the run's seed


class Balance(Choice):
    """`distill.balance`: how feature kinds are weighted against each other."""

    none = auto()  # the configured weights (the paper's protocol: every term at weight 1)
    grad = auto()  # each kind scaled so its gradient norm equals the output-KD term's on the inherited student


def grad_norm(term: torch.Tensor, params: list[torch.Tensor]) -> float:
    """||d term / d params|| (the graph is kept for the next term)."""
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))


def balance_factors(mean_norms: dict[str, float]) -> dict[str, float]:
    """Each feature kind's factor from the mean gradient norms (`out` and one per kind): ||grad out|| / ||grad kind||."""
    return {k: mean_norms["out"] / v for k, v in mean_norms.items() if k != "out" and v > 0}


def describe(balance: dict) -> str:
    """One line: each kind's factor and the gradient norms measured."""
    if not balance.get("weights"):
        return "balance=grad: no feature pairs, nothing to balance"
    norms = balance["grad_norms"]
    parts = [f"{k} x{w:.4g} (grad norm {norms[k]:.4g})" for k, w in balance["weights"].items()]
    return f"balance=grad over {balance['batches']} batches, output-KD grad norm {norms['out']:.4g}: " + ", ".join(
        parts
    )
