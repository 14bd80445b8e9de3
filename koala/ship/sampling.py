"""Sampling a stock diffusers SDXL pipeline: the code behind `koala.generate`, training samples and evaluations.

Images are seeded one by one (image i of the prompt list gets `seed + i`), so a teacher and a student sampled with
the same prompts and seed start from the same noise and can be compared image for image. The preset (koala.ship.
presets) sets steps, guidance and timestep spacing; latents are decoded in the VAE's own dtype; `make_grid` and
`save_images` tile and write the pictures.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from koala.choice import Choice
from koala.devices import DTYPES, parse_dtype, pick_device
from koala.ship.presets import Preset, get_preset, preset_scheduler

PipelineDType = Choice("PipelineDType", ["auto", *DTYPES])  # auto: fp16 on cuda, fp32 elsewhere


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """A torch dtype by name; `auto` is fp16 on cuda and fp32 elsewhere."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


def load_pipeline(model: str | Path, device: str | None = None, dtype: str = "auto") -> StableDiffusionXLPipeline:
    """Load a local SDXL pipeline folder (safetensors only) onto a device."""
    if not (Path(model) / "model_index.json").is_file():
        raise FileNotFoundError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
    device = pick_device(device)
    pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=pick_dtype(dtype, device), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file, one per line; blank lines and lines starting with # are skipped."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def generate(
    pipeline: StableDiffusionXLPipeline,
    prompts: Sequence[str],
    preset: str | Preset = "base",
    seeds: int | Sequence[int] = 0,
    negative_prompt: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
) -> list[Image.Image]:
    """One image per prompt; image i is drawn from its own generator seeded `seeds[i]` (or `seeds + i`)."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    seeds = [seeds + i for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    pipeline.scheduler = preset_scheduler(pipeline.scheduler.config, preset)
    device = pipeline._execution_device
    guidance = preset.guidance if guidance is None else guidance
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds[start : start + batch_size]]
        with inputs_in_dtype_of(pipeline.unet):
            latents = pipeline(
                prompt=batch,
                negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
                num_inference_steps=steps or preset.steps,
                guidance_scale=guidance,
                height=height,
                width=width,
                generator=generators,
                output_type="latent",
            ).images
        images += decode_latents(pipeline, latents)
    return images


def _cast(value, dtype: torch.dtype):
    """Floating tensors (also inside dicts) -> dtype; everything else as it is."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


@contextlib.contextmanager
def inputs_in_dtype_of(unet: torch.nn.Module):
    """Cast every floating input of `unet` to its own dtype while sampling.

    The SDXL pipeline draws latents and time ids in the text encoders' dtype, so a U-Net whose dtype differs (an fp32
    student beside bf16 text encoders, as in a mixed-precision run) could not sample at all without this.
    """
    dtype = unet.dtype

    def cast_inputs(module, args, kwargs):
        """Every floating input in the U-Net's dtype, but time ids fp32 (koala.models.forward.unet_forward)."""
        added = kwargs.get("added_cond_kwargs") or {}
        time_ids = added.get("time_ids")
        args, kwargs = tuple(_cast(a, dtype) for a in args), _cast(kwargs, dtype)
        if time_ids is not None:
            kwargs["added_cond_kwargs"]["time_ids"] = time_ids.float()
        return args, kwargs

    hook = unet.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    try:
        yield
    finally:
        hook.remove()


@torch.no_grad()
def decode_latents(pipeline, latents: torch.Tensor) -> list[Image.Image]:
    """Latents -> PIL images through the pipeline's VAE in the VAE's own dtype (an fp16 VAE that must be upcast, as
    SDXL's, decodes in fp32), whatever dtype the U-Net sampled in."""
    vae = pipeline.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    dtype = torch.float32 if upcast else vae.dtype
    if upcast:
        vae.to(torch.float32)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    latents = latents.to(vae.device, dtype)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        latents = latents * torch.tensor(std).view(shape).to(latents) / vae.config.scaling_factor + torch.tensor(
            mean
        ).view(shape).to(latents)
    else:
        latents = latents / vae.config.scaling_factor
    image = vae.decode(latents, return_dict=False)[0]
    if upcast:
        vae.to(torch.float16)
    if getattr(pipeline, "watermark", None) is not None:
        image = pipeline.watermark.apply_watermark(image)
    return pipeline.image_processor.postprocess(image, output_type="pil")


def make_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images (of the first image's size) into rows of `cols`, about square by default."""
    if not images:
        raise ValueError("no images to put in a grid")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid


def save_images(
    images: Sequence[Image.Image], prompts: Sequence[str], seeds: Sequence[int], out: Path, cols=None
) -> Path:
    """Write numbered PNGs, grid.png and index.json (prompt and seed of each file) to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for i, (img, prompt, seed) in enumerate(zip(images, prompts, seeds)):
        name = f"{i:04d}-seed{seed}.png"
        img.save(out / name)
        index.append({"file": name, "prompt": prompt, "seed": seed})
    make_grid(images, cols).save(out / "grid.png")
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return out
