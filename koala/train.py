"""`python -m koala.train [experiment=...] [overrides]` / `accelerate launch -m koala.train ...`: KOALA distillation.

`train(cfg)` reads top to bottom: check the config, build the parts, resume, then loop: encode, noise, teacher and
student forward, losses, backward, step, EMA, log, sample, checkpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from koala.build import check_config, make_optimizer, make_student
from koala.checkpoint import StopSignal, find_checkpoint, read_state, save_checkpoint
from koala.conditioning import SDXLConditioner
from koala.config import register_configs
from koala.data import SkipTally, build_dataloader
from koala.data.demo import ensure_demo_shards
from koala.diffusion import TimestepSampler, build_noise_scheduler, min_snr_weights, sample_noise, task_target
from koala.distill.pairing import check_pair_shapes, pair_taps
from koala.distill.task import DistillationTask, LossWeights
from koala.dtypes import DTYPES
from koala.sampling import SampleRenderer
from koala.teacher import load_teacher
from koala.tiny import write_tiny_pipeline
from koala.tracking import MetricsLog, flat_hparams, resolve_trackers, write_rank_record

log = logging.getLogger("koala.train")


def prepare_assets(cfg, accelerator: Accelerator) -> None:
    """Write the tiny teacher and the demo shards when the config asks for them (rank 0; the others wait)."""
    if accelerator.is_main_process:
        if cfg.teacher.create_tiny:
            write_tiny_pipeline(cfg.teacher.pipeline)
        if cfg.data.create_demo:
            ensure_demo_shards(cfg.data.path, cfg.data.demo_samples, cfg.data.resolution, world=cfg.data.demo_world)
    accelerator.wait_for_everyone()


def setup_run(cfg: DictConfig) -> tuple[Accelerator, Path]:
    """Accelerator, seeds and the run directory (deterministic, so every rank and a resume agree on it)."""
    run_dir = Path(cfg.output_dir)
    # Several processes and no GPU: accelerate only picks gloo (MULTI_CPU) when told cpu=True.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=multi_cpu,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=resolve_trackers(cfg.report_to),
        project_dir=str(run_dir),
    )
    set_seed(cfg.seed, device_specific=True)  # each rank draws its own noise and timesteps
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    prepare_assets(cfg, accelerator)
    return accelerator, run_dir


def build_student_side(cfg: DictConfig, accelerator: Accelerator, teacher, latent_size: int):
    """Student (inherited from the teacher), its tap pairs, EMA, optimizer and LR schedule, prepared."""
    student, plan, report = make_student(cfg, teacher)
    log.info("student %s: %s", cfg.unet.name, report.summary().splitlines()[0])
    pairs = pair_taps(plan, cfg.distill, student, teacher)
    check_pair_shapes(pairs, student, teacher, sample_size=latent_size, sa_point=cfg.distill.sa_point)
    log.info("distilling %d feature pairs (distill=%s)", len(pairs), cfg.distill.name)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    ema = None
    if cfg.ema:  # initialised from the inherited weights
        ema = EMAModel(student.parameters(), decay=cfg.ema_decay, model_cls=UNet2DConditionModel,
                       model_config=student.config, foreach=True)
    optimizer = make_optimizer(cfg.optim, student.parameters())
    lr_scheduler = get_scheduler(  # accelerate steps a prepared scheduler once per process
        cfg.optim.scheduler,
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_steps * accelerator.num_processes,
    )
    student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    if cfg.compile:
        student = torch.compile(student)
    return student, pairs, ema, optimizer, lr_scheduler


def resume(cfg: DictConfig, accelerator: Accelerator, run_dir: Path, ema) -> int:
    """Restore optimizer, LR schedule, RNG (accelerate) and EMA; return the step to continue from."""
    if not cfg.resume:
        return 0
    ckpt = find_checkpoint(run_dir, cfg.resume)
    accelerator.load_state(str(ckpt / "accelerate"))
    if ema is not None:
        ema.load_state_dict(EMAModel.from_pretrained(ckpt / "unet_ema", UNet2DConditionModel).state_dict())
    step = read_state(ckpt)["step"]
    log.info("resumed from %s at step %d", ckpt, step)
    return step


def train(cfg: DictConfig) -> Path:
    """Run (or resume) one distillation; returns the run directory."""
    check_config(cfg)  # before any model is loaded
    accelerator, run_dir = setup_run(cfg)
    device = accelerator.device

    # Frozen parts: SDXL conditioning, the noise schedule and the teacher. The teacher is never prepared.
    conditioner = SDXLConditioner.from_pretrained(
        cfg.teacher.pipeline, vae=cfg.teacher.vae, device=device, dtype=DTYPES[cfg.teacher.dtype]
    )
    noise_scheduler = build_noise_scheduler(cfg.teacher.pipeline)
    sample_t = TimestepSampler(cfg.timesteps, noise_scheduler.config.num_train_timesteps, cfg.teacher.steps,
                               cfg.timestep_jitter)
    teacher = load_teacher(cfg.teacher).to(device)
    student, pairs, ema, optimizer, lr_scheduler = build_student_side(
        cfg, accelerator, teacher, latent_size=cfg.data.resolution // conditioner.vae_scale_factor
    )
    step = resume(cfg, accelerator, run_dir, ema)
    if ema is not None:
        ema.to(device)
    # The loader splits the data by rank itself and skips what was consumed without decoding it; it is not
    # passed to accelerator.prepare, which would re-split or dispatch it.
    loader = build_dataloader(cfg.data, batch_size=cfg.batch_size, seed=cfg.seed, rank=accelerator.process_index,
                              world_size=accelerator.num_processes, resume_batches=step * cfg.grad_accum)
    task = DistillationTask(
        student, teacher, pairs, LossWeights(cfg.distill.task_weight, cfg.distill.out_weight, cfg.distill.feat_weight),
        feature_kind=cfg.distill.loss, sa_point=cfg.distill.sa_point,
    )
    if accelerator.is_main_process:
        accelerator.init_trackers("koala", config=flat_hparams(OmegaConf.to_container(cfg, resolve=True)))
    metrics, skipped = MetricsLog(accelerator, run_dir / "metrics.jsonl"), SkipTally()
    renderer = SampleRenderer(cfg, conditioner, accelerator, run_dir / "samples") if accelerator.is_main_process else None
    if renderer is not None and step == 0 and cfg.sample_every > 0:
        renderer.render_teacher(teacher)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not accelerator.is_main_process, desc="distill")
    last, saved, seen_keys = {}, step, []

    def checkpoint() -> None:
        save_checkpoint(accelerator, run_dir, step, student, ema, {"last": last}, keep=cfg.keep_checkpoints)

    with task, StopSignal() as stop:
        task.train()
        for batch in loader:
            if step >= cfg.max_steps:
                break
            skipped.update(batch)
            if cfg.record_ranks:
                seen_keys += list(batch["keys"])
            with accelerator.accumulate(student):
                cond = conditioner(batch)  # VAE latents + text embeddings (or the cached ones), no grad
                latents = cond["latents"].to(device)
                noise = sample_noise(latents, cfg.noise_offset)
                t = sample_t(latents.shape[0], device)
                noisy = noise_scheduler.add_noise(latents, noise, t)
                target = task_target(noise_scheduler, latents, noise, t)
                snr_w = min_snr_weights(noise_scheduler, t, cfg.snr_gamma) if cfg.snr_gamma else None
                with accelerator.autocast():
                    losses = task(noisy, t, cond, target, sample_weights=snr_w)
                accelerator.backward(losses["loss"])
                if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(student.parameters(), cfg.optim.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            metrics.add(losses, latents.shape[0])
            if not accelerator.sync_gradients:
                continue  # a micro-step of gradient accumulation
            step += 1
            bar.update(1)
            if ema is not None:
                ema.step(accelerator.unwrap_model(student).parameters())
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                skips = {f"skipped/{k}": v for k, v in skipped.totals().items()}
                last = metrics.flush(step, {"lr": lr_scheduler.get_last_lr()[0], **skips})
                bar.set_postfix(loss=f"{last['loss/total']:.4f}", img_s=f"{last['images_per_s']:.1f}")
            if renderer is not None and cfg.sample_every > 0 and step % cfg.sample_every == 0:
                renderer.render_student(accelerator.unwrap_model(student), step)
            if stop.agreed(accelerator):
                log.warning("stop requested: writing a checkpoint at step %d before exiting", step)
                checkpoint()
                saved = step
                break
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                checkpoint()
                saved = step
    if saved != step:  # a finite dataset ran out before max_steps
        checkpoint()
    bar.close()
    if cfg.record_ranks:
        write_rank_record(accelerator, run_dir, seen_keys, accelerator.unwrap_model(student))
    # Every rank waits here before the process group goes (end_training destroys it): without this barrier gloo
    # aborted at exit in about 1 of 6 two-process runs.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


register_configs()


@hydra.main(version_base=None, config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode == RunMode.MULTIRUN:  # one run directory per sweep job: multirun/<name>/<overrides>
        cfg.output_dir = HydraConfig.get().runtime.output_dir
    train(cfg)


if __name__ == "__main__":
    main()
