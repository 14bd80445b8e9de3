"""`python -m koala.export run_dir=<run> [checkpoint=latest] [ema=true] [fp16=false] [out=<run>/export]`.

Turns a training checkpoint into a stock diffusers SDXL pipeline folder that loads with
`StableDiffusionXLPipeline.from_pretrained(out)` and no project code, and beside it
`<name>-checkpoint.safetensors`, the whole pipeline as one original-layout checkpoint for ComfyUI's Load Checkpoint,
A1111 and diffusers' `from_single_file` (koala/ship/export.py: what is written, and when an existing `out` may be
replaced; koala/ship/checkpoint_file.py: the single file and ComfyUI's detection).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from koala.config.compose import run_command
from koala.devices import DType
from koala.errors import ConfigError
from koala.ship.export import REFUSALS, export_run


@dataclass
class ExportConfig:
    """Settings of `python -m koala.export`."""

    run_dir: Optional[str] = None
    checkpoint: str = "latest"  # latest | step-00000100 | 100 | a checkpoint folder
    ema: bool = True  # export unet_ema/ (else unet/)
    fp16: bool = False  # also write an fp16 variant (variant="fp16")
    single_file: bool = True  # also write unet.safetensors in the original SDXL layout (ComfyUI-style loaders)
    full_checkpoint: bool = True  # also write <name>-checkpoint.safetensors: U-Net + text encoders + VAE, one file
    full_checkpoint_dtype: DType = DType.fp16  # fp16 (as SDXL's own checkpoint) | fp32 | bf16
    out: Optional[str] = None  # default <run_dir>/export


def export_command(cfg: ExportConfig) -> Path:
    """Export the run a composed `export` config names."""
    if not cfg.run_dir:
        raise SystemExit(
            "usage: python -m koala.export run_dir=<run> [checkpoint=latest] [ema=true] [fp16=false] [out=...]"
        )
    try:
        out = export_run(
            cfg.run_dir, checkpoint=cfg.checkpoint, ema=cfg.ema, out=cfg.out, fp16=cfg.fp16, single_file=cfg.single_file,
            full_checkpoint=str(cfg.full_checkpoint_dtype) if cfg.full_checkpoint else None,
        )  # fmt: skip
    except REFUSALS as e:  # what was named cannot be exported: one `error:` line, exit status 2
        raise ConfigError(str(e).replace("\n", " ")) from e
    print(f"exported {cfg.run_dir} -> {out}")
    return out


def main(argv: list[str] | None = None) -> Path:
    """CLI: compose `configs/export.yaml` with key=value overrides and export."""
    return run_command("export", export_command, argv, schema=ExportConfig)


if __name__ == "__main__":
    main()
