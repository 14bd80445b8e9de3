"""DeepSpeed ZeRO-2 on two CPU ranks (gloo): the real `koala.train` under `accelerate launch --config_file
configs/accelerate/deepspeed-zero2.yaml --num_processes 2`, running the koala-700m recipe at the tiny teacher's size.

The recipe's own settings run: bf16 teacher, bf16 autocast, accumulation 4 (grad_accum), gradient checkpointing, EMA,
caption dropout, sampling. Shrunk or swapped: sizes and cadences, the tiny teacher, generated shards (3 on 2 ranks:
finite and uneven), no trackers. The optimizer is made to show its clipping: AdamW with eps=1 and no weight decay
steps by lr * g / (|g| + 1) per element, so the first update's norm is at most lr x the clipped gradient norm (and
within 1% of it while every |g| is small), where an unclipped step would be lr x the logged (pre-clip) norm.

Three launches (tests/sharded_runs.py) serve every test: the DeepSpeed run, a DDP run of its first step, and the
DeepSpeed run resumed from its step-2 checkpoint.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sharded_runs import LOSSES, STEPS, assert_equal, assert_resume_is_exact, metrics, three_runs, weights

from koala.train.checkpoint import verify_checkpoint

REPO = Path(__file__).resolve().parent.parent
LAUNCH_TIMEOUT = 600  # the first DeepSpeed launch on a machine also compiles its CPU shared-memory op (cached after)
LR, CLIP = 1e-2, 0.5
CLIP_REVEALING = {"optim.lr": LR, "optim.eps": 1.0, "optim.weight_decay": 0.0, "optim.max_grad_norm": CLIP}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pipeline_dir):
    root = tmp_path_factory.mktemp("deepspeed")
    return three_runs(root, tiny_pipeline_dir, "deepspeed-zero2.yaml", LAUNCH_TIMEOUT, **CLIP_REVEALING)


def inherited_student(pipeline: Path) -> dict[str, torch.Tensor]:
    """The student every run starts from: tiny-700m inherited from the tiny teacher (every tensor copied)."""
    from koala.config.compose import compose_config
    from koala.config.schema import TrainConfig
    from koala.models.plans import student_plan
    from koala.models.teacher import load_teacher
    from koala.train.build import make_student

    cfg = compose_config(
        "train", ["teacher=tiny", "unet=tiny-700m", f"teacher.pipeline={pipeline}"], schema=TrainConfig
    )
    teacher = load_teacher(cfg.teacher, dtype=None)
    student, report = make_student(teacher, student_plan(dict(teacher.config), cfg.unet))
    assert "0 left random" in report.summary()
    return {k: v.detach().clone() for k, v in student.state_dict().items()}


def norm(a: dict, b: dict) -> float:
    return torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)).item()


@pytest.mark.slow
def test_the_engine_runs_zero2_with_koalas_accumulation_clipping_and_precision(runs):
    assert (
        "DeepSpeed ZeRO stage 2: micro-batch 2, gradient_accumulation_steps 4, gradient_clipping 0.5, student weights "
        "torch.float32 with torch autocast torch.bfloat16 (DeepSpeed bf16 mode off)" in runs["log"]
    )
    ckpt = runs["engine"] / "checkpoints" / f"step-{STEPS:08d}"
    verify_checkpoint(ckpt)  # the manifest covers every rank's ZeRO partition
    state = ckpt / "accelerate" / "pytorch_model"
    assert {p.name for p in state.iterdir()} == {
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }  # fmt: skip
    ranks = [json.loads((runs["engine"] / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == STEPS * 4 * 2  # 4 batches of 2 per step and rank
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert (runs["engine"] / "samples" / f"student-{STEPS:08d}.png").is_file()


@pytest.mark.slow
def test_zero2_student_trains_as_the_ddp_one_does(runs):
    ds, ddp = metrics(runs["engine"])[1], metrics(runs["ddp"])[1]
    for key in LOSSES:  # the first step: the same weights, inputs and noise on every rank, the same autocast
        assert ds[key] == pytest.approx(ddp[key], rel=1e-6, abs=1e-9), key
    assert ds["grad_norm"] == pytest.approx(ddp["grad_norm"], rel=1e-5)
    a, b = weights(runs["engine"], 1), weights(runs["ddp"], 1)  # one optimizer step apart from the same start
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-7  # gradient reduction order: an ulp or so


@pytest.mark.slow
def test_deepspeed_clips_the_update_to_max_grad_norm(runs, tiny_pipeline_dir):
    first = metrics(runs["engine"])[1]
    assert first["grad_norm"] > 5 * CLIP  # the pre-clip norm: clipping has to bite
    step = norm(weights(runs["engine"], 1), inherited_student(tiny_pipeline_dir))
    # lr * |g| / (|g| + 1) per element: at most lr x the clipped norm; an unclipped step would be > 5x that
    assert 0.99 * LR * CLIP < step <= LR * CLIP * (1 + 1e-4), step


@pytest.mark.slow
def test_unet_is_saved_in_fp32_from_the_zero_masters(runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = runs["engine"] / "checkpoints" / f"step-{STEPS:08d}"
    saved = weights(runs["engine"], STEPS)
    assert {v.dtype for v in saved.values()} == {torch.float32}
    masters = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "accelerate"), tag="pytorch_model")
    assert_equal(saved, {k: v.contiguous() for k, v in masters.items()}, "unet vs the optimizer's fp32 partitions")


@pytest.mark.slow
def test_ema_is_fp32_from_the_fp32_weights_and_moves_below_bf16_resolution(runs):
    """EMAModel's update (warm-up decay (1 + n) / (10 + n), 0 at the first step) redone on the saved weights."""
    ema = weights(runs["engine"], 1)  # decay 0: the first update copies the weights
    for step in range(2, STEPS + 1):
        decay, trained = min(step / (9 + step), 0.9999), weights(runs["engine"], step)
        ema = {k: v - (1 - decay) * (v - trained[k]) for k, v in ema.items()}
    saved, start = weights(runs["engine"], STEPS, "unet_ema"), weights(runs["engine"], 1, "unet_ema")
    assert {v.dtype for v in saved.values()} == {torch.float32}
    for k in ema:
        torch.testing.assert_close(saved[k], ema[k], rtol=1e-6, atol=1e-8, msg=k)
    moved = torch.cat([(saved[k] - start[k]).flatten() for k in saved]).abs()
    ulp = torch.cat([start[k].flatten() for k in start]).abs() * 2**-8  # a bf16 ulp at each weight
    assert moved.max() > 0
    assert (moved[moved > 0] < ulp[moved > 0] / 2).float().mean() > 0.5  # mostly lost to rounding in bf16 shadows


@pytest.mark.slow
def test_resume_latest_from_a_zero2_checkpoint_is_exact(runs):
    assert_resume_is_exact(runs)


@pytest.mark.slow
def test_export_of_a_zero2_run_is_the_fp32_ema_stock_diffusers_loads(runs, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from koala.export import main as export_main

    out = export_main([f"run_dir={runs['engine']}", f"out={tmp_path / 'export'}"])  # python -m koala.export
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert {v.dtype for v in unet.state_dict().values()} == {torch.float32}
    assert_equal(unet.state_dict(), weights(runs["engine"], STEPS, "unet_ema"), "export")
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and image.std() > 0


@pytest.mark.slow
def test_an_accumulation_the_launch_config_fixes_against_grad_accum_is_refused_in_one_line(tmp_path):
    """`python -m koala.train` as `accelerate launch` starts it from the old deepspeed-zero2.yaml (its
    gradient_accumulation_steps: 4) with koala-700m-24gb (grad_accum 16): refused before any model loads."""
    launch_env = {  # what accelerate/utils/launch.py sets for that config
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4",
    }
    env = {**os.environ, **launch_env}
    res = subprocess.run(
        [sys.executable, "-m", "koala.train", "experiment=koala-700m-24gb", f"output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]  # (bitsandbytes warns too)
    assert len(errors) == 1 and "gradient_accumulation_steps=4 differs from grad_accum=16" in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before the run folder is written


@pytest.mark.parametrize(
    "env,overrides,message",
    [({"ACCELERATE_GRADIENT_CLIPPING": "1.0"}, ["optim.max_grad_norm=0.5"],
      "gradient_clipping=1.0 differs from optim.max_grad_norm=0.5"),
     ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, [], "zero_stage=3 is not supported"),
     ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, [], "offload_optimizer_device=cpu is not supported"),
     ({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"}, [], "deepspeed_config_file) is not supported"),
     ({}, ["mixed_precision=fp16"], "mixed_precision=fp16 is not supported under DeepSpeed"),
     ({}, ["compile=true"], "compile=true is not supported under DeepSpeed")],
)  # fmt: skip
def test_deepspeed_settings_koala_cannot_run_are_refused(env, overrides, message, monkeypatch):
    from koala.config.checks import ConfigError
    from koala.config.compose import compose_config
    from koala.config.schema import TrainConfig
    from koala.train.deepspeed import check_launch

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_launch(compose_config("train", ["experiment=koala-700m", *overrides], schema=TrainConfig))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    check_launch(
        compose_config("train", ["experiment=koala-700m", *overrides], schema=TrainConfig)
    )  # only a DeepSpeed launch is checked


def test_the_engine_config_comes_from_koalas_settings(monkeypatch):
    from koala.config.compose import compose_config
    from koala.config.schema import TrainConfig
    from koala.train.deepspeed import deepspeed_kwargs

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = compose_config("train", ["experiment=koala-700m-24gb", "optim.max_grad_norm=0.25"], schema=TrainConfig)
    config = deepspeed_kwargs(cfg)["deepspeed_plugin"].deepspeed_config
    assert config["gradient_accumulation_steps"] == 16 and config["gradient_clipping"] == 0.25
    assert config["zero_optimization"]["stage"] == 2 and config["train_micro_batch_size_per_gpu"] == 8
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
