"""The KOALA distillation run: `train(cfg)` (the command is `python -m koala.train`, koala/train/__main__.py).

`train(cfg)` reads top to bottom: check the config, build the parts, resume, then loop: encode, noise, teacher and
student forward, losses, backward, step, EMA, log, sample, checkpoint.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from koala.config.checks import check_config
from koala.data import SkipTally, build_dataloader
from koala.devices import DTYPES
from koala.models.teacher import teacher_identity
from koala.train.build import build_trainable, load_frozen, make_accelerator
from koala.train.checkpoint import StopSignal, read_state, save_checkpoint
from koala.train.rng import rng_preserved
from koala.train.runs import keep_old_metrics, record_config, resolve_resume, run_folder_lock, trim_metrics
from koala.train.sampling import SampleRenderer
from koala.train.sharding import plain_student, shard_like
from koala.train.step import Trainable, train_step
from koala.train.tracking import MetricsLog, flat_hparams, write_rank_record

log = logging.getLogger("koala.train")


def setup_run(cfg: DictConfig, resuming: bool) -> tuple[Accelerator, Path]:
    """Accelerator, seeds and the run directory (deterministic, so every rank and a resume agree on it)."""
    run_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, project_dir=run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resuming:
            keep_old_metrics(run_dir / "metrics.jsonl")
        record_config(run_dir, cfg)
    set_seed(cfg.seed)  # the same on every rank while the student is built: FSDP2 shards each rank's own copy
    return accelerator, run_dir


def set_base_lr(optimizer, lr_scheduler, lr: float) -> None:
    """Apply a new base learning rate to a restored LambdaLR schedule (every diffusers schedule is one)."""
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)
    sched.base_lrs = [lr] * len(sched.base_lrs)
    for group, factor in zip(optimizer.param_groups, sched.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * factor(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in optimizer.param_groups]


def resume(cfg: DictConfig, run: Trainable, ckpt: Path | None) -> int:
    """Restore optimizer, LR schedule, RNG (accelerate) and EMA; return the step to continue from."""
    if ckpt is None:
        return 0
    run.accelerator.load_state(str(ckpt / "accelerate"))
    with rng_preserved():  # building the EMA model draws random weights: that must not move the restored RNG
        if run.ema is not None:
            saved = EMAModel.from_pretrained(ckpt / "unet_ema", UNet2DConditionModel).state_dict()
            saved["shadow_params"] = shard_like(saved["shadow_params"], run.ema.shadow_params)  # FSDP: this rank's
            run.ema.load_state_dict(saved)
    state = read_state(ckpt)
    saved_lr = state.get("config", {}).get("optim", {}).get("lr", cfg.optim.lr)
    if saved_lr != cfg.optim.lr:
        set_base_lr(run.optimizer, run.lr_scheduler, cfg.optim.lr)
        log.warning(
            "resume: optim.lr changed from %g to %g; the schedule continues from the new base", saved_lr, cfg.optim.lr
        )
    log.info("resumed from %s at step %d", ckpt, state["step"])
    return state["step"]


def every_rank_batches(batches: Iterator[dict], accelerator: Accelerator, finite: bool) -> Iterator[dict]:
    """Batches while every rank still has one: with finite data the ranks may hold unequal counts, and a rank that
    stopped alone would wait in a barrier while the others wait in a gradient all-reduce (a hang)."""
    if accelerator.num_processes == 1 or not finite:
        yield from batches
        return
    for batch in itertools.chain(batches, itertools.repeat(None)):
        have = torch.tensor([0.0 if batch is None else 1.0], device=accelerator.device)
        if accelerator.reduce(have, reduction="sum").item() < accelerator.num_processes:
            log.info("rank %d: a rank ran out of data; every rank stops here", accelerator.process_index)
            return
        yield batch


def train(cfg: DictConfig) -> Path:
    """Run (or resume) one distillation; returns the run directory."""
    check_config(cfg)  # before any model is loaded
    with run_folder_lock(cfg.output_dir):  # one process per run folder: a second is refused here, naming the holder
        return distill_run(cfg)


def distill_run(cfg: DictConfig) -> Path:
    """The run itself, in its locked folder (`train` checked the config)."""
    ckpt = resolve_resume(cfg)  # the run folder's rules, also before any model is loaded
    accelerator, run_dir = setup_run(cfg, resuming=ckpt is not None)
    device = accelerator.device

    # Frozen parts: SDXL conditioning, the noise schedule and the teacher. The teacher is never prepared.
    conditioner, noising, teacher = load_frozen(cfg, device)
    run = build_trainable(cfg, accelerator, teacher, noising, cfg.data.resolution // conditioner.vae_scale_factor)
    set_seed(cfg.seed, device_specific=True)  # each rank draws its own noise and timesteps
    teacher.to(device, DTYPES[cfg.teacher.dtype])  # only now: the student inherited the stored precision
    step = resume(cfg, run, ckpt)
    if run.ema is not None:
        run.ema.to(device)
    # The loader splits the data by rank itself and skips what was consumed without decoding it; it is not
    # passed to accelerator.prepare, which would re-split or dispatch it.
    loader = build_dataloader(
        cfg.data,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        resume_batches=step * cfg.grad_accum,
        final_tally=True,
    )
    config, teacher_id = OmegaConf.to_container(cfg, resolve=True), teacher_identity(cfg.teacher)
    if accelerator.is_main_process:
        trim_metrics(run_dir / "metrics.jsonl", step)
        accelerator.init_trackers(
            "koala", config=flat_hparams(config), init_kwargs={"wandb": {"dir": str(run_dir)}}
        )  # wandb/ in the run, not the cwd
    metrics, skipped = MetricsLog(accelerator, run_dir / "metrics.jsonl"), SkipTally()
    renderer = (
        SampleRenderer(cfg, conditioner, accelerator, run_dir / "samples") if accelerator.is_main_process else None
    )
    if renderer is not None and step == 0 and cfg.sample_every > 0:
        renderer.render_teacher(teacher)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not accelerator.is_main_process, desc="distill")
    last, saved, seen_keys = {}, step, []
    finite = not cfg.data.resampled and cfg.data.epochs is not None

    def checkpoint() -> None:
        with rng_preserved():  # writing (EMA's save builds a random model) consumes no training randomness
            save_checkpoint(
                accelerator,
                run_dir,
                step,
                run.student,
                run.ema,
                {"last": last, "config": config, "teacher_identity": teacher_id},
                keep=cfg.keep_checkpoints,
            )

    def log_point() -> dict:
        skips = {f"skipped/{k}": v for k, v in skipped.totals().items()}
        nonfinite = {"nonfinite_steps": run.guard.skipped} if run.guard is not None else {}
        return metrics.flush(step, {"lr": run.lr_scheduler.get_last_lr()[0], **skips, **nonfinite})

    with run.task, StopSignal() as stop:
        run.task.train()
        for batch in every_rank_batches(skipped.batches(loader), accelerator, finite):
            if step >= cfg.max_steps:
                break
            if cfg.record_ranks:
                seen_keys += list(batch["keys"])
            cond = conditioner(batch)  # VAE latents + text embeddings (or the cached ones), no grad
            train_step(run, cond, metrics)  # losses, backward, clip, optimizer, schedule, EMA, logged terms
            if not accelerator.sync_gradients:
                continue  # a micro-step of gradient accumulation
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                last = log_point() or last  # nothing to log when every step since the last row was skipped
                if last:
                    bar.set_postfix(loss=f"{last['loss/total']:.4f}", img_s=f"{last['images_per_s']:.1f}")
            if cfg.sample_every > 0 and step % cfg.sample_every == 0:
                unet = plain_student(accelerator, run.student)  # every rank: a gather under FSDP
                if renderer is not None:
                    renderer.render_student(unet.to(device), step)
            if stop.agreed(accelerator):
                log.warning("stop requested: writing a checkpoint at step %d before exiting", step)
                checkpoint()
                saved = step
                break
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                checkpoint()
                saved = step
    if saved != step:  # a finite dataset ran out before max_steps (every rank stops at the same step)
        last = log_point() or last
        log.info("the data ran out at step %d; skipped: %s", step, skipped.totals())
        checkpoint()
    bar.close()
    if cfg.record_ranks:
        write_rank_record(accelerator, run_dir, seen_keys, accelerator.unwrap_model(run.student))
    # Every rank waits here before the process group goes (end_training destroys it): without this barrier gloo
    # aborted at exit in about 1 of 6 two-process runs.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
