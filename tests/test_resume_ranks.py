"""Resume on another number of ranks (CPU gloo ranks): a 2-rank checkpoint on 1 process and a 1-process checkpoint on
2 ranks, under DDP and FSDP2, with the `koala-700m` recipe at tiny size on finite data.

What is checked: the student and the (re-)sharded optimizer state arrive exactly (a checkpoint loaded and saved again
with no step between holds the same tensors); the LR schedule continues at the same step; and every sample of the
epoch is seen exactly once over the two sessions (koala.data.position continues each data stream where it stopped).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from conftest import free_port
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from koala.config.compose import compose_config
from koala.config.schema import TrainConfig
from koala.data.position import DataPosition
from koala.fixtures.shards import write_demo_shards
from koala.train.loop import train

REPO = Path(__file__).resolve().parent.parent
STEPS = 2  # the first session's length; the second runs to the end of the data
SAMPLES = 32  # 2 shards of 16; batches of 2


def recipe(run: Path, assets: dict, **extra) -> list[str]:
    """koala-700m as shipped (bf16 teacher and autocast, EMA, warm-up), tiny, on finite data; every rank records
    the sample keys it saw."""
    overrides = {
        "teacher.pipeline": assets["pipeline"], "teacher.arch": "tiny", "data.path": f"'{assets['shards']}'",
        "data.resolution": 32, "data.min_size": 0, "data.num_workers": 0, "data.resampled": "false",
        "data.epochs": 1, "batch_size": 2, "grad_accum": 1, "gradient_checkpointing": "false", "max_steps": STEPS,
        "log_every": 1, "checkpoint_every": 100, "keep_checkpoints": 0, "sample_every": 0, "report_to": "[]",
        "record_ranks": "true", "optim.warmup_steps": 8, "output_dir": run,
    }  # fmt: skip
    overrides.update(extra)
    return ["experiment=koala-700m", "unet=tiny-700m", *(f"{k}={v}" for k, v in overrides.items())]


def launch(config: str | None, run: Path, assets: dict, **extra) -> None:
    """The run on 2 ranks (`accelerate launch --config_file configs/accelerate/<config>`), or in this process."""
    if config is None:
        train(compose_config("train", recipe(run, assets, **extra), schema=TrainConfig))
        return
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs/accelerate" / config),
           "--main_process_port", str(free_port()), "-m", "koala.train", *recipe(run, assets, **extra)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def continued(first: Path, second: Path) -> Path:
    """A copy of a finished first session's run folder to resume from (its sample records kept aside)."""
    shutil.copytree(first, second, ignore=lambda folder, names: [n for n in names if n == "ranks"])
    return second


LAUNCHES = {"ddp": "cpu-2proc.yaml", "fsdp": "fsdp-cpu-2proc.yaml"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_pipeline_dir):
    root = tmp_path_factory.mktemp("resume-ranks")
    write_demo_shards(root / "shards", n=SAMPLES, resolution=32, samples_per_shard=16)
    assets = {"pipeline": tiny_pipeline_dir, "shards": f"{root}/shards/demo-{{00000..00001}}.tar"}
    out = {"assets": assets}
    launch(None, root / "one", assets)  # 1 process
    for kind, config in LAUNCHES.items():
        launch(config, root / f"{kind}2", assets)  # 2 ranks
    for kind, config in LAUNCHES.items():
        out[f"{kind}2->1"] = continued(root / f"{kind}2", root / f"{kind}2-to-1")
        launch(None, out[f"{kind}2->1"], assets, max_steps=100, resume="latest")
        out[f"1->{kind}2"] = continued(root / "one", root / f"one-to-{kind}2")
        launch(config, out[f"1->{kind}2"], assets, max_steps=100, resume="latest")
    out.update({name: root / name for name in ("one", "ddp2", "fsdp2")})
    return out


def keys(run: Path) -> list[str]:
    return [k for record in sorted((run / "ranks").glob("rank*.json")) for k in json.loads(record.read_text())["keys"]]


def metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


# A change of ranks -> (the first session's run, its ranks, the second session's ranks)
CHANGES = {"ddp2->1": ("ddp2", 2, 1), "1->ddp2": ("one", 1, 2), "fsdp2->1": ("fsdp2", 2, 1), "1->fsdp2": ("one", 1, 2)}


@pytest.mark.slow
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_sample_is_seen_once_and_the_schedule_continues(runs, change):
    first, ranks_before, ranks_after = CHANGES[change]
    before, after = keys(runs[first]), keys(runs[change])
    assert len(before) == 2 * STEPS * ranks_before  # batches of 2
    assert len(before) + len(after) == len(set(before) | set(after)) == SAMPLES  # each sample once, none left out
    steps = metrics(runs[change])
    assert sorted(steps) == list(range(1, STEPS + len(after) // (2 * ranks_after) + 1))
    for step, row in steps.items():  # linear warm-up over 8 steps: the LR of the step, whatever the ranks
        assert row["lr"] == pytest.approx(steps[1]["lr"] * min(step, 8), rel=1e-6), step
    state = json.loads((sorted((runs[change] / "checkpoints").glob("step-*"))[-1] / "state.json").read_text())
    position = DataPosition.from_json(state["data"])
    assert (position.streams, position.ranks, state["world_size"]) == (ranks_before, ranks_after, ranks_after)
    assert sum(position.consumed()) == SAMPLES // 2  # batches of every stream, all of them


def optimizer_by_name(state_dir: Path, names: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """A checkpoint's optimizer state keyed by parameter name, whole: from optimizer.bin or the merged DCP shards."""
    if (state_dir / "optimizer.bin").is_file():
        saved = torch.load(state_dir / "optimizer.bin", weights_only=True)
        return {names[i]: s for i, s in saved["state"].items()}
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    merged = state_dir.parent / f"{state_dir.name}-optimizer.pt"
    dcp_to_torch_save(state_dir / "optimizer_0", merged)
    return torch.load(merged, weights_only=True)["optimizer"]["state"]


def parameter_names(ckpt: Path) -> list[str]:
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(ckpt / "unet"))
    return [name for name, _ in unet.named_parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("source, config", [("fsdp2", None), ("one", "fsdp-cpu-2proc.yaml")])
def test_a_checkpoint_loaded_on_another_layout_saves_back_the_same_state(runs, source, config, tmp_path):
    """FSDP2 shards of 2 ranks read whole into 1 process, and 1 process's whole state sharded onto 2 FSDP2 ranks:
    loaded and saved again with no step between, student and optimizer state are the same tensors."""
    ckpt = runs[source] / "checkpoints" / f"step-{STEPS:08d}"
    out = tmp_path / "resaved"
    cmd = [str(REPO / "tests" / "resave_checkpoint.py"), str(runs[source]), str(ckpt), str(out)]
    if config is None:
        cmd = [sys.executable, *cmd]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs/accelerate" / config), "--main_process_port", str(free_port()), *cmd]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    again = out / "checkpoints" / f"step-{STEPS:08d}"
    assert (again / "accelerate" / "optimizer_0").is_dir() == (config is not None)  # the other layout's files
    for sub in ("unet", "unet_ema"):
        a = load_file(str(ckpt / sub / "diffusion_pytorch_model.safetensors"))
        b = load_file(str(again / sub / "diffusion_pytorch_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    names = parameter_names(ckpt)
    a, b = optimizer_by_name(ckpt / "accelerate", names), optimizer_by_name(again / "accelerate", names)
    assert a.keys() == b.keys() == set(names)
    for name in names:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[name][key].reshape(-1), b[name][key].reshape(-1)), (name, key)
    scheduler = torch.load(again / "accelerate" / "scheduler.bin", weights_only=True)
    assert scheduler["last_epoch"] == STEPS * (2 if config else 1)  # stepped once per rank per optimizer step


def test_deepspeed_state_on_another_launch_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    from koala.errors import ConfigError
    from koala.train.resume import check_launch

    ds, whole = tmp_path / "ds" / "accelerate", tmp_path / "whole" / "accelerate"
    (ds / "pytorch_model").mkdir(parents=True)  # accelerate's folder of a DeepSpeed engine checkpoint
    whole.mkdir(parents=True)
    for folder in (ds, whole):
        for rank in (0, 1):
            (folder / f"random_states_{rank}.pkl").write_bytes(b"")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    with pytest.raises(ConfigError, match=r"partitioned over 2 rank\(s\); resume it under DeepSpeed on 2 rank\(s\)"):
        check_launch(ds.parent)
    check_launch(whole.parent)  # a whole (DDP) state moves to 1 process
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_launch(ds.parent)  # the same engine on the same ranks: accelerate's own load
    with pytest.raises(ConfigError, match="was written without DeepSpeed; resume it under DDP, FSDP2 or one process"):
        check_launch(whole.parent)
