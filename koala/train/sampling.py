"""Images from fixed prompts and seeds during training: the student every N steps, the teacher once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from koala.data.conditioning import SDXLConditioner, conditioning_dtype
from koala.devices import DTYPES
from koala.generate import generate, make_grid
from koala.ship.presets import preset_for_kind
from koala.train.rng import rng_preserved


class SampleRenderer:
    """Renders the config's sample prompts with fixed seeds through a stock SDXL pipeline around any U-Net.

    It reuses the conditioner's text encoders and VAE; a run on cached conditioning holds none, so they are loaded
    for each rendering and freed after it (not held through training). The teacher kind picks the sampling preset
    (steps, guidance, timestep spacing) exactly as exported students use it.
    """

    def __init__(self, cfg, conditioner, accelerator, out_dir: Path):
        self.prompts = list(cfg.sample_prompts)
        self.seed = cfg.sample_seed
        self.size = cfg.data.resolution
        self.preset = preset_for_kind(cfg.teacher.kind)
        self.steps = cfg.sample_steps  # None: the preset's
        self.scheduler = EulerDiscreteScheduler.from_pretrained(cfg.teacher.pipeline, subfolder="scheduler")
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

    def render_teacher(self, teacher) -> Path:
        return self.render(teacher, "teacher")

    def render_student(self, student, step: int) -> Path:
        return self.render(student, f"student-{step:08d}", step)
