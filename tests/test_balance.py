"""distill.balance=grad: feature kinds weighted to the output-KD term's gradient norm, kept with the run."""

import json
from pathlib import Path

import pytest
import torch
from test_train import tiny_overrides, unet_state

from koala.config.compose import compose_config
from koala.config.schema import TrainConfig
from koala.train.loop import train

KINDS = "[sa,ca,ffn,lf]"


def balanced_overrides(tmp: Path, shared: Path, **extra) -> list[str]:
    return tiny_overrides(tmp, shared, **{"distill.kinds": KINDS, "distill.balance": "grad", "batch_size": 4, **extra})


def fresh_trainable(cfg):
    """The run's parts as `train` builds them before step 1 (teacher in its training dtype)."""
    from koala.config.checks import check_config
    from koala.devices import DTYPES
    from koala.train.build import build_trainable, load_frozen, make_accelerator

    plan, accelerator = check_config(cfg), make_accelerator(cfg)
    conditioner, noising, teacher = load_frozen(cfg, accelerator.device)
    run = build_trainable(cfg, accelerator, teacher, noising, plan, cfg.data.resolution // conditioner.vae_scale_factor)
    teacher.to(accelerator.device, DTYPES[cfg.teacher.dtype])
    return run, conditioner


@pytest.mark.slow
def test_balance_weights_equalise_gradient_norms_and_weight_the_objective(tmp_path, shared, capsys):
    from koala.distill.pairing import rebalance
    from koala.inspect import main as inspect
    from koala.train.balance import measure_balance

    # Measured over 8 batches of 16: the factors are estimates, and 4 batches of 4 on this tiny teacher left up to 13 %
    # between a kind's and the output term's gradient norm on other batches (8 of 16: at most 8 % over 6 other seeds).
    extra = {"batch_size": 16, "distill.balance_batches": 8}
    cfg = compose_config(
        "train", balanced_overrides(tmp_path, shared, max_steps=2, checkpoint_every=2, **extra), schema=TrainConfig
    )
    run_dir = train(cfg)
    balance = json.loads((run_dir / "balance.json").read_text())
    weights, norms = balance["weights"], balance["grad_norms"]
    assert sorted(weights) == ["ca", "ffn", "lf", "sa"] and balance["batches"] == 8
    assert max(norms.values()) > 3 * min(norms.values())  # unequal as configured: something to balance
    state = json.loads((run_dir / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["balance"] == balance

    # The objective's feature term is the sum of each kind's (unweighted) loss times its factor.
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert row["loss/feat"] == pytest.approx(sum(w * row[f"loss/feat/{k}"] for k, w in weights.items()), rel=1e-5)

    # With the factors applied, every kind's gradient norm is the output-KD term's: exactly on the measuring
    # batches, within 10 % on batches (data, noise, timesteps) the factors were not measured on.
    run, conditioner = fresh_trainable(cfg)
    run.task = run.task.with_pairs(rebalance(run.task.pairs, cfg.distill, weights))
    for seed, tolerance in ((0, 1e-4), (1, 0.10), (2, 0.10)):
        again = measure_balance(run, cfg, conditioner, seed=seed)["grad_norms"]
        for kind in weights:
            assert again[kind] == pytest.approx(again["out"], rel=tolerance), (seed, kind, again)

    inspect([f"run_dir={run_dir}"])
    shown = capsys.readouterr().out
    assert "balance=grad over 8 batches" in shown and f"w={weights['lf']:.4g}" in shown


@pytest.mark.slow
def test_balance_is_kept_on_resume_and_never_measured_again(tmp_path, shared, monkeypatch):
    import koala.train.balance as balance

    straight = train(
        compose_config("train", balanced_overrides(tmp_path / "a", shared, max_steps=4), schema=TrainConfig)
    )
    train(compose_config("train", balanced_overrides(tmp_path / "b", shared, max_steps=2), schema=TrainConfig))
    measured = json.loads((tmp_path / "b" / "run" / "balance.json").read_text())

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run measured its balance again")

    monkeypatch.setattr(balance, "measure_balance", refuse)
    resumed = train(
        compose_config(
            "train", balanced_overrides(tmp_path / "b", shared, max_steps=4, resume="latest"), schema=TrainConfig
        )
    )
    state = json.loads((resumed / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["balance"] == measured
    for sub in ("unet", "unet_ema"):  # and the resumed run is the uninterrupted one, bit for bit
        a = unet_state(straight / "checkpoints" / "step-00000004", sub)
        b = unet_state(resumed / "checkpoints" / "step-00000004", sub)
        assert all(torch.equal(a[k], b[k]) for k in a), sub
