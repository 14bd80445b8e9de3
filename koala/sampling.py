"""Images from fixed prompts and seeds during training: the student every N steps, the teacher once."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image


def make_grid(images: list[Image.Image], cols: int) -> Image.Image:
    """Paste equally sized images into a grid, row by row."""
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


class SampleRenderer:
    """Renders the config's sample prompts with fixed seeds through a stock SDXL pipeline around any U-Net."""

    def __init__(self, cfg, conditioner, accelerator, out_dir: Path):
        self.prompts = list(cfg.sample_prompts)
        self.seed = cfg.sample_seed
        self.steps = cfg.teacher.inference_steps
        self.guidance = cfg.teacher.guidance_scale
        self.size = cfg.data.resolution
        self.scheduler = EulerDiscreteScheduler.from_pretrained(cfg.teacher.pipeline, subfolder="scheduler")
        if cfg.teacher.kind in ("lightning", "turbo"):
            self.scheduler = EulerDiscreteScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
        self.conditioner = conditioner
        self.accelerator = accelerator
        self.out_dir = out_dir

    @torch.no_grad()
    def render(self, unet, name: str, step: int = 0) -> Path:
        """One image per prompt, seed = sample_seed + index; saved as a grid PNG and sent to the trackers."""
        c = self.conditioner
        pipe = StableDiffusionXLPipeline(
            vae=c.vae, text_encoder=c.text_encoders[0], text_encoder_2=c.text_encoders[1],
            tokenizer=c.tokenizers[0], tokenizer_2=c.tokenizers[1], unet=unet, scheduler=self.scheduler,
        )
        pipe.set_progress_bar_config(disable=True)
        was_training = unet.training
        unet.eval()
        images = [
            pipe(p, num_inference_steps=self.steps, guidance_scale=self.guidance, height=self.size, width=self.size,
                 generator=torch.Generator("cpu").manual_seed(self.seed + i)).images[0]
            for i, p in enumerate(self.prompts)
        ]
        unet.train(was_training)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{name}.png"
        grid = make_grid(images, cols=len(images))
        grid.save(path)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image(f"samples/{name.split('-')[0]}", np.asarray(grid), step, dataformats="HWC")
        return path

    def render_teacher(self, teacher) -> Path:
        return self.render(teacher, "teacher")

    def render_student(self, student, step: int) -> Path:
        return self.render(student, f"student-{step:08d}", step)
