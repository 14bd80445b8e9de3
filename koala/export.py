"""`python -m koala.export run_dir=<run> [checkpoint=latest] [ema=true] [fp16=false] [out=<run>/export]`.

Turns a training checkpoint into a stock diffusers SDXL pipeline folder: the student U-Net (`<out>/unet`, itself a
complete diffusers U-Net folder) plus the teacher's text encoders, tokenizers and VAE, an Euler scheduler set for
the teacher kind, safetensors only, an optional fp16 variant, and a model card. The result loads with
`StableDiffusionXLPipeline.from_pretrained(out)` and no project code.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from koala.checkpoint import find_checkpoint, step_of
from koala.convert import diffusers_to_original
from koala.inference import euler_scheduler, preset_for_kind
from koala.model_card import write_model_card
from koala.unets import count_parameters


@dataclass
class ExportConfig:
    """Settings of `python -m koala.export`."""

    run_dir: Optional[str] = None
    checkpoint: str = "latest"  # latest | step-00000100 | 100 | a checkpoint folder
    ema: bool = True  # export unet_ema/ (else unet/)
    fp16: bool = False  # also write an fp16 variant (variant="fp16")
    single_file: bool = True  # also write unet.safetensors in the original SDXL layout (ComfyUI-style loaders)
    out: Optional[str] = None  # default <run_dir>/export


def load_run_config(run_dir: str | Path) -> DictConfig:
    """The resolved training config a run saved as config.yaml."""
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run dir {run_dir} does not exist")
    if not path.is_file():
        have = sorted(p.name for p in Path(run_dir).iterdir()) if Path(run_dir).is_dir() else []
        raise FileNotFoundError(f"{run_dir} is not a run dir: no config.yaml (it holds: {', '.join(have) or 'nothing'})")
    return OmegaConf.load(path)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records (empty when there is none); torn last lines are skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def resolve_local_path(path: str, run_dir: Path, what: str) -> Path:
    """A path from the run config: as given (absolute or relative to the cwd), else relative to the run dir."""
    for candidate in (Path(path), run_dir / path):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{what} {path!r} (from {run_dir / 'config.yaml'}) not found, nor under {run_dir}")


def assemble_pipeline(teacher_cfg: Any, student: UNet2DConditionModel, run_dir: Path) -> StableDiffusionXLPipeline:
    """The teacher's SDXL pipeline with its U-Net swapped for the student and the scheduler set for its kind."""
    if not teacher_cfg.get("pipeline"):
        raise ValueError("the run config has no teacher.pipeline: nothing to take text encoders, tokenizers, VAE from")
    teacher_dir = resolve_local_path(teacher_cfg.pipeline, run_dir, "teacher.pipeline")
    scheduler_cfg = json.loads((teacher_dir / "scheduler" / "scheduler_config.json").read_text())
    extra: dict[str, Any] = {}
    if teacher_cfg.get("vae"):
        vae_dir = resolve_local_path(teacher_cfg.vae, run_dir, "teacher.vae")
        extra["vae"] = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True)
    return StableDiffusionXLPipeline.from_pretrained(
        teacher_dir,
        unet=student,
        scheduler=euler_scheduler(scheduler_cfg, preset_for_kind(teacher_cfg.get("kind", "base"))),
        use_safetensors=True,
        **extra,
    )


def add_fp16_variant(pipe: StableDiffusionXLPipeline, folder: Path) -> None:
    """Add `*.fp16.safetensors` weights beside a saved fp32 pipeline (casts `pipe` in place).

    Only the weight files are taken from the fp16 save: its config.json files would record dtype float16, which
    transformers then applies to the fp32 weights too.
    """
    staging = folder.with_name(folder.name + ".fp16")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.to(torch.float16).save_pretrained(staging, safe_serialization=True, variant="fp16")
    for f in staging.rglob("*"):
        if f.is_file() and ".fp16." in f.name:
            f.rename(folder / f.relative_to(staging))
    shutil.rmtree(staging)


def export_run(
    run_dir: str | Path,
    checkpoint: str | int = "latest",
    ema: bool = True,
    out: str | Path | None = None,
    fp16: bool = False,
    single_file: bool = True,
) -> Path:
    """Export a run's checkpoint as a complete SDXL pipeline folder; returns the folder.

    `single_file` also writes `unet.safetensors`: the student U-Net alone in the original SDXL (SGM) key layout,
    for ComfyUI-style loaders (koala.convert; the same conversion `koala.teacher` reads back).
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = find_checkpoint(run_dir, checkpoint)
    unet_dir = ckpt / ("unet_ema" if ema else "unet")
    if not (unet_dir / "config.json").is_file():
        hint = " (EMA was off in this run: pass ema=false)" if ema else ""
        raise FileNotFoundError(f"{unet_dir} holds no U-Net{hint}; {ckpt} holds: {', '.join(sorted(p.name for p in ckpt.iterdir()))}")
    student = UNet2DConditionModel.from_pretrained(unet_dir, use_safetensors=True)
    pipe = assemble_pipeline(cfg.teacher, student, run_dir)

    out = Path(out) if out else run_dir / "export"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if fp16:
        add_fp16_variant(pipe, tmp)
    if single_file:
        save_file(diffusers_to_original(student.state_dict()), str(tmp / "unet.safetensors"))
    state = json.loads((ckpt / "state.json").read_text()) if (ckpt / "state.json").is_file() else {}
    write_model_card(
        tmp / "README.md",
        cfg=cfg,
        checkpoint=ckpt.name,
        step=state.get("step", step_of(ckpt.name)),
        ema=ema,
        parameters=count_parameters(student),
        metrics=read_metrics(run_dir),
        fp16=fp16,
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)  # the folder appears only once complete
    return out


ConfigStore.instance().store(name="koala_export", node=ExportConfig)


def main(argv: list[str] | None = None) -> Path:
    """CLI: compose `configs/export.yaml` with key=value overrides and export."""
    from koala.hydra_utils import compose_config

    cfg = compose_config("export", sys.argv[1:] if argv is None else argv)
    if not cfg.run_dir:
        raise SystemExit("usage: python -m koala.export run_dir=<run> [checkpoint=latest] [ema=true] [fp16=false] [out=...]")
    out = export_run(cfg.run_dir, checkpoint=cfg.checkpoint, ema=cfg.ema, out=cfg.out, fp16=cfg.fp16,
                     single_file=cfg.single_file)
    print(f"exported {cfg.run_dir} -> {out}")
    return out


if __name__ == "__main__":
    main()
