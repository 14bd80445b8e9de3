"""scripts/launch_multinode.sh as 2 "nodes" x 1 process on localhost (gloo on CPU), and what a lost rank does to the
others under it and under the 2-process DDP launch: they fail with the backend's error instead of hanging."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from conftest import free_port, two_process_launch

from koala.fixtures.shards import write_demo_shards

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "launch_multinode.sh"
# How the survivors' launcher names the cause. ddp: torchrun's agent sees its rank 1 die, stops rank 0 and reports
# rank 1's SIGKILL; multinode: node 0 knows nothing of node 1's processes, and gloo reports the lost peer.
CAUSE = {
    ("ddp", "kill"): r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9",
    ("multinode", "kill"): r"Connection (reset|closed) by peer",
    ("multinode", "freeze"): r"Timed out waiting 20000ms",
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """Three shards of 16 samples: with 2 ranks, rank 0 reads two of them and rank 1 one (uneven)."""
    root = tmp_path_factory.mktemp("multinode")
    write_demo_shards(root / "shards", n=48, resolution=32, samples_per_shard=16)
    return f"{root}/shards/demo-{{00000..00002}}.tar"


def recipe(pipeline: Path, shards: str, out: Path, **extra) -> list[str]:
    """experiment=koala-700m as shipped (bf16 teacher and autocast, accumulation 4, gradient checkpointing, EMA,
    caption dropout, sampling), with the tiny teacher, the generated shards and small sizes."""
    base = {
        "experiment": "koala-700m", "unet": "tiny-700m", "teacher.pipeline": pipeline, "teacher.arch": "tiny",
        "data.path": f"'{shards}'",
        "data.resolution": 32, "data.min_size": 0, "data.num_workers": 1, "batch_size": 2, "log_every": 1,
        "sample_steps": 2, "report_to": "[tensorboard]", "output_dir": out,
    }  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def launch_env(**extra: str) -> dict[str, str]:
    """CPU ranks (gloo) even where a GPU is visible: two "nodes" on one machine cannot share one GPU under NCCL."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, **extra}


def start_nodes(args: list[str], logs: Path) -> list[subprocess.Popen]:
    """Both nodes' launchers, each in its own session as on separate machines; output in logs/node<N>.log."""
    port, procs = str(free_port()), []
    logs.mkdir(parents=True, exist_ok=True)
    for rank in (0, 1):
        env = launch_env(NUM_NODES="2", NODE_RANK=str(rank), GPUS_PER_NODE="1", MAIN_ADDR="127.0.0.1", MAIN_PORT=port)
        with open(logs / f"node{rank}.log", "w") as log:
            procs.append(subprocess.Popen([str(SCRIPT), *args], cwd=REPO, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    return procs


def start_ddp(args: list[str], logs: Path) -> list[subprocess.Popen]:
    """The one-node, 2-process launch of tests/test_train.py."""
    logs.mkdir(parents=True, exist_ok=True)
    cmd = two_process_launch("koala.train", *args)
    with open(logs / "node0.log", "w") as log:
        return [subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)]  # fmt: skip


def tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """A launcher and everything under it (torchrun starts each worker in a session of its own)."""
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        for p in tree(proc):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=60)


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Exit codes; a launcher still running after `timeout` seconds is a hang (they are all killed)."""
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"hang: a launcher still ran {timeout:.0f} s later")
    finally:
        kill_all(procs)


def read_ranks(run: Path) -> list[dict]:
    return [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_two_nodes_on_localhost_agree_on_weights_split_data_and_stop_together(tmp_path, tiny_pipeline_dir, shards):
    # Finite, uneven data: rank 1's one shard is 8 batches of 2 = 2 steps at accumulation 4; rank 0 has twice that.
    args = recipe(tiny_pipeline_dir, shards, tmp_path / "run", max_steps=100, checkpoint_every=100, sample_every=1,
                  record_ranks="true", **{"data.resampled": "false", "data.epochs": 1})  # fmt: skip
    codes = wait_all(start_nodes(args, tmp_path / "logs"), timeout=600)
    logs = {n: (tmp_path / "logs" / f"node{n}.log").read_text() for n in (0, 1)}
    assert codes == [0, 0], {n: text[-3000:] for n, text in logs.items()}
    ranks = read_ranks(tmp_path / "run")
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    keys = [r["keys"] for r in ranks]
    assert len(keys[0]) == len(keys[1]) == 16 and all(len(set(k)) == 16 for k in keys)
    assert not set(keys[0]) & set(keys[1])  # each sample on one rank only
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-00000002" / "COMPLETE").exists()
    assert not (run / "checkpoints" / "step-00000003").exists()
    assert (run / "samples" / "student-00000002.png").exists()  # sampling ran (rank 0) while rank 1 waited


def worker(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The training process of global rank `rank` under a launcher."""
    for p in psutil.Process(launcher.pid).children():
        if p.environ().get("RANK") == str(rank):
            return p
    raise AssertionError(f"no rank {rank} under the launcher")


def lose_a_rank(
    procs: list[subprocess.Popen], victim: Callable[[], list[psutil.Process]], run: Path, how: str
) -> float:
    """Once training is under way, kill (SIGKILL) or freeze (SIGSTOP) the victim's processes; seconds until every
    launcher left running exits non-zero (the test fails on a hang)."""
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 300
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
        assert all(p.poll() is None for p in procs), "a launcher ended before training got under way"
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.5)
    lost = victim()
    for p in lost:
        p.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    start = time.monotonic()
    frozen = {p.pid for p in lost} if how == "freeze" else set()
    codes = wait_all([p for p in procs if p.pid not in frozen], timeout=120)  # the frozen node is killed afterwards
    assert all(c != 0 for c in codes), codes
    return time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize("launch,how", [("ddp", "kill"), ("multinode", "kill"), ("multinode", "freeze")])
def test_a_lost_rank_makes_the_others_fail_instead_of_hanging(tmp_path, tiny_pipeline_dir, shards, launch, how):
    # kill: a crashed worker (ddp) or a lost node (multinode: its launcher, its worker and the worker's data loaders).
    # freeze: node 1 stops answering but no connection is reset; only dist_timeout_s ends the others' wait.
    timeout = {"dist_timeout_s": 20} if how == "freeze" else {}
    args = recipe(tiny_pipeline_dir, shards, tmp_path / "run", max_steps=100000, checkpoint_every=100000,
                  sample_every=0, **timeout)  # fmt: skip
    procs = (start_nodes if launch == "multinode" else start_ddp)(args, tmp_path / "logs")
    victim = (lambda: tree(procs[1])) if launch == "multinode" else (lambda: [worker(procs[0], rank=1)])
    try:
        elapsed = lose_a_rank(procs, victim, tmp_path / "run", how)
    finally:
        kill_all(procs)
    survivor = (tmp_path / "logs" / "node0.log").read_text()
    assert re.search(CAUSE[launch, how], survivor), survivor[-3000:]
    assert "ChildFailedError" in survivor  # torchrun's summary of the failed ranks
    assert elapsed < (60 if how == "kill" else 20 + 60), elapsed
