"""`python -m koala.bench ablation [bench.steps=300] [bench.seeds=3] [bench.presets=[koala,lf,out,task,sa+lf]]`

KOALA's feature-distillation ablation at toy scale: for every `distill` preset and training seed, distil the demo's
student from the shipped shapes teacher (`experiment=demo`, the same settings as `make demo`, equal steps) with
`koala.train`, export it, sample the fixed shapes-world prompts with the teacher's seeds and score the pictures
(`koala.shapes.score`): caption accuracy and agreement (PSNR, MAE) with the teacher's pictures. Prints and writes
`ablation.md` (mean +- standard deviation over seeds) and `ablation.png` (bar plot). Runs already recorded in
`runs.jsonl` under `bench.out` are reused, so an interrupted sweep continues where it stopped. Any other argument
is a train override (e.g. `batch_size=8`).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from koala.bench import train_overrides
from koala.config.compose import compose_config, run_command
from koala.config.schema import TrainConfig
from koala.fixtures import ensure_fixtures
from koala.shapes.judge import eval_prompts, judge, load_pipeline, sample
from koala.ship.export import export_run
from koala.ship.presets import get_preset
from koala.train.loop import train

METRICS = (("caption_accuracy", "caption accuracy (%)"), ("psnr", "PSNR vs teacher (dB)"), ("mae", "MAE vs teacher"))


@dataclass
class BenchAblation:
    """Settings of `python -m koala.bench ablation` (given as `bench.<key>=...`)."""

    presets: list[str] = field(default_factory=lambda: ["koala", "lf", "out", "task", "sa+lf"])
    seeds: int = 3  # training seeds 0 .. seeds-1 per preset
    steps: int = 300  # distillation steps of every run (the demo itself runs 500)
    prompts: int = 24  # evaluation prompts, one picture each (seeds 0 .. prompts-1)
    samples: Optional[int] = None  # shapes-world training pictures written when the shards are missing (null: 2048)
    out: str = "outputs/ablation"


@dataclass
class BenchAblationJob(TrainConfig):
    """The schema of configs/bench_ablation.yaml: the train groups (as `experiment=demo` sets them), plus `bench`."""

    bench: BenchAblation = field(default_factory=BenchAblation)


def run_one(overrides: list[str], prompts: list[str], teacher_pictures: list) -> dict:
    """Distil, export and score one (preset, seed) run; returns its figures and wall time."""
    t0 = time.perf_counter()
    cfg = compose_config("train", overrides, schema=TrainConfig)
    run_dir = train(cfg)
    export = export_run(run_dir, checkpoint="latest", ema=cfg.ema)
    pictures = sample(load_pipeline(export), prompts, get_preset(cfg.teacher.kind))
    return {**judge(pictures, prompts, teacher_pictures), "minutes": (time.perf_counter() - t0) / 60}


def summarise(runs: list[dict], presets: list[str]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """preset -> metric -> (mean, standard deviation over seeds, number of seeds)."""
    table = {}
    for p in presets:
        rows = [r for r in runs if r["preset"] == p]
        if rows:
            table[p] = {m: (statistics.mean(r[m] for r in rows),
                            statistics.stdev(r[m] for r in rows) if len(rows) > 1 else 0.0, len(rows))
                        for m, _ in METRICS}  # fmt: skip
    return table


def to_markdown(summary: dict, teacher: dict) -> str:
    """One row per preset: mean +- std of each metric, and the number of seeds."""
    lines = ["| distill | " + " | ".join(label for _, label in METRICS) + " | seeds |",
             "|---|" + "---|" * (len(METRICS) + 1),
             f"| teacher | {teacher['caption_accuracy']:.1f} | - | - | - |"]  # fmt: skip
    for preset, stats in summary.items():
        cells = [f"{m:.1f} ± {s:.1f}" if k != "psnr" else f"{m:.2f} ± {s:.2f}" for k, (m, s, _) in stats.items()]
        lines.append(f"| {preset} | " + " | ".join(cells) + f" | {next(iter(stats.values()))[2]} |")
    return "\n".join(lines)


def bar_plot(summary: dict, teacher: dict, out: Path) -> Path:
    """Caption accuracy and PSNR per preset, bars at the mean with the standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (metric, label) in zip(axes, METRICS[:2]):
        means = [summary[p][metric][0] for p in presets]
        stds = [summary[p][metric][1] for p in presets]
        ax.bar(presets, means, yerr=stds, capsize=4, color="tab:blue")
        if metric == "caption_accuracy":
            ax.axhline(teacher["caption_accuracy"], color="k", ls="--", lw=1, label="teacher")
            ax.legend(loc="lower right")
        ax.set(title=label, ylim=(0, 100) if metric == "caption_accuracy" else (0, None))  # bars start at 0
    n = next(iter(summary.values()))["psnr"][2]
    fig.suptitle(f"KOALA ablation on the shapes world: mean ± std over {n} seeds")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def bench_ablation(job: DictConfig, argv: list[str]) -> dict:
    """Run (or continue) the sweep a composed `bench_ablation` config (from the command line `argv`) describes."""
    bench: BenchAblation = OmegaConf.to_object(job.bench)
    out = Path(bench.out)
    out.mkdir(parents=True, exist_ok=True)
    base = ["experiment=demo", f"max_steps={bench.steps}", "report_to=[]", "sample_every=0", *train_overrides(argv)]
    cfg = compose_config("train", base, schema=TrainConfig)
    ensure_fixtures(cfg, samples=bench.samples)  # the shapes-world shards every run trains on
    prompts = eval_prompts(bench.prompts)
    teacher_pictures = sample(load_pipeline(cfg.teacher.pipeline), prompts, get_preset(cfg.teacher.kind))
    teacher = judge(teacher_pictures, prompts)
    record = out / "runs.jsonl"
    runs = [json.loads(line) for line in record.read_text().splitlines()] if record.is_file() else []
    for seed in range(bench.seeds):  # seed-major: a sweep stopped early still covers every preset
        for preset in bench.presets:
            if any(r["preset"] == preset and r["seed"] == seed and r["steps"] == bench.steps for r in runs):
                continue
            run = run_one([*base, f"distill={preset}", f"seed={seed}", f"output_dir={out}/{preset}-seed{seed}",
                           f"checkpoint_every={bench.steps}"], prompts, teacher_pictures)  # fmt: skip
            runs.append({"preset": preset, "seed": seed, "steps": bench.steps, **run})
            with record.open("a") as f:
                f.write(json.dumps(runs[-1]) + "\n")
            print(json.dumps(runs[-1]), flush=True)
    runs = [r for r in runs if r["steps"] == bench.steps and r["preset"] in bench.presets and r["seed"] < bench.seeds]
    summary = summarise(runs, bench.presets)
    md = to_markdown(summary, teacher)
    (out / "ablation.md").write_text(md + "\n")
    plot = bar_plot(summary, teacher, out / "ablation.png")
    minutes = sum(r["minutes"] for r in runs)
    print(f"{md}\n\n{len(runs)} runs of {bench.steps} steps, {minutes:.1f} min of training, export and sampling; "
          f"wrote {out / 'ablation.md'} and {plot}")  # fmt: skip
    return {"teacher": teacher, "summary": summary, "runs": runs}


def main(argv: list[str]) -> dict:
    """CLI: compose `configs/bench_ablation.yaml` with `argv` and run the sweep."""
    return run_command("bench_ablation", lambda cfg: bench_ablation(cfg, argv), argv, schema=BenchAblationJob)
