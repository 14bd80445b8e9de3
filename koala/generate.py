"""`python -m koala.generate model=<pipeline folder> prompt="..." | prompts=<file> [preset=base|lightning|turbo]`.

Writes numbered PNGs, grid.png and index.json (prompt and seed of each file); sampling, seeding (image i gets
`seed + i`) and decoding live in koala/ship/sampling.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from koala.config.compose import run_command
from koala.ship.presets import PresetName
from koala.ship.sampling import PipelineDType, generate, load_pipeline, read_prompts, save_images


@dataclass
class GenerateConfig:
    """Settings of `python -m koala.generate`; null sampling fields take the preset's value."""

    model: Optional[str] = None  # a diffusers SDXL pipeline folder (e.g. <run>/export)
    prompt: Optional[str] = None
    prompts: Optional[str] = None  # a text file: one prompt per line (blank lines and # comments skipped)
    preset: PresetName = PresetName.base  # base | lightning | turbo
    seed: int = 0  # image i gets seed + i
    negative_prompt: Optional[str] = None
    batch_size: int = 1
    dtype: PipelineDType = PipelineDType.auto  # auto (fp16 on cuda, fp32 on cpu) | fp32 | fp16 | bf16
    device: Optional[str] = None  # default: cuda when available
    steps: Optional[int] = None
    guidance: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    cols: Optional[int] = None  # grid columns (default: about square)
    out: Optional[str] = None  # default samples/<model folder name>-<preset>


def generate_command(cfg: GenerateConfig) -> Path:
    """Sample what a composed `generate` config asks for and write the images."""
    if not cfg.model or bool(cfg.prompt) == bool(cfg.prompts):
        raise SystemExit(
            'usage: python -m koala.generate model=<pipeline folder> (prompt="..." | prompts=<file>) [...]'
        )
    prompts = [cfg.prompt] if cfg.prompt else read_prompts(cfg.prompts)
    seeds = [cfg.seed + i for i in range(len(prompts))]
    pipe = load_pipeline(cfg.model, cfg.device, cfg.dtype)
    images = generate(
        pipe,
        prompts,
        cfg.preset,
        seeds,
        cfg.negative_prompt,
        cfg.steps,
        cfg.guidance,
        cfg.height,
        cfg.width,
        cfg.batch_size,
    )
    out = Path(cfg.out or f"samples/{Path(cfg.model).resolve().name}-{cfg.preset}")
    save_images(images, prompts, seeds, out, cfg.cols)
    print(f"wrote {len(images)} images and grid.png to {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    """CLI: compose `configs/generate.yaml` with key=value overrides, sample and write the images."""
    return run_command("generate", generate_command, argv, schema=GenerateConfig)


if __name__ == "__main__":
    main()
