"""`python -m koala.bench fullsize [unet=koala-700m|koala-1b] [bench.arch=sdxl|tiny] [bench.lean=true] [k=v ...]`.

One full-size distillation step through the trainer's own commands, on the CPU: a random SDXL-Base-1.0-shaped
pipeline in bf16 (`python -m koala.fixtures pipeline=... size=sdxl`, written once under `bench.root` and reused), a few generated shards at
`resolution`, then `python -m koala.cache` (when the recipe trains from cached conditioning), `python -m koala.train`
with a shipped experiment shrunk to one optimizer step and one checkpoint, and `python -m koala.export`, each a
subprocess. It prints wall time and peak RSS of every phase (the kernel's high-water mark of that process, from
`os.wait4`), the on-disk sizes, the step's loss, and every setting that differs from the shipped experiment.

`bench.lean=true` (default) runs the 24 GB recipe's memory settings: `experiment=<unet>-24gb` where one is shipped, else
`experiment=<unet>` with its settings (`data=cached optim=adamw8bit ema=false`); `bench.lean=false` runs the
plain experiment. Any other train override is passed to `koala.train` last (e.g. `ema=true`). `bench.arch=tiny` runs the same
command on the tiny SDXL-shaped teacher (students tiny-700m / tiny-1b) in seconds: the CI test of this command.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from koala.config.compose import CONFIG_DIR, compose_config, run_command
from koala.config.schema import TrainConfig
from koala.errors import ConfigError
from koala.train.runs import config_changes

GiB = 2**30
TINY_SPEC = {"koala-700m": "tiny-700m", "koala-1b": "tiny-1b"}  # the same students at the tiny teacher's size
LEAN = ["data=cached", "optim=adamw8bit", "ema=false"]  # what the 24 GB recipe changes for memory
SHRINK = ["max_steps=1", "batch_size=1", "grad_accum=1", "checkpoint_every=1", "log_every=1", "sample_every=0",
          "data.num_workers=0", "report_to=[]"]  # fmt: skip


@dataclass
class BenchFullsize:
    """Settings of `python -m koala.bench fullsize`."""

    arch: str = "sdxl"  # sdxl: SDXL-Base-1.0's shapes; tiny: the tiny SDXL-shaped teacher (seconds, for CI)
    resolution: int = 256
    lean: bool = True  # the 24 GB recipe's memory settings (cached conditioning, 8-bit AdamW, EMA off)
    experiment: Optional[str] = None  # default: <unet>-24gb when lean and shipped, else <unet>
    root: str = ".cache/koala/fullsize"  # pipeline (written once), shards, cache and run folders
    pipeline: Optional[str] = None  # default <root>/pipeline-<arch>; written when missing
    samples: int = 4  # generated images (and cache entries)
    out: Optional[str] = None  # report folder; default outputs/bench/fullsize-<arch>-<unet>
    unet: str = "koala-700m"  # the student: set from `unet=` (koala-700m | koala-1b; at arch=tiny their tiny analogues)
    train_overrides: list[str] = field(default_factory=list)  # set from the command line's other train overrides


@dataclass
class BenchFullsizeJob(TrainConfig):
    """The schema of configs/bench_fullsize.yaml: the train groups, plus `bench`."""

    bench: BenchFullsize = field(default_factory=BenchFullsize)


@dataclass
class Phase:
    """One subprocess: what ran, how long, its peak resident memory and its exit status."""

    name: str
    command: list[str]
    wall_s: float = 0.0
    peak_rss: int = 0  # bytes
    peak_at_s: float = 0.0  # when the sampled RSS was highest
    peak_anon: int = 0  # highest sampled RSS less mapped files: memory that cannot be dropped and reread
    started: float = 0.0  # unix time (to line the RSS samples up with the log's timestamps)
    rss_samples: list[tuple[float, int, int]] = field(default_factory=list)  # (s, RSS, file-backed): each second's max
    returncode: int = 0
    skipped: bool = False
    log: str = ""


def _rss(pid: int) -> tuple[int, int]:
    """Resident set size of a live process and its file-backed part (mapped files, e.g. safetensors), in bytes."""
    sizes = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "RssFile:")):
                sizes[line.split(":")[0]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return sizes.get("VmRSS", 0), sizes.get("RssFile", 0)


def run_phase(name: str, command: list[str], log_dir: Path, skip: bool = False) -> Phase:
    """Run one command as a child process, output to `<log_dir>/<name>.log`; its wall time and peak RSS."""
    phase = Phase(name, command, skipped=skip, log=str(log_dir / f"{name}.log"))
    if skip:
        return phase
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start, phase.started = time.perf_counter(), time.time()
    with open(phase.log, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        done, per_second = threading.Event(), phase.rss_samples

        def sample() -> None:  # when the peak happens; its exact height comes from the kernel below
            while not done.wait(0.25):
                t, (rss, mapped) = time.perf_counter() - start, _rss(proc.pid)
                if per_second and int(per_second[-1][0]) == int(t):
                    per_second[-1] = max(per_second[-1], (round(t, 2), rss, mapped), key=lambda x: x[1])
                else:
                    per_second.append((round(t, 2), rss, mapped))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        sampler.join()
    proc.returncode = phase.returncode = os.waitstatus_to_exitcode(status)
    phase.wall_s = time.perf_counter() - start
    if per_second:
        phase.peak_at_s = max(per_second, key=lambda x: x[1])[0]
        phase.peak_anon = max(rss - mapped for _, rss, mapped in per_second)
    phase.peak_rss = usage.ru_maxrss * 1024  # KiB on Linux
    return phase


def settings(cfg: BenchFullsizeJob, argv: list[str]) -> BenchFullsize:
    """The bench settings of a composed `bench_fullsize` config; the student and the train overrides from `argv`."""
    bench = OmegaConf.to_object(cfg.bench)
    bench.unet = str(cfg.unet.name)
    if bench.unet not in TINY_SPEC:
        raise ConfigError(f"unet={bench.unet}: expected one of {', '.join(TINY_SPEC)}")
    if bench.arch not in ("sdxl", "tiny"):
        raise ConfigError(f"bench.arch={bench.arch}: expected one of sdxl, tiny")
    bench.train_overrides = [a for a in argv if not a.startswith(("bench.", "unet="))]
    return bench


def experiment_of(bench: BenchFullsize) -> str:
    """The shipped experiment the run starts from."""
    if bench.experiment:
        return bench.experiment
    lean = f"{bench.unet}-24gb"
    return lean if bench.lean and (CONFIG_DIR / "experiment" / f"{lean}.yaml").is_file() else bench.unet


def train_overrides(bench: BenchFullsize, paths: dict[str, Path], data_path: Path | str) -> list[str]:
    """The koala.train command line: the experiment, the lean settings, the random teacher, the shrunk sizes."""
    tiny = [f"unet={TINY_SPEC[bench.unet]}", "teacher.arch=tiny"] if bench.arch == "tiny" else []
    return [
        f"experiment={experiment_of(bench)}", *tiny, *(LEAN if bench.lean else []),
        f"teacher.pipeline={paths['pipeline']}", f"data.path='{data_path}'", f"data.resolution={bench.resolution}",
        *SHRINK, f"output_dir={paths['run']}", *bench.train_overrides,
    ]  # fmt: skip


def folder_bytes(path: Path) -> int:
    """Bytes of all files under `path` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run(bench: BenchFullsize) -> dict[str, Any]:
    """Write (or reuse) the pipeline and shards, then cache, train one step and export; the measured record."""
    import shutil

    from koala.fixtures.shards import ensure_demo_shards

    root = Path(bench.root)
    tag = f"{bench.arch}-{bench.unet}"
    paths = {
        "pipeline": Path(bench.pipeline or root / f"pipeline-{bench.arch}"),
        "run": root / "runs" / tag,
        "cache": root / f"cache-{tag}-{bench.resolution}",
        "out": Path(bench.out or f"outputs/bench/fullsize-{tag}"),
    }
    shards = root / f"shards-{bench.resolution}" / "demo-00000.tar"
    for p in (paths["run"], paths["cache"]):  # this command's own folders: each run starts from nothing
        shutil.rmtree(p, ignore_errors=True)
    paths["out"].mkdir(parents=True, exist_ok=True)
    probe = compose_config(
        "train", train_overrides(bench, paths, shards), schema=TrainConfig
    )  # the settings, before anything runs
    cached = probe.data.kind == "cached"
    args = train_overrides(bench, paths, paths["cache"] if cached else shards)
    cfg, shipped = (
        compose_config("train", args, schema=TrainConfig),
        compose_config("train", [f"experiment={experiment_of(bench)}"], schema=TrainConfig),
    )
    py = sys.executable
    ensure_demo_shards(str(shards), bench.samples, bench.resolution)
    plan = [
        (
            "pipeline",
            [
                py,
                "-m",
                "koala.fixtures",
                f"pipeline={paths['pipeline']}",
                f"size={bench.arch}",
                f"dtype={cfg.teacher.dtype}",
            ],
            (paths["pipeline"] / "model_index.json").is_file(),
        )
    ]
    if cached:
        plan.append(("cache", [
            py, "-m", "koala.cache", f"teacher={cfg.teacher.name}", f"teacher.pipeline={paths['pipeline']}",
            f"teacher.arch={cfg.teacher.arch}", "data=webdataset", f"data.path='{shards}'",
            f"data.resolution={bench.resolution}", "data.num_workers=0", f"cache.out={paths['cache']}",
            "cache.batch_size=1",
        ], False))  # fmt: skip
    plan.append(("train", [py, "-m", "koala.train", *args], False))
    plan.append(("export", [py, "-m", "koala.export", f"run_dir={paths['run']}", f"ema={cfg.ema}"], False))
    phases: list[Phase] = []
    for name, command, skip in plan:
        phases.append(run_phase(name, command, paths["out"], skip))
        if phases[-1].returncode != 0:
            break  # what follows needs this phase's output
    return record(bench, cfg, shipped, phases, paths)


def record(bench, cfg: TrainConfig, shipped, phases: list[Phase], paths: dict[str, Path]) -> dict[str, Any]:
    """What was run and measured, as plain data (the JSON report)."""
    from koala.ship.export import read_metrics

    metrics = read_metrics(paths["run"])
    changed = config_changes(OmegaConf.to_container(shipped, resolve=True), OmegaConf.to_container(cfg, resolve=True))
    ckpt = paths["run"] / "checkpoints" / "step-00000001"
    return {
        "bench": OmegaConf.to_container(OmegaConf.structured(bench)),
        "experiment": experiment_of(bench),
        "changed": {k: [a, b] for k, (a, b) in changed.items()},
        "settings": {k: OmegaConf.select(cfg, k) for k in (
            "teacher.dtype", "mixed_precision", "gradient_checkpointing", "ema", "optim.use_8bit", "data.kind",
            "data.resolution", "batch_size", "distill.name", "unet.name")},
        "phases": [p.__dict__ for p in phases],
        "loss": metrics[-1].get("loss/total") if metrics else None,
        # the loop's own clock (koala.train.tracking.MetricsLog): from the first batch request to the step's end
        "step_s": cfg.batch_size / metrics[-1]["images_per_s"] if metrics else None,
        "disk": {"pipeline": folder_bytes(paths["pipeline"]), "checkpoint": folder_bytes(ckpt),
                 "export": folder_bytes(paths["run"] / "export")},
        "paths": {k: str(v) for k, v in paths.items()},
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "mem_available_at_start": _mem_available(),
    }  # fmt: skip


def _mem_available() -> int | None:
    """MemAvailable of the machine in bytes (None off Linux)."""
    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def to_markdown(rec: dict[str, Any]) -> str:
    """The phase table, the step's loss, the settings and what differs from the shipped experiment."""
    b, disk = rec["bench"], rec["disk"]
    sizes = {"pipeline": disk["pipeline"], "train": disk["checkpoint"], "export": disk["export"]}
    lines = [f"Full-size step on CPU: `{b['arch']}` teacher -> `{rec['settings']['unet.name']}` at "
             f"{b['resolution']} px, experiment `{rec['experiment']}` (OMP_NUM_THREADS={rec['threads']})", "",
             "| phase | wall s | peak RSS GiB | peak anonymous GiB | RSS peak at s | written GB |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for p in rec["phases"]:
        if p["skipped"]:
            lines.append(f"| {p['name']} | reused | - | - | - | {sizes.get(p['name'], 0) / 1e9:.2f} |")
            continue
        status = "" if p["returncode"] == 0 else f" (exit {p['returncode']})"
        lines.append(
            f"| {p['name']}{status} | {p['wall_s']:.1f} | {p['peak_rss'] / GiB:.2f} | "
            f"{p['peak_anon'] / GiB:.2f} | {p['peak_at_s']:.1f} | {sizes.get(p['name'], 0) / 1e9:.2f} |"
        )
    loss = rec["loss"]
    lines += ["", f"loss at step 1: {loss:.5g}, the step itself: {rec['step_s']:.1f} s" if loss is not None
              else "loss at step 1: none (the run wrote no metrics)",
              "settings: " + ", ".join(f"{k}={v}" for k, v in rec["settings"].items()),
              f"changed from experiment={rec['experiment']}:"]  # fmt: skip
    lines += [f"  {k}: {a!r} -> {v!r}" for k, (a, v) in rec["changed"].items()]
    lines += ["", "Peak RSS is the kernel's high-water mark of each process. It counts the pages of mapped files too (the "
              "teacher's safetensors weights are mapped, not copied), which the kernel may drop and reread under memory "
              "pressure, so it moves with what else runs; peak anonymous (RSS less mapped files, sampled 4x a second) "
              "does not."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str]) -> dict[str, Any]:
    """CLI: compose `configs/bench_fullsize.yaml` with `argv` and run the phases."""
    return run_command("bench_fullsize", lambda cfg: fullsize(settings(cfg, argv)), argv, schema=BenchFullsizeJob)


def fullsize(bench: BenchFullsize) -> dict[str, Any]:
    """Run the phases, print the table, write fullsize.md and fullsize.json; exit 1 when a phase failed."""
    rec = run(bench)
    md = to_markdown(rec)
    out = Path(rec["paths"]["out"])
    (out / "fullsize.json").write_text(json.dumps(rec, indent=1))
    (out / "fullsize.md").write_text(md + "\n")
    print(md + f"\n\nwrote {out / 'fullsize.md'} and {out / 'fullsize.json'}; logs: {out}/<phase>.log")
    failed = [p for p in rec["phases"] if p["returncode"] != 0]
    if failed or rec["loss"] is None or not math.isfinite(rec["loss"]):
        tail = Path(failed[0]["log"]).read_text()[-3000:] if failed else ""
        raise SystemExit(f"fullsize: {failed[0]['name'] if failed else 'train'} failed\n{tail}")
    return rec
