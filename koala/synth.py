"""`python -m koala.synth teacher=<teacher> prompts=<file|folder|shards> license=<licence> [out=...]`: distil from
prompts instead of a dataset.

The teacher samples every prompt with its own preset (steps, guidance, scheduler: koala.ship.presets) and the result
is written as a latent cache (final latents, text embeddings, time ids, a JPEG preview, and per sample the prompt,
seed, settings, teacher identity and licence) that `data=synth data.path=<out>` trains from. Runs under
`accelerate launch` (each rank draws a disjoint share) and resumes after an interruption. See koala/data/synth.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from koala.config.compose import run_command
from koala.config.schema import TeacherConfig
from koala.data.synth import synthesize
from koala.devices import DType
from koala.models.identity import IdentityMode


@dataclass
class SynthConfig:
    """Settings of `python -m koala.synth` (configs/synth.yaml); null sampling fields take the teacher's preset."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    prompts: Optional[str] = None  # .txt (one per line) | .csv | .json | .jsonl | .parquet | a folder | shards
    license: Optional[str] = None  # required: the licence of the teacher's outputs, recorded in every sample
    out: str = ".cache/koala/synth/${teacher.name}"  # where data=synth reads by default
    column: Optional[str] = None  # csv / json / jsonl / parquet: the prompt field (null: prompt, caption or text)
    caption_key: str = "txt"  # shards: the caption member (txt, or json.<field>)
    per_prompt: int = 1  # samples per prompt (seeds seed + index)
    limit: Optional[int] = None  # draw only the first `limit` items
    seed: int = 0  # item i (prompt i // per_prompt) is seeded seed + i
    steps: Optional[int] = None  # null: teacher.steps
    guidance: Optional[float] = None  # null: the teacher kind's (base 7.5; lightning, turbo 0)
    negative_prompt: Optional[str] = None  # null: zeros, as the stock SDXL pipeline
    resolution: Optional[int] = None  # square side in pixels; null: the teacher's default
    batch_size: int = 8  # items sampled together
    samples_per_shard: int = 256  # also what an interruption can cost: an unfinished shard is drawn again
    dtype: DType = DType.fp16  # storage precision of latents and embeddings (time ids stay fp32)
    preview: int = 256  # long side of the JPEG preview in pixels; 0: none
    identity: IdentityMode = IdentityMode.sha256  # sha256 (every byte) | header (safetensors headers + sizes)
    device: str = "auto"  # auto (this rank's accelerator, else cpu) | cpu | cuda:N


def main(argv: list[str] | None = None) -> Path:
    """CLI: compose `configs/synth.yaml` with the overrides and draw the samples."""
    return run_command("synth", synthesize, argv, schema=SynthConfig)


if __name__ == "__main__":
    main()
