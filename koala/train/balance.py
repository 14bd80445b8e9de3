"""`distill.balance=grad` in a run: measure each feature kind's factor before step 1, or take it from the checkpoint
being resumed, and weight the task's pairs with it (the method: `koala.distill.balance`)."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import OmegaConf

from koala.data import build_dataloader
from koala.distill.balance import SEED, balance_factors, describe, grad_norm
from koala.distill.pairing import rebalance
from koala.errors import ConfigError
from koala.rng import rng_preserved
from koala.train.checkpoint import list_checkpoints, read_state, write_json_atomic
from koala.train.step import Trainable, distill_losses

if TYPE_CHECKING:
    from koala.config.schema import TrainConfig

log = logging.getLogger("koala.train")


def term_grad_norms(run: Trainable, conds: list[dict]) -> dict[str, list[float]]:
    """Per batch, the gradient norm of the output-KD term and of each feature kind's term (as weighted)."""
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


def measure_balance(run: Trainable, cfg: TrainConfig, conditioner, seed: int = SEED) -> dict:
    """The balance factors of a fresh run (`koala.distill.balance`), with the gradient norms they come from.

    `run` is the built Trainable; the student it holds is measured bare (unwrapped), so no DDP hook fires, and the
    global RNG is left as it was: training draws the same noise as without the measurement. `seed` picks other
    batches (the tests check the factors on batches they were not measured on).
    """
    bare = dataclasses.replace(run, task=run.task.running(run.accelerator.unwrap_model(run.student)))
    if not bare.task.pairs:
        return {"weights": {}, "grad_norms": {}, "batches": 0}
    data = OmegaConf.merge(cfg.data, {"num_workers": 0})  # a few batches, read once
    with rng_preserved():
        torch.manual_seed(seed)
        batches = list(
            islice(build_dataloader(data, batch_size=cfg.batch_size, seed=seed), cfg.distill.balance_batches)
        )
        norms = term_grad_norms(bare, [conditioner(b) for b in batches])
    mean = {k: sum(v) / len(v) for k, v in norms.items()}
    return {"weights": balance_factors(mean), "grad_norms": mean, "batches": len(batches)}


def apply_balance(cfg: TrainConfig, run: Trainable, conditioner, ckpt: Path | None, run_dir: Path) -> dict | None:
    """`distill.balance=grad`: measure the kinds' balance factors on a fresh run, or take them from the checkpoint
    being resumed (never measured again), and weight the task's pairs with them. None under `balance=none`."""
    if cfg.distill.balance == "none":
        return None
    if ckpt is not None:
        balance = read_state(ckpt).get("balance")
        if balance is None:
            raise ConfigError(f"{ckpt} holds no balance weights, but distill.balance=grad: it was not written by a "
                              "balance=grad run")  # fmt: skip
    else:
        balance = measure_balance(run, cfg, conditioner)
    log.info("%s%s", describe(balance), " (from the checkpoint)" if ckpt is not None else "")
    if run.accelerator.is_main_process:
        write_json_atomic(run_dir / "balance.json", balance)
    run.task = run.task.with_pairs(rebalance(run.task.pairs, cfg.distill, balance["weights"]))
    return balance


def run_balance(run_dir: Path) -> dict | None:
    """A run's measured balance factors: from its newest complete checkpoint, else its `balance.json`."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        if "balance" in read_state(ckpt):
            return read_state(ckpt)["balance"]
    path = run_dir / "balance.json"
    return json.loads(path.read_text()) if path.is_file() else None
