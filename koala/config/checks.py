"""Check a training config before any model is loaded: every bad value fails here, in one line naming the key, the
value and what is allowed. Choices are typed in the schema (`koala.choice.Choice`: Hydra rejects a bad one at
compose time); the checks here are ranges as data (`RANGES`) plus the few that need the file system."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from koala.errors import ConfigError  # raised by every check; importable from here too

if TYPE_CHECKING:
    from koala.config.schema import TeacherConfig, TrainConfig
    from koala.models.unets import Plan


# The folders of a diffusers SDXL pipeline a run reads (unet and vae unless teacher.unet / teacher.vae replace them).
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def _finite(v: Any) -> bool:
    """A real number that is not NaN or infinite (inf passes every `>=` test: it must be refused by name)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(n: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _finite(v) and v >= n), f"a number >= {n}"


def _between(lo: float, hi: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _finite(v) and lo <= v <= hi), f"a number in [{lo}, {hi}]"


def _positive_or_null() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v is None or (_finite(v) and v > 0)), "null or a finite number > 0"


def _positive() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _finite(v) and v > 0), "a finite number > 0"


# key -> (predicate, what is allowed). Cadences of 0 would divide by zero; a batch of 0 would loop forever.
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_steps": _at_least(1),
    "max_nonfinite_steps": _at_least(1),
    "seed": _between(0, 2**32 - 1),  # numpy's seed range (accelerate's set_seed seeds numpy too)
    "batch_size": _at_least(1),
    "grad_accum": _at_least(1),
    "log_every": _at_least(1),
    "checkpoint_every": _at_least(1),
    "sample_every": (lambda v: v >= 0, "0 (off) or a number of steps >= 1"),
    "keep_checkpoints": (lambda v: v >= 0, "0 (keep all) or a number >= 1"),
    "ema_decay": _between(0.0, 1.0),
    "noise_offset": _at_least(0.0),
    "snr_gamma": _positive_or_null(),
    "timestep_jitter": _at_least(0),
    "dist_timeout_s": _at_least(1),
    "distill.balance_batches": _at_least(1),
    "optim.lr": _positive(),
    "optim.weight_decay": _at_least(0.0),
    "optim.eps": _positive(),
    "optim.warmup_steps": _at_least(0),
    "optim.max_grad_norm": (lambda v: _finite(v) and v >= 0, "0 (no clipping) or a finite number > 0"),
    "optim.betas": (lambda v: len(v) == 2 and all(_finite(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "distill.task_weight": _at_least(0.0),
    "distill.out_weight": _at_least(0.0),
    "distill.feat_weight": _at_least(0.0),
    "data.caption_dropout": _between(0.0, 1.0),
    "data.num_workers": _at_least(0),
    "data.shuffle_buffer": _at_least(0),
    "data.min_size": _at_least(0),
    "data.max_consecutive_skips": _at_least(1),
    "data.epochs": _positive_or_null(),
    "teacher.steps": _at_least(1),
    "sample_steps": _positive_or_null(),
}


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: expected {allowed}")


def check_values(cfg: TrainConfig) -> None:
    """Ranges of plain settings."""
    for key, (ok, allowed) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            _fail(key, value, allowed)


def check_distill(d) -> None:
    """Feature-loss weights are not negative; per-kind blocks name distilled kinds (kinds and stages are typed: the
    schema checks their names; block names are checked against the model when the pairs are made)."""
    for key, weights in (("distill.kind_weights", d.kind_weights), ("distill.stage_weights", d.stage_weights)):
        if not all(_finite(w) and w >= 0 for w in weights.values()):
            _fail(key, dict(weights), "finite weights >= 0")
    idle = [str(k) for k, v in d.kind_blocks.items() if v is not None and k not in d.kinds]
    if idle:
        raise ConfigError(
            f"distill.kind_blocks names {idle}, which distill.kinds={[str(k) for k in d.kinds]} does not distil: add "
            "them to distill.kinds (e.g. distill=sa+lf) or drop those entries"
        )
    if d.balance == "grad":
        from koala.train.sharding import fsdp_requested

        if fsdp_requested():
            raise ConfigError("distill.balance=grad is not supported under FSDP yet (it measures gradients of the "
                              "unsharded student); measure the weights in a DDP or one-process run and pass them "
                              "as distill.kind_weights, or use distill.balance=none")  # fmt: skip


def check_run_settings(cfg: TrainConfig) -> None:
    """Sampling has prompts to render; the run folder is named and can be made and written."""
    if cfg.sample_every > 0 and not cfg.sample_prompts:
        raise ConfigError(
            f"sample_prompts is empty while sample_every={cfg.sample_every} renders them every so many steps: give at "
            "least one prompt, or sample_every=0 to render none"
        )
    usable_output_dir(cfg.output_dir)


def usable_output_dir(output_dir: Any) -> str:
    """`output_dir` when it names a folder that exists or can be made, and can be written; else ConfigError. Also
    the `koala_run_dir` resolver of Hydra's run folder (configs/train.yaml), so that Hydra, which makes its run
    folder before koala runs, neither writes into the current folder nor fails on one that cannot be made."""
    out = str(output_dir).strip() if output_dir is not None else ""
    if not out:
        raise ConfigError(
            f"output_dir={output_dir!r} is empty (the run would be written into the current folder): name a "
            "folder for the run, e.g. outputs/<name>"
        )
    path = Path(out).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output_dir={out!r} is a file, not a folder: name a folder for the run")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "a file" if not existing.is_dir() else "not writable"
        raise ConfigError(f"output_dir={out!r} cannot be created or written: {existing} is {what}")
    return str(output_dir)


def _refuse_pickle(key: str, path: str) -> None:
    from koala.models.teacher import PICKLE_SUFFIXES

    if Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise ConfigError(
            f"{key}={path!r} is a pickle checkpoint, refused because loading it can run code; convert it "
            "to .safetensors (safetensors.torch.save_file) and pass that"
        )


def _fixture_hint(cfg: TrainConfig) -> str:
    """For the tiny teacher and the generated data sets: how to write them."""
    from koala.fixtures import fixture_command

    command = fixture_command(cfg)
    return f" (a generated fixture: write it with `{command}`)" if command else ""


def check_teacher_file(t: TeacherConfig) -> None:
    """A single-file `teacher.pipeline`: a full SDXL checkpoint whose every part fits its configs (header only)."""
    if t.config and not Path(t.config).is_dir():
        raise ConfigError(f"teacher.config={t.config!r} is not a folder (a local diffusers folder of configs)")
    from koala.models.pipeline_parts import PipelineSource

    try:
        PipelineSource.of(t).check_file()
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"teacher.pipeline={t.pipeline!r}: {e}") from None


def check_teacher_paths(cfg: TrainConfig) -> None:
    """The teacher's folders and files exist and are not pickles; a single-file teacher is a full SDXL checkpoint."""
    t = cfg.teacher
    if not t.pipeline:
        raise ConfigError(
            "teacher.pipeline is required: a local diffusers SDXL folder, or a full SDXL .safetensors checkpoint"
        )
    _refuse_pickle("teacher.pipeline", t.pipeline)
    p = Path(t.pipeline)
    if p.is_file():
        if p.suffix.lower() != ".safetensors":
            raise ConfigError(
                f"teacher.pipeline={t.pipeline!r} is a file but not .safetensors; expected a diffusers SDXL folder or "
                "a full SDXL checkpoint <file>.safetensors"
            )
        check_teacher_file(t)
    elif not p.is_dir():
        raise ConfigError(f"teacher.pipeline={t.pipeline!r} does not exist{_fixture_hint(cfg)}")
    for key in ("unet", "vae"):
        path = t[key]
        if path:
            _refuse_pickle(f"teacher.{key}", path)
            if not Path(path).exists():
                raise ConfigError(f"teacher.{key}={path!r} does not exist")
    needed = [c for c in PIPELINE_PARTS if not (c == "unet" and t.unet) and not (c == "vae" and t.vae)]
    missing = [] if p.is_file() else [c for c in needed if not (p / c).is_dir()]  # a file holds every part
    if missing:
        raise ConfigError(
            f"teacher.pipeline={t.pipeline!r} is not a diffusers SDXL pipeline folder: it has no {', '.join(missing)} "
            f"folder{'s' if len(missing) > 1 else ''}{_fixture_hint(cfg)}"
        )
    from koala.models.teacher import check_teacher_files

    try:
        check_teacher_files(t)  # before any part loads: a U-Net folder of .bin weights is refused here
    except FileNotFoundError as e:
        raise ConfigError(f"teacher: {e}") from None


def _size_multiple(t) -> int:
    """Pixels per latent pixel (VAE) times the U-Net's total downsampling: 8 x 4 = 32 for SDXL."""
    from koala.models.pipeline_parts import PipelineSource

    vae_scale = 8
    vae_dir = Path(t.vae) if t.vae else PipelineSource.of(t).config_dir / "vae"
    if (vae_dir / "config.json").is_file():
        vae_scale = 2 ** (len(json.loads((vae_dir / "config.json").read_text())["block_out_channels"]) - 1)
    from koala.models.plans import teacher_unet_config

    return vae_scale * 2 ** (len(teacher_unet_config(t)["block_out_channels"]) - 1)


def check_data(cfg: TrainConfig) -> None:
    """Resolution fits the models; the data path names something that exists (local paths only)."""
    data = cfg.data
    multiple = _size_multiple(cfg.teacher)
    if data.buckets:
        multiple = max(multiple, 64)  # SDXL's bucket grid is 64 px at 1024 px
    if data.resolution <= 0 or data.resolution % multiple:
        why = " (buckets: SDXL's bucket grid is 64 px)" if data.buckets else ""
        _fail(
            "data.resolution",
            data.resolution,
            f"a positive multiple of {multiple}: the VAE's downscaling times the U-Net's{why}",
        )
    from koala.data.transforms import background_rgb

    try:
        background_rgb(data.background)
    except ValueError:
        _fail("data.background", data.background, "a colour name or '#rrggbb'")
    if not data.path:
        raise ConfigError(f"data.path is required for data.kind={data.kind}")
    if "://" in data.path or data.path.startswith("pipe:"):
        return
    if data.kind in ("webdataset", "cached"):
        from koala.data.shards import expand_shards

        try:
            shards = expand_shards(data.path)
        except FileNotFoundError:
            shards = []
        missing = [s for s in shards if not Path(s).exists()]
        if not shards or len(missing) == len(shards):
            raise ConfigError(f"data.path={data.path!r} matches no shard on disk{_fixture_hint(cfg)}")
        if data.kind == "cached":
            from koala.data.cached import IncompleteCache, check_cache

            try:
                check_cache(data.path)
            except IncompleteCache as e:
                raise ConfigError(f"data.path={data.path!r}: {e}") from None
    elif not Path(data.path.split("::")[0]).exists() and not any(c in data.path for c in "*?["):
        raise ConfigError(f"data.path={data.path!r} does not exist")
    elif Path(data.path).is_dir():
        from koala.data.indexed import folder_problem

        problem = folder_problem(data.path, data.kind, data.hf_format)
        if problem:
            raise ConfigError(f"data.path={data.path!r} {problem}")
    if data.kind == "cached":
        check_cache_precision(cfg)


def check_cache_precision(cfg: TrainConfig) -> None:
    """A cache is trained on in the precision it was encoded in: a `conditioning.dtype` that differs is refused (the
    empty prompt and sample grids would be encoded otherwise than the cached embeddings)."""
    from koala.data.cached import recorded_conditioning_dtype

    try:
        recorded = recorded_conditioning_dtype(cfg.data.path)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    wanted = cfg.conditioning.dtype
    if recorded is None and Path(cfg.data.path).is_dir():
        logging.getLogger("koala.config").warning(
            "the cache %s records no conditioning precision (written by an older koala.cache): it cannot be checked "
            "against conditioning.dtype=%s",
            cfg.data.path,
            wanted,
        )
    if recorded is not None and wanted != "auto" and wanted != recorded:
        raise ConfigError(
            f"conditioning.dtype={wanted} differs from the cache's: data.path={cfg.data.path!r} was encoded in "
            f"{recorded} (its info files); train with conditioning.dtype={recorded} (or auto), or re-cache with "
            f"conditioning.dtype={wanted}"
        )


def check_config(cfg: TrainConfig) -> Plan:
    """Fail before any model is loaded: unknown choices, bad values and missing paths are named here. Returns the
    student plan, resolved on configs alone (the teacher folder's config.json, no weights): the run builds from it."""
    check_values(cfg)
    check_distill(cfg.distill)
    check_run_settings(cfg)
    from koala.train.deepspeed import check_launch

    check_launch(cfg)  # what a DeepSpeed launch config says must agree with these settings
    check_teacher_paths(cfg)
    from koala.models.plans import config_plan

    try:
        plan = config_plan(cfg)[1]  # the student spec must fit the teacher
    except (KeyError, ValueError) as e:
        raise ConfigError(f"unet={cfg.unet.name}: {e}") from e
    check_data(cfg)
    return plan
