"""Run folders and resume: nothing lost, nothing silently changed (tiny teacher, generated shards, CPU)."""

import json
import os
import signal

import pytest
import torch
from omegaconf import OmegaConf
from test_train import read_metrics, tiny_overrides, unet_state

import koala.train.loop
from koala.config.checks import ConfigError
from koala.config.compose import compose_config
from koala.config.schema import TrainConfig
from koala.train.checkpoint import StopSignal
from koala.train.loop import train


def run(tmp, shared, **kw):
    return train(compose_config("train", tiny_overrides(tmp, shared, **kw), schema=TrainConfig))


def assert_same_weights(a, b):
    for sub in ("unet", "unet_ema"):
        sa, sb = unet_state(a, sub), unet_state(b, sub)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (sub, k)


@pytest.mark.slow
def test_checkpoint_and_sample_cadence_do_not_change_the_run(tmp_path, shared):
    plain = run(tmp_path / "a", shared, checkpoint_every=4)
    busy = run(tmp_path / "b", shared, checkpoint_every=1, sample_every=1, sample_steps=2)
    assert (busy / "samples" / "student-00000003.png").exists()
    assert_same_weights(plain / "checkpoints" / "step-00000004", busy / "checkpoints" / "step-00000004")


class StopAtStep(StopSignal):
    """Sends the process a real SIGTERM when the loop asks at step `at` (an unscheduled checkpoint)."""

    at = 3

    def agreed(self, accelerator) -> bool:
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().agreed(accelerator)


@pytest.mark.slow
def test_sigterm_at_an_unscheduled_step_resumes_bit_exactly(tmp_path, shared, monkeypatch):
    straight = run(tmp_path / "a", shared, max_steps=6, checkpoint_every=4)
    with monkeypatch.context() as m:
        m.setattr(koala.train.loop, "StopSignal", StopAtStep)
        stopped = run(tmp_path / "b", shared, max_steps=6, checkpoint_every=4)
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["step-00000003"]
    resumed = run(tmp_path / "b", shared, max_steps=6, checkpoint_every=4, resume="latest")
    assert_same_weights(straight / "checkpoints" / "step-00000006", resumed / "checkpoints" / "step-00000006")
    steps = [r["step"] for r in read_metrics(resumed)]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6]  # logged once each


def test_stop_signal_second_signal_exits_at_once():
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shared):
    """A run of 4 steps with checkpoints at 2 and 4."""
    return run(tmp_path_factory.mktemp("finished"), shared)


@pytest.mark.parametrize(
    "override,changed",
    [
        ("unet=tiny-1b", "unet.name: 'tiny-700m' -> 'tiny-1b'"),
        ("distill=ca", "distill.kinds: ['sa'] -> ['ca']"),
        ("batch_size=3", "batch_size: 2 -> 3"),
        ("data.resolution=64", "data.resolution: 32 -> 64"),
        ("seed=1", "seed: 0 -> 1"),
    ],
)
def test_resume_refuses_settings_that_define_the_run(finished, shared, override, changed, monkeypatch):
    loaded = []
    monkeypatch.setattr(koala.train.loop, "load_frozen", lambda *a: loaded.append(a))
    key, value = override.split("=")
    overrides = tiny_overrides(finished.parent, shared, max_steps=8, resume="latest")
    cfg = compose_config(
        "train", [o for o in overrides if not o.startswith(f"{key}=")] + [override], schema=TrainConfig
    )
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert changed in str(err.value) and "Only these may change on resume" in str(err.value)
    assert not loaded  # refused before any model loads


def test_fresh_start_into_a_run_with_checkpoints_is_refused(finished, shared):
    with pytest.raises(ConfigError, match="already holds checkpoints of a run; continue it with resume=latest"):
        run(finished.parent, shared)


@pytest.mark.slow
def test_resume_applies_a_new_lr_keeps_config_history_and_metrics_once(tmp_path, shared):
    first = run(tmp_path, shared, max_steps=4, checkpoint_every=2)
    # a crash after step 4 was logged but before its checkpoint was complete: resume from step 2
    os.rename(first / "checkpoints" / "step-00000004" / "COMPLETE", first / "checkpoints" / "step-00000004" / "gone")
    run(tmp_path, shared, max_steps=6, checkpoint_every=2, resume="latest", **{"optim.lr": "1e-3"})
    rows = read_metrics(first)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert {r["lr"] for r in rows[:2]} == {5e-5} and {r["lr"] for r in rows[2:]} == {1e-3}
    assert OmegaConf.load(first / "config.1.yaml").optim.lr == 5e-5
    assert OmegaConf.load(first / "config.yaml").optim.lr == 1e-3
    state = json.loads((first / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["config"]["optim"]["lr"] == 1e-3


@pytest.mark.slow
def test_resume_auto_starts_fresh_then_continues(tmp_path, shared):
    run(tmp_path, shared, max_steps=2, resume="auto")
    again = run(tmp_path, shared, max_steps=4, resume="auto")
    assert [r["step"] for r in read_metrics(again)] == [1, 2, 3, 4]
