"""The distillation trainer end to end on the tiny teacher and generated shards (CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import two_process_launch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from koala.config.compose import compose_config
from koala.config.schema import TrainConfig
from koala.train.loop import train

REPO = Path(__file__).resolve().parent.parent


def tiny_overrides(tmp: Path, shared: Path, **extra) -> list[str]:
    """A tiny, fast run: shared tiny teacher and demo shards, its own output folder."""
    base = {
        "teacher": "tiny",
        "unet": "tiny-700m",
        "data": "demo",
        "teacher.pipeline": str(shared / "tiny-sdxl"),
        "data.path": f"'{shared / 'demo-shards' / 'demo-{00000..00003}.tar'}'",  # quoted: braces are grammar
        "data.resolution": 32,
        "output_dir": str(tmp / "run"),
        "batch_size": 2,
        "max_steps": 4,
        "log_every": 1,
        "checkpoint_every": 2,
        "sample_every": 0,
        "report_to": "[]",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def unet_state(ckpt: Path, sub: str = "unet") -> dict:
    return load_file(str(ckpt / sub / "diffusion_pytorch_model.safetensors"))


@pytest.mark.slow
def test_short_run_lowers_kd_losses_and_exports(tmp_path, shared):
    cfg = compose_config(
        "train",
        tiny_overrides(
            tmp_path,
            shared,
            max_steps=40,
            log_every=5,
            checkpoint_every=40,
            batch_size=4,
            **{"optim.lr": "3e-4", "distill.task_weight": 0.1},
        ),
        schema=TrainConfig,
    )
    run = train(cfg)
    rows = read_metrics(run)
    for key in (
        "loss/total",
        "loss/task",
        "loss/out",
        "loss/feat",
        "loss/feat/sa",
        "loss/feat/encoder",
        "loss/feat/decoder",
    ):
        assert key in rows[0], key
    first, last = rows[0], rows[-1]
    assert last["loss/out"] < 0.7 * first["loss/out"]
    assert last["loss/feat"] < 0.7 * first["loss/feat"]
    ckpt = run / "checkpoints" / "step-00000040"
    assert (ckpt / "COMPLETE").exists() and (ckpt / "unet_ema").is_dir()
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(shared / "tiny-sdxl"), unet=UNet2DConditionModel.from_pretrained(ckpt / "unet")
    )
    img = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert img.shape == (1, 32, 32, 3)


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path, shared):
    straight = train(compose_config("train", tiny_overrides(tmp_path / "a", shared, max_steps=4), schema=TrainConfig))
    # The interrupted run stops after its step-2 checkpoint, then resumes to step 4.
    part = tiny_overrides(tmp_path / "b", shared, max_steps=2)
    train(compose_config("train", part, schema=TrainConfig))
    resumed = train(
        compose_config(
            "train", tiny_overrides(tmp_path / "b", shared, max_steps=4, resume="latest"), schema=TrainConfig
        )
    )
    for sub in ("unet", "unet_ema"):
        a = unet_state(straight / "checkpoints" / "step-00000004", sub)
        b = unet_state(resumed / "checkpoints" / "step-00000004", sub)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)


@pytest.mark.parametrize(
    "override,message",
    [
        ("max_stepz=3", "max_stepz"),
        ("distill=nope", "distill/nope"),
        ("teacher.pipeline=/no/such/sdxl", "/no/such/sdxl"),
        ("teacher=sdxl-base", "teacher.pipeline is required"),
        ("unet=koala-700m", "has only 4"),
    ],
)
@pytest.mark.slow
def test_bad_config_fails_before_loading_models(override, message, tmp_path, tiny_pipeline_dir):
    # a real teacher folder (an empty one is refused first, by the start-up check of its parts)
    extra = [] if override.startswith("teacher") else [f"teacher.pipeline={tiny_pipeline_dir}"]
    res = subprocess.run(
        [sys.executable, "-m", "koala.train", override, f"output_dir={tmp_path / 'run'}", *extra],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert res.returncode != 0
    assert message in res.stderr + res.stdout
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing ran


@pytest.mark.slow
def test_two_process_launch_agrees_on_weights_and_splits_data(tmp_path, shared):
    cmd = two_process_launch("koala.train", *tiny_overrides(tmp_path, shared, max_steps=3, record_ranks="true"))
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / "run" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[1]["rank"] == 1
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])  # different samples on each rank
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 3 * 2


@pytest.mark.slow
def test_multirun_sweep_gives_each_job_its_run_dir(tmp_path, shared):
    args = [a for a in tiny_overrides(tmp_path, shared, max_steps=1) if not a.startswith("output_dir")]
    res = subprocess.run(
        [sys.executable, "-m", "koala.train", "-m", "distill=sa,out", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted(p.parent for p in (tmp_path / "sweep").glob("*/config.yaml"))
    assert len(runs) == 2 and all((r / "checkpoints" / "step-00000001" / "COMPLETE").exists() for r in runs)
    assert {OmegaConf.load(r / "config.yaml").distill.name for r in runs} == {"sa", "out"}


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_before_exiting(tmp_path, shared):
    import signal
    import time

    args = tiny_overrides(tmp_path, shared, max_steps=100000, checkpoint_every=100000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "koala.train", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    err, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    ckpts = [p for p in (tmp_path / "run" / "checkpoints").iterdir() if (p / "COMPLETE").exists()]
    assert len(ckpts) == 1 and int(ckpts[0].name.split("-")[1]) >= 3
    assert "stop requested" in err


@pytest.mark.slow
def test_a_source_that_skips_everything_ends_the_run_with_the_likely_cause(tmp_path, shared):
    args = tiny_overrides(tmp_path, shared, **{"data.caption_key": "json.llava_captoin", "data.num_workers": 1})
    res = subprocess.run(
        [sys.executable, "-m", "koala.train", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )  # a hard limit: the regression was a silent endless loop
    assert res.returncode == 1, res.stderr[-2000:]
    assert "10000 samples in a row were skipped" in res.stderr and "check data.caption_key" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_two_processes_with_finite_uneven_data_stop_together(tmp_path, shared):
    from koala.fixtures.shards import write_demo_shards

    write_demo_shards(tmp_path / "uneven", n=24, resolution=32, samples_per_shard=8)  # 3 shards on 2 ranks
    cmd = two_process_launch(
        "koala.train",
        *tiny_overrides(tmp_path, shared, max_steps=100, checkpoint_every=3, record_ranks="true",
                        **{"data.path": f"'{tmp_path}/uneven/demo-{{00000..00002}}.tar'", "data.resampled": "false",
                           "data.epochs": 1, "data.shuffle": "false"}),
    )  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / "run" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == 8  # rank 1's one shard: 4 batches of 2 each
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert (tmp_path / "run" / "checkpoints" / "step-00000004" / "COMPLETE").exists()


@pytest.mark.slow
def test_a_diverging_run_stops_with_an_error_and_writes_no_nan(tmp_path, shared):
    args = tiny_overrides(tmp_path, shared, max_steps=8, checkpoint_every=1, max_nonfinite_steps=3,
                          **{"optim.lr": "1e10"})  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-m", "koala.train", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert res.returncode == 1, res.stderr[-2000:]  # before: rc 0, every checkpoint (EMA too) all NaN
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0].startswith("error: 3 optimizer steps in a row had a non-finite loss") and len(errors) == 1
    assert "Traceback" not in res.stderr
    assert "optimizer step skipped (1 in a row" in res.stdout  # logged where Hydra logs: stdout
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert ckpts, "the steps before the divergence were checkpointed"
    for ckpt in ckpts:
        for sub in ("unet", "unet_ema"):
            assert all(torch.isfinite(t).all() for t in unet_state(ckpt, sub).values()), (ckpt.name, sub)
    assert all(r["loss/total"] == r["loss/total"] for r in read_metrics(tmp_path / "run"))  # no NaN logged
