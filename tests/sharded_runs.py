"""The three 2-rank launches the sharded-engine tests (test_fsdp, test_deepspeed) read: the koala-700m recipe at the
tiny teacher's size under the engine's accelerate config, an unsharded (DDP) run of its first step, and the engine's
run resumed from its step-2 checkpoint.

The recipe's own settings run: bf16 teacher, bf16 autocast, accumulation 4, gradient checkpointing, EMA, caption
dropout, sampling. Shrunk or swapped: sizes and cadences, the tiny teacher, generated shards, no trackers, data read
in the main process (num_workers=0) from finite, unevenly split shards (3 shards on 2 ranks). The unsharded reference
is the same 2-rank launch under DDP, not one process: each rank draws its own noise (seed + rank) and each sample's
augmentation is seeded by its global data worker, so only a 2-rank run sees the same inputs on every rank.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import torch
from conftest import two_process_launch
from safetensors.torch import load_file

from koala.fixtures.shards import write_demo_shards

REPO = Path(__file__).resolve().parent.parent
STEPS = 4  # rank 1's one shard: 32 samples = 16 batches of 2 = 4 steps of 4 accumulated batches
LOSSES = ("loss/total", "loss/task", "loss/out", "loss/feat", "loss/feat/sa", "loss/feat/encoder", "loss/feat/decoder")
LATER = {"step-00000003", "step-00000004", "ranks", "samples"}  # what a run holds only after its step-2 checkpoint


def recipe(run: Path, assets: dict, **extra) -> list[str]:
    """koala-700m as shipped, on the tiny teacher and the uneven finite shards, plus `extra` overrides."""
    overrides = {
        "teacher.pipeline": assets["pipeline"], "teacher.arch": "tiny",
        "data.path": f"'{assets['shards']}'", "data.resolution": 32, "data.min_size": 0,
        "data.num_workers": 0, "data.resampled": "false", "data.epochs": 1,
        "batch_size": 2, "max_steps": 100, "log_every": 1, "checkpoint_every": 1, "keep_checkpoints": 0,
        "sample_every": 2, "sample_steps": 2, "report_to": "[]", "record_ranks": "true", "output_dir": run,
    }  # fmt: skip
    overrides.update(extra)
    return ["experiment=koala-700m", "unet=tiny-700m", *(f"{k}={v}" for k, v in overrides.items())]


def launch(config: str, run: Path, assets: dict, timeout: int, **extra) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/<config>` of koala.train on 2 ranks; a hard timeout, so a
    rank left waiting in a collective fails the test instead of hanging it."""
    cmd = two_process_launch("koala.train", *recipe(run, assets, **extra), config=config)
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def three_runs(root: Path, pipeline: Path, config: str, timeout: int, **extra) -> dict[str, Path | str]:
    """{"engine", "ddp", "resumed": run folders, "log": the engine run's output} of the three launches, every one
    with the same `extra` overrides."""
    write_demo_shards(root / "shards", n=96, resolution=32, samples_per_shard=32)
    assets = {"pipeline": pipeline, "shards": f"{root}/shards/demo-{{00000..00002}}.tar"}
    engine = launch(config, root / "engine", assets, timeout, **extra)
    launch("cpu-2proc.yaml", root / "ddp", assets, timeout, **{**extra, "max_steps": 1, "sample_every": 0})
    shutil.copytree(root / "engine", root / "resumed", ignore=lambda folder, names: [n for n in names if n in LATER])
    launch(config, root / "resumed", assets, timeout, **extra, resume="latest")  # continued to the end of the data
    return {"engine": root / "engine", "ddp": root / "ddp", "resumed": root / "resumed",
            "log": engine.stdout + engine.stderr}  # fmt: skip


def metrics(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def weights(run: Path, step: int, sub: str = "unet") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / sub / "diffusion_pytorch_model.safetensors"))


def assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), (what, k)


def assert_resume_is_exact(runs: dict) -> None:
    """The resumed run's weights, EMA and losses after its checkpoint equal the uninterrupted run's, bit for bit."""
    for step in (3, STEPS):
        for sub in ("unet", "unet_ema"):
            assert_equal(weights(runs["resumed"], step, sub), weights(runs["engine"], step, sub), f"{sub}@{step}")
    straight, resumed = metrics(runs["engine"]), metrics(runs["resumed"])
    assert sorted(resumed) == sorted(straight) == list(range(1, STEPS + 1))
    for step in (3, STEPS):
        assert {k: resumed[step][k] for k in LOSSES} == {k: straight[step][k] for k in LOSSES}, step
