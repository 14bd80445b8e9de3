"""The ablation sweep of `python -m koala.bench ablation` (koala/bench/ablation.py): its settings, its tables (data:
`configs/ablation/<name>.yaml`), the unique runs they need (one per resolved train config: `run_identity`), and the
runs themselves, distilled, exported and scored on the paired evaluation set (`koala.shapes.paired`), each leaving
one record file written atomically, `bench.jobs` at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from koala.config.compose import CONFIG_DIR, compose_config
from koala.config.schema import TrainConfig
from koala.distill.balance import Balance
from koala.errors import ConfigError
from koala.shapes.paired import EvalSet
from koala.ship.export import export_run
from koala.train.checkpoint import find_checkpoint, step_of
from koala.train.loop import train
from koala.train.runs import flatten

TABLES_DIR = CONFIG_DIR / "ablation"
# settings that change how a run is written or watched, not what it learns: left out of the run's identity
NOT_IDENTITY = ("output_dir", "resume", "report_to", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every",
                "sample_prompts", "sample_seed", "dist_timeout_s", "record_ranks", "compile")  # fmt: skip
QUICK = {"tables": ["quick"], "seeds": 2, "steps": 30, "reps": 1, "latent_reps": 1}  # bench.quick=true


@dataclass
class BenchAblation:
    """Settings of `python -m koala.bench ablation` (given as `bench.<key>=...`)."""

    # configs/ablation/<name>.yaml, or the path of a table file of that form
    tables: list[str] = field(default_factory=lambda: ["kind", "stage", "sa_point"])
    table: Optional[str] = None  # one table alone: bench.table=search is bench.tables=[search]
    protocols: list[Balance] = field(default_factory=lambda: [Balance.none, Balance.grad])  # distill.balance of each
    seeds: int = 5  # training seeds 0 .. seeds-1 of every variant
    steps: int = 500  # distillation steps of every run (cosine schedule to 0: the loss flattens by the end)
    reps: int = 4  # sampling seeds per caption: 90 x reps pictures per run
    latent_reps: int = 4  # held-out noisy latents per caption: 90 x latent_reps per run
    sample_steps: Optional[int] = None  # sampling steps of every picture (null: the teacher's preset, 25)
    jobs: int = 2  # runs trained in parallel, one thread each (2 on a 2-core machine)
    quick: bool = False  # minutes, not hours: the `quick` table, 2 seeds, 30 steps, one picture per caption
    samples: Optional[int] = None  # training pictures written when the shards are missing (null: the preset's)
    keep_checkpoints: bool = False  # keep each run's checkpoints after it is exported and scored
    out: str = "outputs/ablation"


@dataclass
class Table:
    """One ablation table (configs/ablation/<name>.yaml): variant name -> train overrides."""

    name: str = ""
    title: str = ""
    variants: dict[str, list[str]] = field(default_factory=dict)
    compare_to: list[str] = field(default_factory=list)  # every variant's paired difference with these rows
    protocols: Optional[list[Balance]] = None  # null: bench.protocols


def load_table(name: str) -> Table:
    """A table by name (or a table file's path), checked against the `Table` schema; an unknown name lists the
    tables there are."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else TABLES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in TABLES_DIR.glob("*.yaml")))
        raise ConfigError(f"bench.tables: no table {name!r} in {TABLES_DIR} (tables: {known})")
    table: Table = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Table), OmegaConf.load(path)))
    table.name = path.stem
    bad = [c for c in table.compare_to if c not in table.variants]
    if bad:
        raise ConfigError(f"{path}: compare_to names {bad}, which are not among its variants {list(table.variants)}")
    return table


@dataclass(frozen=True)
class Job:
    """One run to distil, export and score: its identity, its train overrides and where it writes."""

    key: str
    label: str
    seed: int
    overrides: tuple[str, ...]
    run_dir: str
    record: str
    reps: int
    latent_reps: int
    sample_steps: int | None
    teacher_cache: str
    keep_checkpoints: bool


def run_identity(cfg: DictConfig, bench: BenchAblation) -> str:
    """A short hash of what decides a run's records: its train settings and the evaluation's.

    Only settings that differ from the schema's defaults count (a setting added to koala later, whose default keeps
    the old behaviour, leaves every recorded run valid), and paths inside the working folder count relative to it
    (another checkout of the repository finds the same runs)."""
    here = str(Path.cwd().resolve()) + os.sep
    default = flatten(OmegaConf.to_container(OmegaConf.structured(TrainConfig), resolve=False))
    settings = {}
    for key, value in flatten(OmegaConf.to_container(cfg, resolve=True)).items():
        if key in NOT_IDENTITY or key == "data.num_workers" or (key in default and default[key] == value):
            continue
        settings[key] = value.removeprefix(here) if isinstance(value, str) else value
    evaluation = {"reps": bench.reps, "latent_reps": bench.latent_reps, "sample_steps": bench.sample_steps}
    text = json.dumps({"train": settings, **evaluation}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def variant_overrides(base: list[str], variant: list[str], protocol: str, seed: int) -> list[str]:
    """The train overrides of one (variant, protocol, seed); `balance` only where there are feature pairs to
    balance (a protocol cannot change `out` or `task`, so their runs are shared)."""
    overrides = [*base, *variant, f"seed={seed}"]
    cfg = compose_config("train", overrides, schema=TrainConfig)
    if cfg.distill.kinds and cfg.distill.feat_weight > 0:
        overrides.append(f"distill.balance={protocol}")
    return overrides


def plan_jobs(bench: BenchAblation, base: list[str], tables: list[Table], teacher_cache: Path) -> tuple[list, dict]:
    """Every unique run (seed-major, so a partial sweep covers every variant) and, per (table, protocol, variant),
    the keys of its runs in seed order."""
    out, jobs, cells = Path(bench.out), {}, {}
    for seed in range(bench.seeds):
        for table in tables:
            for protocol in table.protocols or bench.protocols:
                for name, variant in table.variants.items():
                    overrides = variant_overrides(base, list(variant), protocol, seed)
                    key = run_identity(compose_config("train", overrides, schema=TrainConfig), bench)
                    cells.setdefault((table.name, protocol, name), []).append(key)
                    if key not in jobs:
                        label = f"{name}-{protocol}-seed{seed}".replace("+", "_")
                        jobs[key] = Job(key, label, seed, tuple(overrides), str(out / "runs" / f"{label}-{key}"),
                                        str(out / "records" / f"{key}.json"), bench.reps, bench.latent_reps,
                                        bench.sample_steps, str(teacher_cache), bench.keep_checkpoints)  # fmt: skip
    return list(jobs.values()), cells


_EVAL_SETS: dict = {}  # one evaluation set per worker process


def eval_set(teacher_dir: str, reps: int, latent_reps: int, cache: str, steps: int | None):
    """The paired evaluation set, built once per process (the teacher's pictures from the cache)."""
    key = (teacher_dir, reps, latent_reps, cache, steps)
    if key not in _EVAL_SETS:
        _EVAL_SETS[key] = EvalSet(teacher_dir, reps, latent_reps, cache, steps)
    return _EVAL_SETS[key]


def run_job(job: Job) -> dict:
    """Distil (or continue), export and score one run; write its record atomically and return its summary."""
    torch.set_num_threads(1)  # the runs in parallel share the cores, one thread each
    t0, cpu0 = time.perf_counter(), time.process_time()
    run_dir = Path(job.run_dir)
    cfg = compose_config("train", [*job.overrides, f"output_dir={run_dir}", "resume=auto", "report_to=[]",
                                   "sample_every=0"], schema=TrainConfig)  # fmt: skip
    cfg.checkpoint_every = max(1, cfg.max_steps // 4)  # a run cut off loses at most a quarter of its steps
    export = run_dir / "export"
    if not (export / "model_index.json").is_file():  # an export is renamed into place complete
        train(cfg)
        last = step_of(find_checkpoint(run_dir, "latest").name)
        if last != cfg.max_steps:  # stopped by a signal: its checkpoint continues it next time, nothing is recorded
            raise RuntimeError(f"{job.label} stopped at step {last} of {cfg.max_steps}; rerun the sweep to continue it")
        export_run(run_dir, checkpoint="latest", ema=cfg.ema, single_file=False)
    evaluation = eval_set(cfg.teacher.pipeline, job.reps, job.latent_reps, job.teacher_cache, job.sample_steps)
    records = evaluation.score_pipeline(export)
    result = {"key": job.key, "label": job.label, "seed": job.seed, "overrides": list(job.overrides),
              "run_dir": str(run_dir),
              "minutes": (time.perf_counter() - t0) / 60, "cpu_minutes": (time.process_time() - cpu0) / 60,
              "records": records}  # fmt: skip
    write_atomic(Path(job.record), json.dumps(result))
    if not job.keep_checkpoints:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {k: v for k, v in result.items() if k != "records"}


def write_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, flush, rename into place: a record exists complete or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def run_jobs(jobs: list[Job], parallel: int) -> None:
    """Run the jobs whose records are missing, `parallel` at a time (in this process when 1)."""
    todo = [j for j in jobs if not Path(j.record).is_file()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs recorded; {len(todo)} to run, {parallel} at a time", flush=True)
    if parallel <= 1:
        for job in todo:
            print(json.dumps(run_job(job)), flush=True)
        return
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})  # the spawned workers inherit it
    failed = []
    with ProcessPoolExecutor(max_workers=parallel, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_job, job): job for job in todo}
        for future in as_completed(futures):
            try:
                print(json.dumps(future.result()), flush=True)
            except Exception as e:  # one broken run does not stop the others; the sweep reports it at the end
                failed.append(f"{futures[future].label}: {type(e).__name__}: {e}")
                print(f"run {futures[future].label} failed: {e}", flush=True)
    if failed:
        raise RuntimeError(
            f"{len(failed)} runs failed (the others are recorded; rerun to retry):\n" + "\n".join(failed)
        )


def load_records(cells: dict, out: Path) -> dict:
    """(table, protocol, variant) -> the records of its runs in seed order, for the cells whose runs all finished."""
    cache: dict[str, dict] = {}
    found = {}
    for cell, keys in cells.items():
        paths = [out / "records" / f"{k}.json" for k in keys]
        if all(p.is_file() for p in paths):
            found[cell] = [cache.setdefault(k, json.loads(p.read_text())) for k, p in zip(keys, paths)]
    return found


def settings(bench: BenchAblation) -> BenchAblation:
    """The bench settings with `quick=true` applied to every setting left at its default."""
    if bench.table is not None:
        bench.tables = [bench.table]
    if not bench.quick:
        return bench
    default = BenchAblation()
    for key, value in QUICK.items():
        if getattr(bench, key) == getattr(default, key):
            setattr(bench, key, value)
    return bench
