"""Run folders and resume: nothing lost, nothing silently changed (tiny teacher, generated shards, CPU)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
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


def copy_run(finished, tmp_path):
    """A private copy of the finished run, at `tmp_path/run` (where tiny_overrides(tmp_path, ...) points)."""
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


class Loaded(RuntimeError):
    """Raised in place of loading the models: the start-up checks passed."""


def refuse_loading(*args):
    raise Loaded


HOLD = "import sys, time\nfrom koala.train.runs import run_folder_lock\nwith run_folder_lock(sys.argv[1]):\n" \
       "    print('held', flush=True)\n    time.sleep(600)\n"  # fmt: skip


def test_a_second_process_on_a_run_folder_is_refused_naming_the_holder(finished, shared, tmp_path, monkeypatch):
    run_dir = copy_run(finished, tmp_path)
    monkeypatch.setattr(koala.train.loop, "load_frozen", refuse_loading)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ConfigError, match=rf"in use by another koala process: pid {holder.pid} on host "
                                              rf"{socket.gethostname()} \(since .*\) holds {run_dir}/\.lock"):  # fmt: skip
            run(tmp_path, shared, max_steps=8, resume="auto")
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(Loaded):  # the lock of a process that died does not block
        run(tmp_path, shared, max_steps=8, resume="auto")


def test_resume_refuses_a_different_teacher_behind_a_moved_path(finished, shared, tmp_path, monkeypatch):
    copy_run(finished, tmp_path)
    monkeypatch.setattr(koala.train.loop, "load_frozen", refuse_loading)
    moved = Path(shutil.copytree(shared / "tiny-sdxl", tmp_path / "moved-teacher"))
    weights = moved / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    tuned = {k: v + 0.01 for k, v in load_file(weights).items()}  # a fine-tune: same names, shapes, header, size
    save_file(tuned, str(weights), metadata=metadata)
    assert weights.stat().st_size == (shared / "tiny-sdxl" / "unet" / weights.name).stat().st_size
    with pytest.raises(ConfigError, match=r"the teacher is not the one .*step-00000004 was trained from: its unet "
                                          r"weights differ \(teacher.pipeline='.*moved-teacher'"):  # fmt: skip
        run(tmp_path, shared, max_steps=8, resume="latest", **{"teacher.pipeline": moved})
    shutil.copy(shared / "tiny-sdxl" / "unet" / weights.name, weights)  # the same teacher, moved: accepted
    with pytest.raises(Loaded):
        run(tmp_path, shared, max_steps=8, resume="latest", **{"teacher.pipeline": moved})


@pytest.mark.slow
def test_rotation_after_resuming_an_older_checkpoint_keeps_the_new_one(finished, shared, tmp_path):
    run_dir = copy_run(finished, tmp_path)  # checkpoints at steps 2 and 4
    run(tmp_path, shared, max_steps=3, checkpoint_every=1, keep_checkpoints=1, resume="2")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000003"]  # before: only step 4
    again = run(tmp_path, shared, max_steps=4, checkpoint_every=1, keep_checkpoints=1, resume="latest")
    assert [r["step"] for r in read_metrics(again)] == [1, 2, 3, 4]  # continued from step 3, not the old step 4


@pytest.mark.slow
def test_two_real_processes_on_one_run_folder(tmp_path, shared):
    args = [sys.executable, "-m", "koala.train", *tiny_overrides(tmp_path, shared, max_steps=100000,
                                                                 checkpoint_every=100000, resume="auto")]  # fmt: skip
    first = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and metrics.read_text()):
            time.sleep(0.5)  # the first run is training
        second = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and f"in use by another koala process: pid {first.pid}" in second.stderr
        assert "Loading" not in second.stderr and first.poll() is None  # refused before loading; the first goes on
    finally:
        first.kill()  # SIGKILL: no checkpoint, the lock file stays behind
        first.wait()
    third = subprocess.run([*args[:-1], "resume=auto", "max_steps=2"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert third.returncode == 0, third.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
