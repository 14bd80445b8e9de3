"""`python -m koala.bench memory [bench.unets=[koala-700m]] [bench.resolutions=[512,768,1024]] [bench.budget_gib=24]`.

A GPU memory budget.

Builds the training-memory budget of SDXL -> a student (default KOALA-700M and KOALA-1B) from measured parts:
parameter counts of meta-device models (koala/bench/budget.py), and the bytes a training step saves for backward,
counted exactly by running `DistillationTask` on the meta device under emulated bf16 autocast with GPU-style SDPA
(koala/bench/saved_bytes.py). Prints and writes the budget tables (memory.md) and every number (memory.json).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from koala.bench.budget import (
    HEADER,
    GiB,
    budget_rows,
    conditioning_params,
    max_batch,
    summary_table,
    totals,
    unet_table,
)
from koala.config.compose import run_command
from koala.models.archs import SDXL_UNET_CONFIG
from koala.models.unets import build_unet, count_parameters


@dataclass
class BenchMemory:
    """Settings of `python -m koala.bench memory` (`bench.<key>=...`)."""

    unets: list[str] = field(default_factory=lambda: ["koala-700m", "koala-1b"])
    resolutions: list[int] = field(default_factory=lambda: [512, 768, 1024])
    distill: str = "koala"  # which taps and feature losses the step runs
    budget_gib: float = 24.0  # the card the 24 GB recipe is checked against
    out: str = "outputs/bench/memory"


@dataclass
class BenchMemoryJob:
    """The schema of configs/bench_memory.yaml."""

    bench: BenchMemory = field(default_factory=BenchMemory)


def bench_memory(cfg: BenchMemoryJob) -> list[dict]:
    """Build, print and write the budget a composed `bench_memory` config describes."""
    bench: BenchMemory = OmegaConf.to_object(cfg.bench)
    budget = bench.budget_gib * GiB
    cond = conditioning_params()
    p_teacher = count_parameters(build_unet(SDXL_UNET_CONFIG, device="meta"))
    results, tables = [], []
    for name in bench.unets:
        for res in bench.resolutions:
            rows = budget_rows(name, res, cond, p_teacher, bench.distill)
            a, b = totals(rows)
            act = next(r for r in rows if r.item.startswith("activations"))
            results.append(
                {
                    "unet": name,
                    "resolution": res,
                    "rows": [r.__dict__ for r in rows],
                    "activations_plain": act.plain,
                    "activations_ckpt": act.lean,
                    "total_plain": a,
                    "total_lean": b,
                    "fits_lean_batch1": b <= budget,
                    "max_batch_lean": max_batch(rows, budget),
                }
            )
            if res == max(bench.resolutions):
                tables.append(unet_table(name, res, rows, budget))
    md = "\n\n".join([HEADER.format(distill=bench.distill), *tables, summary_table(results)])
    print(md)
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"budget_gib": bench.budget_gib, "results": results}, indent=1))
    (out / "memory.md").write_text(md + "\n")
    print(f"\nwrote {out / 'memory.json'} and {out / 'memory.md'}")
    return results


def main(argv: list[str]) -> list[dict]:
    """CLI: compose `configs/bench_memory.yaml` with `argv` and build the budget."""
    return run_command("bench_memory", bench_memory, argv, schema=BenchMemoryJob)
