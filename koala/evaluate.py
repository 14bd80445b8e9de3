"""`[accelerate launch] python -m koala.evaluate protocol=<preset> models='{<name>: <pipeline>, ...}' weights.<w>=<file>`.

Evaluates local SDXL pipelines (student, teacher, any other) on a published protocol (configs/protocol/: coco30k-bksdm,
coco30k-torchmetrics, mjhq30k, hpsv2, custom): every rank samples its share of the prompts, rank 0 computes the protocol's metrics and
writes results.json, results.md and image grids under `out`, then prints the table (koala/evaluation/runner.py).
Prompt files, reference images and metric weights are all checked before any model loads.

`python -m koala.evaluate convert=<inception|hps|open_clip|pickscore|clip> src=<original> out=<target> [tokenizer=<dir>]`
turns a metric's original pickled weights into safetensors once (torch.load with weights_only=True).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from koala.config.compose import run_command
from koala.evaluation.inception import FidInput
from koala.evaluation.registry import MetricName
from koala.evaluation.runner import convert, evaluate
from koala.evaluation.weights import Converter
from koala.ship.presets import PresetName
from koala.ship.sampling import PipelineDType


@dataclass
class ProtocolConfig:
    """A published evaluation protocol: prompts, reference images, metrics, image sizes (configs/protocol/)."""

    name: str = "custom"
    prompts: Optional[str] = None  # prompt file (.txt/.json/.csv) or folder of per-style files; supplied by the user
    reference: Optional[str] = None  # real images (folder) or their FID statistics (.npz with mu, sigma)
    metrics: list[MetricName] = field(
        default_factory=lambda: [MetricName.clip_score]
    )  # koala.evaluation.registry.METRICS
    # squash every scored image (generated and reference) to image_size x image_size, PIL bicubic (BK-SDM: 256)
    image_size: Optional[int] = None
    jpeg: Optional[int] = None  # JPEG round trips at this quality as BK-SDM makes them (koala.evaluation.images): 75
    fid_input: FidInput = FidInput["torch-fidelity"]  # how images reach the FID Inception: torch-fidelity | pytorch-fid
    # what a .npz reference without koala's record was extracted with (koala.evaluation.extractor), e.g.
    # inception-2015-12-05/pytorch-fid/256/jpeg75 for BK-SDM's real_im256.npz
    reference_extractor: Optional[str] = None
    height: Optional[int] = None  # sampling size (null: the pipeline's default, 1024 for SDXL)
    width: Optional[int] = None


@dataclass
class WeightsConfig:
    """Local metric weights (safetensors), written once by `convert=<kind>`."""

    inception: Optional[str] = None  # FID Inception .safetensors (convert=inception)
    clip: Optional[str] = None  # transformers CLIPModel folder for clip_score / fd_clip
    hps: Optional[str] = None  # HPSv2.1 as a CLIPModel folder (convert=hps)
    pickscore: Optional[str] = None  # PickScore_v1 CLIPModel folder (convert=pickscore when it holds a .bin)


@dataclass
class EvaluateConfig:
    """Settings of `python -m koala.evaluate`; sampling settings as in koala.generate."""

    models: Any = None  # name -> local diffusers SDXL pipeline folder: models={student: ..}
    # name -> sampling preset where not `preset`: presets={teacher: ..}; untyped (a typed dict takes no new keys
    # from an override in struct mode), so check_inputs checks the names
    presets: Any = None
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    limit: Optional[int] = None  # first N prompts only (smoke runs)
    preset: PresetName = PresetName.base
    seed: int = 0  # prompt i gets seed + i
    steps: Optional[int] = None
    guidance: Optional[float] = None
    batch_size: int = 1
    device: Optional[str] = None  # default: this rank's accelerator device
    dtype: PipelineDType = PipelineDType.auto
    grid: int = 8  # images per model in the grids
    out: Optional[str] = None  # default <run>/eval/<protocol.name> for a model <run>/export, else eval/<protocol.name>
    # one-time weight conversion instead of an evaluation: inception | hps | open_clip | pickscore | clip
    convert: Optional[Converter] = None
    src: Optional[str] = None  # convert: the original file or folder
    tokenizer: Optional[str] = None  # convert: a CLIP tokenizer folder to copy beside converted CLIP weights


def evaluate_command(cfg: EvaluateConfig) -> dict[str, Any] | Path:
    """Convert weights or evaluate, as a composed `evaluate` config asks."""
    return convert(cfg) if cfg.convert else evaluate(cfg)


def main(argv: list[str] | None = None) -> dict[str, Any] | Path:
    """CLI: compose `configs/evaluate.yaml` with key=value overrides, then convert or evaluate."""
    return run_command("evaluate", evaluate_command, argv, schema=EvaluateConfig)


if __name__ == "__main__":
    main()
