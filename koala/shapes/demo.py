"""The demo (`make demo`, `python -m koala.demo`): distil the shipped shapes-world teacher and show what it gave.

`run_demo` samples and scores the teacher and the inherited student, distils with the composed config, exports the
student as a stock diffusers SDXL pipeline and scores it, on the same prompts and seeds:
  caption accuracy  share of pictures whose shape, colour and background `koala.shapes.score` finds right;
  PSNR / MAE        pixel agreement of each student picture with the teacher's picture of the same prompt and seed;
  eps rel. error    E[(eps_S - eps_T)^2] / Var(eps_T) on held-out noisy latents (0: predicts as the teacher does).
It writes the table (Markdown), a teacher / before / after picture grid and a loss-curve plot into the run directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf
from PIL import Image

from koala.data import build_dataloader
from koala.data.conditioning import SDXLConditioner
from koala.evaluation.agreement import held_out_inputs, relative_error
from koala.fixtures import DATASETS, ensure_fixtures
from koala.fixtures.shards import write_demo_shards
from koala.models.plans import student_plan
from koala.models.teacher import load_teacher
from koala.shapes.judge import eval_prompts, judge, load_pipeline, sample
from koala.ship.export import export_run
from koala.ship.presets import get_preset
from koala.ship.sampling import make_grid
from koala.train.build import make_student
from koala.train.diffusion import build_noise_scheduler
from koala.train.loop import train

if TYPE_CHECKING:
    from koala.config.schema import TrainConfig

PROMPTS = 24  # evaluation prompts (each shape-colour pair at least once), one seeded picture each


GRID_COLUMNS = 12


def held_out_batches(cfg: TrainConfig, out_dir: Path, n: int = 32) -> list[dict]:
    """Captioned images the student never trains on (another seed of the generator), as online batches."""
    shards = write_demo_shards(out_dir, n, cfg.data.resolution, samples_per_shard=n, seed=999,
                               world=DATASETS[cfg.data.name][0])  # fmt: skip
    data = OmegaConf.merge(
        cfg.data,
        {
            "path": shards[0],
            "resampled": False,
            "epochs": 1,
            "caption_dropout": 0.0,
            "random_flip": False,
            "num_workers": 0,
        },
    )
    return list(build_dataloader(data, batch_size=8, seed=0))


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
    """The first `cols` pictures of each row, enlarged `scale` times, one row under the other."""
    pictures = [
        im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for r in rows for im in r[:cols]
    ]
    make_grid(pictures, cols=cols).save(out)
    return out


def results_table(results: dict[str, dict]) -> str:
    """The before/after table as Markdown."""
    lines = ["| model | caption accuracy | PSNR vs teacher (dB) | MAE vs teacher (0-255) | eps rel. error |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, r in results.items():
        agree = f"{r['psnr']:.2f} | {r['mae']:.1f}" if "psnr" in r else "- | -"
        lines.append(f"| {name} | {r['caption_accuracy']:.1f}% | {agree} | {r['eps_rel_error']:.4f} |")
    return "\n".join(lines)


def quiet() -> None:
    """Keep the demo's output to what it reports: no per-component loading bars or notices."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_demo(cfg: TrainConfig, prompts: int = PROMPTS, samples: int | None = None) -> dict:
    """Sample and score teacher and inherited student, distil, export, and score the student, on a composed config."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    quiet()
    run_dir, teacher_dir = Path(cfg.output_dir), Path(cfg.teacher.pipeline)
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_fixtures(cfg, samples)  # the shapes-world shards (the teacher ships in the package)
    prompts, preset = eval_prompts(prompts), get_preset(cfg.teacher.kind)

    print(f"== sampling the teacher and the inherited student ({len(prompts)} prompts, seeds 0-{len(prompts) - 1})")
    teacher = load_teacher(cfg.teacher)
    inputs = held_out_inputs(SDXLConditioner.from_pretrained(teacher_dir), held_out_batches(cfg, run_dir / "held-out"),
                             build_noise_scheduler(teacher_dir))  # fmt: skip
    inherited = make_student(teacher, student_plan(dict(teacher.config), cfg.unet))[0].eval()
    pictures = {
        "teacher": sample(load_pipeline(teacher_dir), prompts, preset),
        "student before distillation": sample(load_pipeline(teacher_dir, unet=inherited), prompts, preset),
    }
    errors = {"teacher": 0.0, "student before distillation": relative_error(inherited, teacher, inputs)}

    print(
        f"== distilling {cfg.unet.name} from the shapes teacher for {cfg.max_steps} steps (distill={cfg.distill.name})"
    )
    train(cfg)
    export = export_run(run_dir, checkpoint="latest", ema=cfg.ema)
    after = load_pipeline(export)
    pictures["student after distillation"] = sample(after, prompts, preset)
    errors["student after distillation"] = relative_error(after.unet, teacher, inputs)

    print("== scoring")
    results = {name: {**judge(images, prompts, None if name == "teacher" else pictures["teacher"]),
                      "eps_rel_error": errors[name]} for name, images in pictures.items()}  # fmt: skip
    table = results_table(results)
    (run_dir / "demo_table.md").write_text(table + "\n")
    grid = picture_grid(list(pictures.values()), run_dir / "teacher_vs_student.png")
    plot = loss_plot(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    teacher_acc = results["teacher"]["caption_accuracy"]
    reached = 100 * results["student after distillation"]["caption_accuracy"] / max(teacher_acc, 1e-9)
    summary = {"results": results, "student_share_of_teacher_accuracy": reached, "prompts": prompts,
               "minutes": (time.perf_counter() - t0) / 60, "cpu_minutes": (time.process_time() - cpu0) / 60}  # fmt: skip
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"""
koala demo finished in {summary["minutes"]:.1f} min ({summary["cpu_minutes"]:.1f} CPU-min)
  run directory      {run_dir}
  exported pipeline  {export}   (loads with StableDiffusionXLPipeline.from_pretrained)
  loss curve         {plot}
  pictures           {grid}   (rows: teacher, student before, student after; same prompts and seeds)
  table              {run_dir / "demo_table.md"}

{len(prompts)} prompts of the shapes world, one picture each, seeds 0-{len(prompts) - 1}:

{table}

The distilled student reaches {reached:.0f}% of the teacher's caption accuracy. Real runs: see README.md.""")
    return summary
