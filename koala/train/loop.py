"""The KOALA distillation run: `train(cfg)` (the command is `python -m koala.train`, koala/train/__main__.py).

`train(cfg)` reads top to bottom: check the config, build the parts, resume, then loop: encode, noise, teacher and
student forward, losses, backward, step, EMA (koala.train.step), then the metrics log, the sample renderer and the
checkpointer, each of which decides itself whether this step is one of its steps.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from koala.config.checks import check_config
from koala.data import SkipTally, build_dataloader
from koala.data.position import DataPosition, data_workers
from koala.devices import DTYPES
from koala.models.identity import checkpoint_identity
from koala.rng import rng_preserved
from koala.train.balance import apply_balance
from koala.train.build import build_trainable, load_frozen, make_accelerator
from koala.train.checkpoint import Checkpointer, StopSignal, read_state
from koala.train.resume import check_launch, load_training_state
from koala.train.runs import keep_old_metrics, record_config, resolve_resume, run_folder_lock, trim_metrics
from koala.train.sampling import SampleRenderer
from koala.train.sharding import shard_like
from koala.train.step import Trainable, train_step
from koala.train.tracking import MetricsLog, flat_hparams, write_rank_record

if TYPE_CHECKING:
    from koala.config.schema import TrainConfig
    from koala.models.unets import Plan

log = logging.getLogger("koala.train")


def setup_run(cfg: TrainConfig, resuming: bool) -> tuple[Accelerator, Path]:
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


def resume(cfg: TrainConfig, run: Trainable, ckpt: Path | None) -> tuple[int, DataPosition]:
    """Restore optimizer, LR schedule, RNG and EMA (on any number of ranks: koala.train.resume); return the step to
    continue from and where the data streams stand for this launch."""
    ranks, workers = run.accelerator.num_processes, data_workers(cfg.data.num_workers)
    if ckpt is None:
        return 0, DataPosition.start(ranks, workers)
    state = read_state(ckpt)
    saved_ranks = load_training_state(
        run.accelerator, ckpt / "accelerate", run.student, run.optimizer, run.lr_scheduler, state["step"], cfg.seed
    )
    with rng_preserved():  # building the EMA model draws random weights: that must not move the restored RNG
        if run.ema is not None:
            saved = EMAModel.from_pretrained(ckpt / "unet_ema", UNet2DConditionModel).state_dict()
            saved["shadow_params"] = shard_like(saved["shadow_params"], run.ema.shadow_params)  # FSDP: this rank's
            run.ema.load_state_dict(saved)
    saved_lr = state.get("config", {}).get("optim", {}).get("lr", cfg.optim.lr)
    if saved_lr != cfg.optim.lr:
        set_base_lr(run.optimizer, run.lr_scheduler, cfg.optim.lr)
        log.warning(
            "resume: optim.lr changed from %g to %g; the schedule continues from the new base", saved_lr, cfg.optim.lr
        )
    log.info("resumed from %s at step %d", ckpt, state["step"])
    if "data" in state:
        position = DataPosition.from_json(state["data"])
    else:  # written before positions were recorded: one fresh deal on the layout that wrote it
        saved_workers = data_workers(state.get("config", {}).get("data", {}).get("num_workers", cfg.data.num_workers))
        position = DataPosition.start(saved_ranks, saved_workers).advanced(state["step"] * cfg.grad_accum)
    return state["step"], position.on(ranks, workers)


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


def make_loader(cfg: TrainConfig, accelerator: Accelerator, position: DataPosition) -> Iterable[dict]:
    """This rank's batches from where `position` says its data streams stand (koala.data.position), skipping what
    was consumed before a resume without decoding it.

    The loader splits the data by rank itself; it is not passed to accelerator.prepare, which would re-split or
    dispatch it."""
    return build_dataloader(cfg.data, batch_size=cfg.batch_size, seed=cfg.seed, rank=accelerator.process_index,
                            world_size=accelerator.num_processes, final_tally=True, position=position)  # fmt: skip


def checkpoint_state(
    cfg: TrainConfig,
    accelerator: Accelerator,
    last: dict,
    config: dict,
    teacher_id: dict,
    position: DataPosition,
    steps: int,
    balance: dict | None = None,
) -> dict:
    """What state.json records beside the step: the last logged terms, the config, the teacher's identity (a resume
    checks it), the number of ranks that wrote it, where the data streams stand `steps` optimizer steps after
    `position` (this launch's start), and the balance weights (a resume reuses them, never re-measures)."""
    data = position.advanced(steps * cfg.grad_accum).to_json()
    kept = {"balance": balance} if balance is not None else {}
    return {"last": last, "config": config, "teacher_identity": teacher_id, "world_size": accelerator.num_processes,
            "data": data, **kept}  # fmt: skip


def open_metrics(
    cfg: TrainConfig, run: Trainable, run_dir: Path, step: int, config: dict, skipped: SkipTally
) -> MetricsLog:
    """The run's metrics log (metrics.jsonl cut back to `step`, the trackers, a progress bar on the main process)."""
    accelerator = run.accelerator
    if accelerator.is_main_process:
        trim_metrics(run_dir / "metrics.jsonl", step)
        accelerator.init_trackers(
            "koala", config=flat_hparams(config), init_kwargs={"wandb": {"dir": str(run_dir)}}
        )  # wandb/ in the run, not the cwd

    def extras() -> dict:
        """What every row adds to the loss terms: the learning rate, the skipped-sample counts and the optimizer
        steps skipped for a non-finite loss or gradient norm."""
        nonfinite = {"nonfinite_steps": run.guard.skipped} if run.guard is not None else {}
        return {"lr": run.lr_scheduler.get_last_lr()[0], **{f"skipped/{k}": v for k, v in skipped.totals().items()},
                **nonfinite}  # fmt: skip

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not accelerator.is_main_process, desc="distill")
    return MetricsLog(accelerator, run_dir / "metrics.jsonl", cfg.log_every, extras, bar)


def train(cfg: TrainConfig) -> Path:
    """Run (or resume) one distillation; returns the run directory."""
    plan = check_config(cfg)  # before any model is loaded; the student plan, resolved once
    with run_folder_lock(cfg.output_dir):  # one process per run folder: a second is refused here, naming the holder
        return distill_run(cfg, plan)


def distill_run(cfg: TrainConfig, plan: Plan) -> Path:
    """The run itself, in its locked folder (`train` checked the config and resolved the student plan)."""
    ckpt = resolve_resume(cfg)  # the run folder's rules, also before any model is loaded
    check_launch(ckpt)  # what this launch cannot resume (DeepSpeed state on other ranks) fails here too
    accelerator, run_dir = setup_run(cfg, resuming=ckpt is not None)
    device = accelerator.device

    # Frozen parts: SDXL conditioning, the noise schedule and the teacher. The teacher is never prepared.
    conditioner, noising, teacher = load_frozen(cfg, device)
    run = build_trainable(cfg, accelerator, teacher, noising, plan, cfg.data.resolution // conditioner.vae_scale_factor)
    set_seed(cfg.seed, device_specific=True)  # each rank draws its own noise and timesteps
    teacher.to(device, DTYPES[cfg.teacher.dtype])  # only now: the student inherited the stored precision
    step, position = resume(cfg, run, ckpt)
    start = step
    balance = apply_balance(cfg, run, conditioner, ckpt, run_dir)  # feature kinds at equal strength, or None
    if run.ema is not None:
        run.ema.to(device)
    loader, skipped = make_loader(cfg, accelerator, position), SkipTally()
    config, teacher_id = OmegaConf.to_container(cfg, resolve=True), checkpoint_identity(cfg.teacher)
    # Each decides when it runs: metrics every log_every steps, samples every sample_every, checkpoints every
    # checkpoint_every; metrics and checkpoints also at the last step.
    metrics = open_metrics(cfg, run, run_dir, step, config, skipped)
    renderer = SampleRenderer(cfg, conditioner, accelerator, run_dir / "samples")
    checkpointer = Checkpointer(accelerator, run_dir, run.student, run.ema, cfg.checkpoint_every, cfg.keep_checkpoints,
                                lambda at: checkpoint_state(cfg, accelerator, metrics.last, config, teacher_id,
                                                            position, at - start, balance),
                                step)  # fmt: skip
    renderer.render_teacher(teacher, step)
    seen_keys, finite = [], not cfg.data.resampled and cfg.data.epochs is not None

    with run.task, StopSignal() as stop, metrics:  # metrics: an error closes the progress bar first
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
            metrics.log(step, last_step=step == cfg.max_steps)
            renderer.render_student(run.student, step)
            if stop.agreed(accelerator):
                log.warning("stop requested: writing a checkpoint at step %d before exiting", step)
                checkpointer.save(step, force=True)
                break
            checkpointer.save(step, last_step=step == cfg.max_steps)
    if checkpointer.saved != step:  # a finite dataset ran out before max_steps (every rank stops at the same step)
        metrics.log(step, force=True)
        log.info("the data ran out at step %d; skipped: %s", step, skipped.totals())
        checkpointer.save(step, force=True)
    metrics.close()
    if cfg.record_ranks:
        write_rank_record(accelerator, run_dir, seen_keys, accelerator.unwrap_model(run.student))
    # Every rank waits here before the process group goes (end_training destroys it): without this barrier gloo
    # aborted at exit in about 1 of 6 two-process runs.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
