"""The demo (`make demo`, `python -m koala.demo`): distil the shipped shapes-world teacher and show what it gave.

`run_demo` samples and scores the teacher and the inherited student, distils with the composed config, exports the
student as a stock diffusers SDXL pipeline and scores it, on the same prompts and seeds (every caption x `reps`
sampling seeds; `koala.shapes.paired`):
  caption accuracy  share of pictures whose shape, colour and background `koala.shapes.score` finds right, over all
                    captions, the seen ones and the held-out ones (never in the training shards);
  PSNR / MAE        pixel agreement of each student picture with the teacher's picture of the same prompt and seed;
  eps rel. error    E[(eps_S - eps_T)^2] / Var(eps_T) on held-out noisy latents (0: predicts as the teacher does).
It writes the table (Markdown, mean and 95 % interval over pictures), the per-picture records, a teacher / before /
after picture grid and a loss-curve plot into the run directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from koala.bench.ablation_report import cell
from koala.fixtures import ensure_fixtures
from koala.models.plans import student_plan
from koala.models.teacher import load_teacher
from koala.shapes.judge import load_pipeline
from koala.shapes.paired import METRICS, EvalSet, summarise_metric
from koala.ship.export import export_run
from koala.ship.sampling import make_grid
from koala.train.build import make_student
from koala.train.loop import train

if TYPE_CHECKING:
    from koala.config.schema import TrainConfig

REPS = 1  # sampling seeds per caption: every one of the 90 captions once (72 seen in training, 18 held out)
GRID_COLUMNS = 12
GOAL = 0.9  # the student's caption accuracy as a share of the teacher's


def loss_plot(metrics: Path, out: Path) -> Path:
    """Every loss term against the step, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss/total", "loss/task", "loss/out", "loss/feat"):
        if key in rows[0]:
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key.split("/")[1])
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="KOALA distillation of the shapes teacher")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def picture_grid(rows: list[list[Image.Image]], out: Path, cols: int = GRID_COLUMNS, scale: int = 2) -> Path:
    """`cols` pictures of each row, evenly spaced over it (every shape: the captions go shape by shape), enlarged
    `scale` times, one row under the other."""
    picks = [i * len(rows[0]) // cols for i in range(cols)]
    pictures = [r[i].resize((r[i].width * scale, r[i].height * scale), Image.Resampling.NEAREST)
                for r in rows for i in picks]  # fmt: skip
    make_grid(pictures, cols=cols).save(out)
    return out


def results_table(results: dict[str, dict]) -> str:
    """The before/after table as Markdown: mean [95 % interval over pictures] of every figure."""
    cols = [("caption_accuracy", "all", 1), ("caption_accuracy", "seen", 1), ("caption_accuracy", "held_out", 1),
            ("psnr", "all", 2), ("mae", "all", 1), ("eps_rel_error", "all", 4)]  # fmt: skip
    lines = ["| model | caption accuracy (%) | seen captions | held-out captions | PSNR vs teacher (dB) | "
             "MAE vs teacher (0-255) | eps rel. error |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, records in results.items():
        cells = []
        for metric, split, digits in cols:
            kind, field = METRICS[metric].records, METRICS[metric].field
            have = bool(records[kind]) and field in records[kind][0]
            cells.append(cell(summarise_metric([records], metric, split), digits) if have else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def quiet() -> None:
    """Keep the demo's output to what it reports: no per-component loading bars or notices."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_demo(cfg: TrainConfig, reps: int = REPS, samples: int | None = None) -> dict:
    """Sample and score teacher and inherited student, distil, export, and score the student, on a composed config."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    quiet()
    run_dir, teacher_dir = Path(cfg.output_dir), Path(cfg.teacher.pipeline)
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_fixtures(cfg, samples)  # the shapes-world training shards (the teacher ships in the package)

    n = 90 * reps
    print(f"== sampling the teacher and the inherited student ({n} pictures: every caption x {reps} seed(s))")
    evaluation = EvalSet(teacher_dir, reps=reps, latent_reps=max(reps, 2), cache=run_dir / "teacher-pictures")
    teacher = load_teacher(cfg.teacher)
    inherited = make_student(teacher, student_plan(dict(teacher.config), cfg.unet))[0].eval()
    results = {"teacher": evaluation.teacher_records()}
    pictures = {"teacher": evaluation.teacher_pictures}
    results["student before distillation"], pictures["before"] = evaluation.score_unet(inherited)

    print(f"== distilling {cfg.unet.name} from the shapes teacher for {cfg.max_steps} steps (distill={cfg.distill.name}"
          f", balance={cfg.distill.balance})")  # fmt: skip
    train(cfg)
    export = export_run(run_dir, checkpoint="latest", ema=cfg.ema)
    results["student after distillation"], pictures["after"] = evaluation.score_unet(load_pipeline(export).unet)

    print("== scoring")
    table = results_table(results)
    (run_dir / "demo_table.md").write_text(table + "\n")
    (run_dir / "demo_records.json").write_text(json.dumps(results))  # per picture and latent, for any other figure
    grid = picture_grid(list(pictures.values()), run_dir / "teacher_vs_student.png")
    plot = loss_plot(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    means = {name: {m: summarise_metric([r], m).mean for m in ("caption_accuracy", "psnr", "mae", "eps_rel_error")
                    if r[METRICS[m].records] and METRICS[m].field in r[METRICS[m].records][0]}
             for name, r in results.items()}  # fmt: skip
    reached = means["student after distillation"]["caption_accuracy"] / max(means["teacher"]["caption_accuracy"], 1e-9)
    summary = {"results": means, "table": table,
               "student_share_of_teacher_accuracy": 100 * reached, "pictures": n,
               "minutes": (time.perf_counter() - t0) / 60, "cpu_minutes": (time.process_time() - cpu0) / 60}  # fmt: skip
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    verdict = "goal met" if reached >= GOAL else f"short of the {GOAL:.0%} goal by {100 * (GOAL - reached):.1f} points"
    print(f"""
koala demo finished in {summary["minutes"]:.1f} min ({summary["cpu_minutes"]:.1f} CPU-min)
  run directory      {run_dir}
  exported pipeline  {export}   (loads with StableDiffusionXLPipeline.from_pretrained)
  loss curve         {plot}
  pictures           {grid}   (rows: teacher, student before, student after; same prompts and seeds)
  table              {run_dir / "demo_table.md"}

{n} pictures of the shapes world: every caption x {reps} seed(s), the same prompts and seeds for every model; 18 of the
90 captions are compositions the student never trained on (held out). Mean [95 % interval over pictures]:

{table}

The distilled student reaches {100 * reached:.0f}% of the teacher's caption accuracy ({verdict}). Real runs: README.md.""")
    return summary
