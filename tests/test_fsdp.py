"""FSDP2 on two CPU ranks (gloo): the real `koala.train` under `accelerate launch --config_file
configs/accelerate/fsdp-cpu-2proc.yaml`, running the koala-700m recipe at the tiny teacher's size.

The recipe's own settings run: bf16 teacher, bf16 autocast, accumulation 4, gradient checkpointing, EMA, caption
dropout, sampling. Shrunk or swapped: sizes and cadences, the tiny teacher, generated shards, no trackers, data
read in the main process (num_workers=0) from finite, unevenly split shards (3 shards on 2 ranks).

Three launches (tests/sharded_runs.py, which says why the unsharded reference is a 2-rank DDP launch) serve every
test: the FSDP run, an unsharded (DDP) run of its first step, and the FSDP run resumed from its step-2 checkpoint.
"""

import json

import pytest
import torch
from sharded_runs import LOSSES, STEPS, assert_equal, assert_resume_is_exact, metrics, three_runs, weights

from koala.train.checkpoint import verify_checkpoint

LAUNCH_TIMEOUT = 420  # hard: a rank left waiting in a collective fails the test instead of hanging it


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pipeline_dir):
    return three_runs(tmp_path_factory.mktemp("fsdp"), tiny_pipeline_dir, "fsdp-cpu-2proc.yaml", LAUNCH_TIMEOUT)


@pytest.mark.slow
def test_sharded_student_taps_the_same_features_as_the_unsharded_one(runs):
    sharded, unsharded = metrics(runs["engine"])[1], metrics(runs["ddp"])[1]
    assert {k for k in sharded if k.startswith("loss/")} == {k for k in unsharded if k.startswith("loss/")}
    for key in LOSSES:  # the first step: the same weights, inputs and noise on every rank
        assert sharded[key] == pytest.approx(unsharded[key], rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_checkpoint_is_sharded_and_holds_the_trained_weights(runs):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = runs["engine"] / "checkpoints" / f"step-{STEPS:08d}"
    verify_checkpoint(ckpt)  # the manifest covers every rank's shard files
    state = ckpt / "accelerate"
    assert not (state / "model.safetensors").exists()  # the unsharded (DDP) layout
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {p.name for p in (state / part).iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp"}, part
    assert {p.name for p in state.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    full = (ckpt / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    shards = [(state / "pytorch_model_fsdp_0" / f"__{r}_0.distcp").stat().st_size for r in (0, 1)]
    assert all(0.4 * full < s < 0.6 * full for s in shards), (shards, full)  # each rank wrote half the student
    # The sharded state, merged offline, is the whole student the checkpoint carries for export.
    dcp_to_torch_save(state / "pytorch_model_fsdp_0", ckpt.parent / "merged.pt")
    merged = torch.load(ckpt.parent / "merged.pt", weights_only=True)["model"]  # accelerate saves {"model": ...}
    assert_equal(merged, weights(runs["engine"], STEPS), "merged")


@pytest.mark.slow
def test_resume_latest_from_a_sharded_checkpoint_is_exact(runs):
    assert_resume_is_exact(runs)


@pytest.mark.slow
def test_sharded_ema_is_the_average_of_the_trained_weights(runs):
    """EMAModel's update (warm-up decay (1 + n) / (10 + n), 0 at the first step) redone on the whole weights."""
    ema = weights(runs["engine"], 1)  # decay 0: the first update copies the weights (to within an ulp of the start)
    for step in range(2, STEPS + 1):
        decay, trained = min(step / (9 + step), 0.9999), weights(runs["engine"], step)
        ema = {k: v - (1 - decay) * (v - trained[k]) for k, v in ema.items()}
    saved = weights(runs["engine"], STEPS, "unet_ema")
    assert saved.keys() == ema.keys()
    for k in ema:
        torch.testing.assert_close(saved[k], ema[k], rtol=1e-5, atol=1e-6, msg=k)
    last = weights(runs["engine"], STEPS)
    assert max((saved[k] - last[k]).abs().max().item() for k in last) > 1e-5  # the EMA is not the last weights


@pytest.mark.slow
def test_export_of_a_sharded_run_is_a_whole_student_stock_diffusers_loads(runs, tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from koala.export import main as export_main

    out = export_main([f"run_dir={runs['engine']}", f"out={tmp_path / 'export'}"])  # python -m koala.export
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    unsharded = weights(runs["ddp"], 1)  # an unsharded student's names and shapes
    assert {k: v.shape for k, v in unet.state_dict().items()} == {k: v.shape for k, v in unsharded.items()}
    assert_equal(unet.state_dict(), weights(runs["engine"], STEPS, "unet_ema"), "export")
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and image.std() > 0


@pytest.mark.slow
def test_uneven_finite_data_stops_every_sharded_rank_together(runs):
    run = runs["engine"]
    ranks = [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["keys"]) == len(ranks[1]["keys"]) == STEPS * 4 * 2  # rank 0 had twice as many samples
    assert not set(ranks[0]["keys"]) & set(ranks[1]["keys"])
    assert "a rank ran out of data; every rank stops here" in runs["log"]
    done = sorted(p.name for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert done == [f"step-{s:08d}" for s in range(1, STEPS + 1)]
    assert (run / "samples" / f"student-{STEPS:08d}.png").is_file()  # sampling gathers the sharded student


@pytest.mark.parametrize(
    "env,message",
    [({"FSDP_VERSION": "1"}, "fsdp_version: 2"),
     ({"FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}, "fsdp_cpu_ram_efficient_loading must be false")],
)  # fmt: skip
def test_fsdp_settings_koala_cannot_train_with_are_refused(env, message, monkeypatch):
    from koala.train.sharding import accelerator_kwargs

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        accelerator_kwargs()
