"""`python -m koala.bench ablation [bench.tables=[kind,stage,sa_point] | bench.table=<one>] [bench.protocols=[none,grad]] [bench.seeds=5]
[bench.steps=...] [bench.jobs=2] [bench.quick=true] [train overrides]`

KOALA's ablation tables at toy scale. A table is data, `configs/ablation/<name>.yaml`: a title, its variants (name ->
train overrides on top of `experiment=demo`) and the rows every variant is compared with. Each variant is distilled
under each protocol (`distill.balance=none`, the paper's weights, and `grad`, every feature kind at the output-KD
term's gradient norm) for training seeds 0 .. seeds-1, exported, and scored on the paired evaluation set
(`koala.shapes.paired`: every caption x `reps` sampling seeds, the same pictures for every run, seen and held-out
captions apart, plus held-out noisy latents). Runs are identified by their resolved train config: a run two tables
share (`koala` is in all three) or a protocol cannot change (no feature pairs: `out`, `task`) is trained once.
Each finished run leaves one record file (`records/<key>.json`, written atomically), so an interrupted sweep
continues where it stopped (a run cut off mid-training resumes from its checkpoint). `bench.jobs` runs that many
trainings in parallel, one thread each. Writes `ablation.md` (means, 95 % intervals, paired differences),
`ablation.png`, `loss_curve.png` (koala_report) under `bench.out`. Any other argument is a train override.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from koala.bench import train_overrides
from koala.bench.ablation_report import write_report
from koala.bench.sweep import BenchAblation, eval_set, load_records, load_table, plan_jobs, run_jobs, settings
from koala.config.compose import compose_config, run_command
from koala.config.schema import TrainConfig
from koala.fixtures import ensure_fixtures


@dataclass
class BenchAblationJob(TrainConfig):
    """The schema of configs/bench_ablation.yaml: the train groups (as `experiment=demo` sets them), plus `bench`."""

    bench: BenchAblation = field(default_factory=BenchAblation)


def bench_ablation(job: DictConfig, argv: list[str]) -> dict:
    """Run (or continue) the sweep a composed `bench_ablation` config (from the command line `argv`) describes."""
    bench = settings(OmegaConf.to_object(job.bench))
    out = Path(bench.out)
    tables = [load_table(t) for t in bench.tables]
    base = ["experiment=demo", f"max_steps={bench.steps}", *train_overrides(argv)]
    cfg = compose_config("train", base, schema=TrainConfig)
    ensure_fixtures(cfg, samples=bench.samples)  # the shapes-world shards every run trains on
    teacher_cache = out / "teacher" / f"reps{bench.reps}-steps{bench.sample_steps or 'preset'}"
    evaluation = eval_set(cfg.teacher.pipeline, bench.reps, bench.latent_reps, str(teacher_cache), bench.sample_steps)
    teacher = evaluation.teacher_records()
    t0 = time.perf_counter()
    jobs, cells = plan_jobs(bench, base, tables, teacher_cache)
    run_jobs(jobs, bench.jobs)
    records = load_records(cells, out)
    report = write_report(out, tables, bench, records, teacher, minutes=(time.perf_counter() - t0) / 60)
    print(report["markdown"])
    return {"jobs": jobs, "cells": cells, "records": records, "teacher": teacher, **report}


def main(argv: list[str]) -> dict:
    """CLI: compose `configs/bench_ablation.yaml` with `argv` and run the sweep."""
    return run_command("bench_ablation", lambda cfg: bench_ablation(cfg, argv), argv, schema=BenchAblationJob)
