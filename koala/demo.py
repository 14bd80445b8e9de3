"""`python -m koala.demo [overrides]` (`make demo`): the main job on its built-in default, offline, on CPU.

Builds a tiny random SDXL-shaped teacher pipeline and a generated captioned image set, measures how far the
inherited student is from its teacher on held-out noisy inputs, distils it with the KOALA objective (task + output
KD + self-attention KD), exports the student as a stock diffusers SDXL pipeline, measures again, and writes sample
images of teacher and student from the same seeds, a side-by-side grid and a loss-curve plot.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from omegaconf import OmegaConf

from koala.agreement import held_out_inputs, relative_error
from koala.build import make_student
from koala.conditioning import SDXLConditioner
from koala.data import build_dataloader
from koala.data.demo import ensure_demo_shards, write_demo_shards
from koala.diffusion import build_noise_scheduler
from koala.export import export_run
from koala.generate import generate, make_grid
from koala.hydra_utils import compose_config
from koala.inference import preset_for_kind
from koala.teacher import load_teacher
from koala.tiny import write_tiny_pipeline
from koala.train import train

PROMPTS = ["a red circle on a blue background", "a yellow square on a green background",
           "a white triangle on a black background", "a blue circle on a yellow background"]


def held_out_batches(cfg, out_dir: Path, n: int = 32) -> list[dict]:
    """Captioned images the student never trains on (another seed of the generator), as online batches."""
    shards = write_demo_shards(out_dir, n, cfg.data.resolution, samples_per_shard=n, seed=999)
    data = OmegaConf.merge(cfg.data, {"path": shards[0], "resampled": False, "epochs": 1, "create_demo": False,
                                      "caption_dropout": 0.0, "random_flip": False, "num_workers": 0})
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
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="KOALA distillation (tiny demo)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def side_by_side(teacher_dir: Path, student_dir: Path, kind: str, size: int, out: Path) -> Path:
    """Teacher (top row) and student (bottom row) images from the same prompts and seeds."""
    preset = preset_for_kind(kind)
    rows = []
    for folder in (teacher_dir, student_dir):
        pipe = StableDiffusionXLPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        rows += generate(pipe, PROMPTS, preset, seeds=0, height=size, width=size)
    make_grid(rows, cols=len(PROMPTS)).save(out)
    return out


def quiet() -> None:
    """Keep the demo's output to what it reports: no per-component loading bars or notices."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    quiet()
    cfg = compose_config("train", ["experiment=demo", *(sys.argv[1:] if argv is None else argv)])
    run_dir = Path(cfg.output_dir)
    write_tiny_pipeline(cfg.teacher.pipeline)
    ensure_demo_shards(cfg.data.path, cfg.data.demo_samples, cfg.data.resolution)

    print("== measuring the inherited student against its teacher on held-out inputs")
    conditioner = SDXLConditioner.from_pretrained(cfg.teacher.pipeline)
    teacher = load_teacher(cfg.teacher)
    inputs = held_out_inputs(conditioner, held_out_batches(cfg, run_dir / "held-out"),
                             build_noise_scheduler(cfg.teacher.pipeline))
    before = relative_error(make_student(cfg, teacher)[0], teacher, inputs)

    print(f"== distilling {cfg.unet.name} from the tiny teacher for {cfg.max_steps} steps")
    train(cfg)
    export = export_run(run_dir, checkpoint="latest", ema=cfg.ema)
    student = UNet2DConditionModel.from_pretrained(export / "unet")
    after = relative_error(student, teacher, inputs)

    print("== sampling teacher and student with the same prompts and seeds")
    grid = side_by_side(Path(cfg.teacher.pipeline), export, cfg.teacher.kind, cfg.data.resolution,
                        run_dir / "teacher_vs_student.png")
    plot = loss_plot(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    summary = {"relative_error_before": before, "relative_error_after": after,
               "minutes": (time.perf_counter() - t0) / 60}
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"""
koala demo finished in {summary['minutes']:.1f} min
  run directory      {run_dir}
  exported pipeline  {export}   (loads with StableDiffusionXLPipeline.from_pretrained)
  loss curve         {plot}
  teacher | student  {grid}   (top row teacher, bottom row student, same seeds)
  checkpoints        {run_dir / 'checkpoints'}
  metrics            {run_dir / 'metrics.jsonl'}

Student-teacher agreement on {sum(len(x['t']) for x in inputs)} held-out noisy inputs,
E[(eps_S - eps_T)^2] / Var(eps_T):  before distillation {before:.4f}  ->  after {after:.4f}

The teacher is a tiny random network, so its images are not pictures: what the demo shows is the student learning
to predict like its teacher, which is what distillation is. Real runs: see README.md.""")
    return summary


if __name__ == "__main__":
    main()
