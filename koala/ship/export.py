"""Export a training checkpoint as a stock diffusers SDXL pipeline folder (the library behind `koala.export`).

The student U-Net (`<out>/unet`, itself a complete diffusers U-Net folder) plus the teacher's text encoders,
tokenizers and VAE, an Euler scheduler set for the teacher kind, safetensors only, an optional fp16 variant, and a
model card. The result loads with `StableDiffusionXLPipeline.from_pretrained(out)` and no project code. Beside it:
`<name>-checkpoint.safetensors`, the whole pipeline as one original-layout checkpoint (fp16 unless asked otherwise;
koala.ship.checkpoint_file) for ComfyUI's Load Checkpoint, A1111 and diffusers' `from_single_file`, with a warning
when ComfyUI cannot detect the student, and `unet.safetensors`, the U-Net alone in that layout.

Every export carries a `.koala-export` marker listing the files it wrote. An existing `out` is replaced only when it
is empty or such an export holding nothing else; anything else is refused, never deleted. The export is written to a
uniquely named staging folder beside `out` (`.<out>.koala-tmp-<tag>`) and renamed into place once complete. While
it is written, a lock file beside it (`<staging>.lock`, koala.locks) is held; an export that was killed leaves both,
and the next export to the same `out` removes every staging folder whose lock no live process holds.
"""

from __future__ import annotations

import glob
import inspect
import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from koala.devices import parse_dtype
from koala.locks import FileLock, is_stale
from koala.models.convert import diffusers_to_original
from koala.models.pipeline_parts import PipelineSource
from koala.models.unets import count_parameters
from koala.ship.checkpoint_file import warn_unless_comfy_detects, write_checkpoint_file
from koala.ship.model_card import write_model_card
from koala.ship.presets import get_preset, preset_scheduler
from koala.train.checkpoint import CorruptCheckpoint, NonFiniteWeights, find_checkpoint, step_of

if TYPE_CHECKING:
    from koala.config.schema import TeacherConfig, TrainConfig

MARKER = ".koala-export"  # json: the files an export wrote, and what it was exported from
log = logging.getLogger("koala.export")
REFUSALS = (FileNotFoundError, FileExistsError, CorruptCheckpoint, NonFiniteWeights)  # a run or target it refuses


def checkpoint_file_name(cfg: DictConfig) -> str:
    """`<run name>-checkpoint.safetensors`: the single-file checkpoint's name in the export folder."""
    return f"{str(cfg.get('name') or 'student').replace('/', '-')}-checkpoint.safetensors"


def load_run_config(run_dir: str | Path) -> DictConfig:
    """The resolved training config a run saved as config.yaml."""
    path = Path(run_dir) / "config.yaml"
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run dir {run_dir} does not exist")
    if not path.is_file():
        have = sorted(p.name for p in Path(run_dir).iterdir()) if Path(run_dir).is_dir() else []
        raise FileNotFoundError(
            f"{run_dir} is not a run dir: no config.yaml (it holds: {', '.join(have) or 'nothing'})"
        )
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


def assemble_pipeline(
    teacher_cfg: TeacherConfig, student: UNet2DConditionModel, run_dir: Path
) -> StableDiffusionXLPipeline:
    """The teacher's SDXL pipeline (a diffusers folder or a full single-file checkpoint) with its U-Net swapped for
    the student and the scheduler set for its kind."""
    if not teacher_cfg.get("pipeline"):
        raise ValueError("the run config has no teacher.pipeline: nothing to take text encoders, tokenizers, VAE from")
    teacher_path = resolve_local_path(teacher_cfg.pipeline, run_dir, "teacher.pipeline")
    config = teacher_cfg.get("config")
    source = PipelineSource(teacher_path, resolve_local_path(config, run_dir, "teacher.config") if config else None)
    scheduler = preset_scheduler(source.component_config("scheduler"), get_preset(teacher_cfg.get("kind", "base")))
    vae = None
    if teacher_cfg.get("vae"):
        vae_dir = resolve_local_path(teacher_cfg.vae, run_dir, "teacher.vae")
        vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True)
    return source.pipeline(student, scheduler, vae=vae)


def add_fp16_variant(pipe: StableDiffusionXLPipeline, folder: Path) -> None:
    """Add `*.fp16.safetensors` weights beside a saved fp32 pipeline (casts `pipe` in place).

    Only the weight files are taken from the fp16 save: its config.json files would record dtype float16, which
    transformers then applies to the fp32 weights too.
    """
    staging = folder / ".fp16-staging"  # inside koala's own staging folder: nothing of anyone else's is touched
    pipe.to(torch.float16).save_pretrained(staging, safe_serialization=True, variant="fp16")
    for f in staging.rglob("*"):
        if f.is_file() and ".fp16." in f.name:
            f.rename(folder / f.relative_to(staging))
    shutil.rmtree(staging)


def load_student(unet_dir: Path) -> UNet2DConditionModel:
    """The checkpoint's U-Net with a clean config.

    EMAModel.save_pretrained records its settings (decay, optimization_step, ...) in `unet_ema/config.json` (resume
    reads them back); diffusers would carry them into the export and warn about them on every load.
    """
    from accelerate import init_empty_weights

    config = UNet2DConditionModel.load_config(unet_dir)
    accepted = inspect.signature(UNet2DConditionModel.__init__).parameters
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config({k: v for k, v in config.items() if k in accepted})
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(unet_dir.glob("diffusion_pytorch_model*.safetensors")):  # one file, or the shards of one
        state.update(load_file(shard))
    unet.load_state_dict(state, strict=True, assign=True)
    bad = [name for name, t in state.items() if not bool(torch.isfinite(t).all())]
    if bad:  # a diverged run's weights: exporting them would ship a pipeline that draws nothing
        raise NonFiniteWeights(
            f"{unet_dir} holds NaN or inf in {len(bad)} of {len(state)} tensors ({_listing(set(bad), 3)}): not "
            "exported; name an earlier checkpoint (checkpoint=<step>)"
        )
    return unet.eval()


def _listing(names: set[str], limit: int = 5) -> str:
    """A short list of file names."""
    shown = sorted(names)[:limit]
    return ", ".join(shown) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_export_target(out: Path) -> None:
    """Refuse an `out` koala may not replace: a file, or a non-empty folder that is not an untouched koala export."""
    ways = f"pass out=<a new or empty folder>, or remove {out} yourself if it is yours to delete"
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise FileExistsError(f"export target {out} exists and is not a folder; {ways}")
    present = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_symlink() or not p.is_dir()}
    if not present:
        return
    try:
        written = set(json.loads((out / MARKER).read_text())["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        raise FileExistsError(
            f"export folder {out} exists and is not a koala export (no readable {MARKER} marker; exports of koala "
            f"before it wrote one have none); it holds {_listing(present)}: {ways}"
        ) from None
    if present - written:
        raise FileExistsError(
            f"export folder {out} holds files the previous koala export did not write ({_listing(present - written)}):"
            f" {ways}"
        )


def _publish(staging: Path, out: Path) -> None:
    """Rename a finished export into place, replacing an (empty, or koala-written) `out` checked just before."""
    check_export_target(out)
    if out.exists():
        old = staging.with_name(staging.name + "-old")
        out.rename(old)
        try:
            staging.rename(out)
        except OSError:
            old.rename(out)  # put the previous export back
            raise
        shutil.rmtree(old)
    else:
        staging.rename(out)


def export_run(
    run_dir: str | Path,
    checkpoint: str | int = "latest",
    ema: bool = True,
    out: str | Path | None = None,
    fp16: bool = False,
    single_file: bool = True,
    full_checkpoint: str | None = "fp16",
) -> Path:
    """Export a run's checkpoint as a complete SDXL pipeline folder; returns the folder.

    `single_file` also writes `unet.safetensors`: the student U-Net alone in the original SDXL (SGM) key layout,
    for ComfyUI-style loaders (koala.models.convert; the same conversion `koala.models.teacher` reads back).
    `full_checkpoint` (a dtype, or None for none) also writes `<run name>-checkpoint.safetensors`: the whole pipeline
    in that layout (koala.ship.checkpoint_file).
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = find_checkpoint(run_dir, checkpoint)
    unet_dir = ckpt / ("unet_ema" if ema else "unet")
    if not (unet_dir / "config.json").is_file():
        hint = " (EMA was off in this run: pass ema=false)" if ema else ""
        raise FileNotFoundError(
            f"{unet_dir} holds no U-Net{hint}; {ckpt} holds: {', '.join(sorted(p.name for p in ckpt.iterdir()))}"
        )
    out = Path(out) if out else run_dir / "export"
    check_export_target(out)  # before any model loads
    student = load_student(unet_dir)
    pipe = assemble_pipeline(cfg.teacher, student, run_dir)

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    tmp = out.with_name(f"{staging_prefix(out)}{uuid.uuid4().hex[:8]}")  # a name no one else uses
    with FileLock(tmp.with_name(tmp.name + ".lock"), unlink=True):  # koala's, and alive, while it is held
        try:
            _write_export(
                tmp, pipe, student, cfg, ckpt, run_dir, ema=ema, fp16=fp16, single_file=single_file,
                full_checkpoint=full_checkpoint,
            )  # fmt: skip
            _publish(tmp, out)  # the folder appears only once complete
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # koala's own staging folder only
            raise
    return out


def staging_prefix(out: Path) -> str:
    """The name every staging folder of an export to `out` starts with."""
    return f".{out.name}.koala-tmp-"


def remove_stale_staging(out: Path) -> None:
    """Remove the staging folders (and swapped-out old exports) of killed exports to `out`: those beside a lock
    file that no live process holds. Folders without koala's lock file are never touched."""
    for lock in out.parent.glob(f"{glob.escape(staging_prefix(out))}*.lock"):
        if not is_stale(lock):
            continue  # another export to the same folder is running
        staging = lock.with_name(lock.name.removesuffix(".lock"))
        for folder in (staging, staging.with_name(staging.name + "-old")):
            if folder.is_dir():
                log.warning("removing %s, left by an export that was stopped", folder)
                shutil.rmtree(folder, ignore_errors=True)
        lock.unlink(missing_ok=True)


def _write_export(
    tmp: Path, pipe: StableDiffusionXLPipeline, student: UNet2DConditionModel, cfg: TrainConfig, ckpt: Path,
    run_dir: Path, *, ema: bool, fp16: bool, single_file: bool, full_checkpoint: str | None,
) -> None:  # fmt: skip
    """Write the pipeline, its variants, the model card and last the marker into the staging folder `tmp`."""
    pipe.save_pretrained(tmp, safe_serialization=True)
    # the single files come before the fp16 variant casts the model in place (unet.safetensors keeps fp32)
    if single_file:
        save_file(diffusers_to_original(student.state_dict()), str(tmp / "unet.safetensors"))
    if full_checkpoint:
        path = write_checkpoint_file(pipe, tmp / checkpoint_file_name(cfg), parse_dtype(full_checkpoint))
        warn_unless_comfy_detects(diffusers_to_original(student.state_dict()), path)
    if fp16:
        add_fp16_variant(pipe, tmp)
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
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
    marker = {"run_dir": str(run_dir), "checkpoint": ckpt.name, "ema": ema, "fp16": fp16, "files": files}
    (tmp / MARKER).write_text(json.dumps(marker, indent=1))
