"""Images from fixed prompts and seeds during training: the student every `sample_every` steps, the teacher once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from koala.data.conditioning import SDXLConditioner, conditioning_dtype
from koala.devices import DTYPES
from koala.models.pipeline_parts import PipelineSource
from koala.rng import rng_preserved
from koala.ship.presets import get_preset
from koala.ship.sampling import generate, make_grid
from koala.train.sharding import plain_student

if TYPE_CHECKING:
    from accelerate import Accelerator

    from koala.config.schema import TrainConfig


class SampleRenderer:
    """Renders the config's sample prompts with fixed seeds through a stock SDXL pipeline around any U-Net, and
    decides when: the teacher before the first step, the student every `sample_every` steps (0: never).

    Every rank holds one (under FSDP the student is gathered by all of them); only the main process renders. It
    reuses the conditioner's text encoders and VAE; a run on cached conditioning holds none, so they are loaded
    for each rendering and freed after it (not held through training). The teacher kind picks the sampling preset
    (steps, guidance, timestep spacing) exactly as exported students use it.
    """

    def __init__(self, cfg: TrainConfig, conditioner, accelerator: Accelerator, out_dir: Path):
        self.every = cfg.sample_every
        self.renders = accelerator.is_main_process and self.every > 0
        self.prompts = list(cfg.sample_prompts)
        self.seed = cfg.sample_seed
        self.size = cfg.data.resolution
        self.preset = get_preset(cfg.teacher.kind)
        self.steps = cfg.sample_steps  # None: the preset's
        if self.renders:
            self.scheduler = EulerDiscreteScheduler.from_config(
                PipelineSource.of(cfg.teacher).component_config("scheduler")
            )
        self.conditioner = conditioner
        self.teacher = cfg.teacher  # where the text encoders and VAE are, when the conditioner holds none
        self.text_dtype = DTYPES[conditioning_dtype(cfg, accelerator.device)]  # and their precision then
        self.accelerator = accelerator
        self.out_dir = out_dir

    @torch.no_grad()
    def render(self, unet, name: str, step: int = 0) -> Path:
        """One image per prompt (seed = sample_seed + index) as a grid PNG, also sent to tensorboard."""
        c = (
            self.conditioner
            if isinstance(self.conditioner, SDXLConditioner)
            else SDXLConditioner.from_pretrained(
                self.teacher.pipeline,
                vae=self.teacher.vae,
                device=self.accelerator.device,
                dtype=self.text_dtype,
                config=self.teacher.config,
            )
        )
        pipe = StableDiffusionXLPipeline(
            vae=c.vae,
            text_encoder=c.text_encoders[0],
            text_encoder_2=c.text_encoders[1],
            tokenizer=c.tokenizers[0],
            tokenizer_2=c.tokenizers[1],
            unet=unet,
            scheduler=self.scheduler,
        )
        pipe.set_progress_bar_config(disable=True)
        was_training = unet.training
        unet.eval()
        with rng_preserved():
            # seeded generators draw the images; fork_rng keeps sampling from moving the training RNG regardless
            images = generate(
                pipe, self.prompts, self.preset, seeds=self.seed, steps=self.steps, height=self.size, width=self.size
            )
        unet.train(was_training)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{name}.png"
        grid = make_grid(images, cols=len(images))
        grid.save(path)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(f"samples/{name.split('-')[0]}", np.asarray(grid), step, dataformats="HWC")
        return path

    def render_teacher(self, teacher, step: int) -> Path | None:
        """The teacher's grid, once: before the first step of a run (not on resume)."""
        return self.render(teacher, "teacher") if self.renders and step == 0 else None

    def render_student(self, student, step: int) -> Path | None:
        """The (prepared) student's grid at a finished `step` when one is due; every rank must call it."""
        if self.every <= 0 or step % self.every:
            return None
        unet = plain_student(self.accelerator, student)  # every rank: a gather under FSDP
        return self.render(unet.to(self.accelerator.device), f"student-{step:08d}", step) if self.renders else None
