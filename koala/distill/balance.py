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
(`koala.distill.pairing.pair_weight`), are logged, written to `balance.json` and every checkpoint's state, reused on
resume (never measured again) and shown by `koala.inspect run_dir=<run>`. `none` keeps the paper's weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from enum import auto
from itertools import islice

import torch
from omegaconf import OmegaConf

from koala.config.choice import Choice

log = logging.getLogger("koala.distill.balance")
SEED = 0  # data order, noise and timesteps of the measuring batches: fixed, whatever the run's seed


class Balance(Choice):
    """`distill.balance`: how feature kinds are weighted against each other."""

    none = auto()  # the configured weights (the paper's protocol: every term at weight 1)
    grad = auto()  # each kind scaled so its gradient norm equals the output-KD term's on the inherited student


def grad_norm(term: torch.Tensor, params: list[torch.Tensor]) -> float:
    """||d term / d params|| (the graph is kept for the next term)."""
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads if g is not None))


def term_grad_norms(run, conds: list[dict]) -> dict[str, list[float]]:
    """Per batch, the gradient norm of the output-KD term and of each feature kind's term (as weighted)."""
    from koala.train.step import distill_losses

    task = run.task
    params = [p for p in task.student.parameters() if p.requires_grad]
    norms: dict[str, list[float]] = defaultdict(list)
    with task:
        for cond in conds:
            losses = distill_losses(run, cond)
            norms["out"].append(grad_norm(losses["out"], params))
            for kind, term in task.kind_terms().items():
                norms[kind].append(grad_norm(task.weights.feat * term, params))
    return dict(norms)


def measure_balance(run, cfg, conditioner, seed: int = SEED) -> dict:
    """The balance factors of a fresh run (see the module doc), with the gradient norms they come from.

    `run` is the built Trainable; the student it holds is measured bare (unwrapped), so no DDP hook fires, and the
    global RNG is left as it was: training draws the same noise as without the measurement. `seed` picks other
    batches (the tests check the factors on batches they were not measured on).
    """
    from koala.data import build_dataloader
    from koala.train.rng import rng_preserved

    bare = dataclasses.replace(run, task=run.task.running(run.accelerator.unwrap_model(run.student)))
    if not bare.task.pairs:
        return {"weights": {}, "grad_norms": {}, "batches": 0}
    data = OmegaConf.merge(cfg.data, {"num_workers": 0})  # a few batches, read once
    with rng_preserved():
        torch.manual_seed(SEED)
        batches = list(
            islice(build_dataloader(data, batch_size=cfg.batch_size, seed=SEED), cfg.distill.balance_batches)
        )
        norms = term_grad_norms(bare, [conditioner(b) for b in batches])
    mean = {k: sum(v) / len(v) for k, v in norms.items()}
    weights = {k: mean["out"] / v for k, v in mean.items() if k != "out" and v > 0}
    return {"weights": weights, "grad_norms": mean, "batches": len(batches)}


def describe(balance: dict) -> str:
    """One line: each kind's factor and the gradient norms measured."""
    if not balance.get("weights"):
        return "balance=grad: no feature pairs, nothing to balance"
    norms = balance["grad_norms"]
    parts = [f"{k} x{w:.4g} (grad norm {norms[k]:.4g})" for k, w in balance["weights"].items()]
    return f"balance=grad over {balance['batches']} batches, output-KD grad norm {norms['out']:.4g}: " + ", ".join(
        parts
    )
