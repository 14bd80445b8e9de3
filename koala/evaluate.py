"""`[accelerate launch] python -m koala.evaluate protocol=<preset> models='{<name>: <pipeline>, ...}' weights.<w>=<file>`.

Evaluates local SDXL pipelines (student, teacher, any other) on a published protocol (configs/protocol/: coco30k-bksdm,
coco30k-torchmetrics, mjhq30k, hpsv2, custom): every rank samples its share of the prompts (koala.evaluation.generation), rank 0 writes
the manifests, computes the protocol's metrics from local safetensors weights (koala.evaluation.registry) and writes
results.json, results.md and image grids under `out`, then prints the table. Prompt files, reference images and
metric weights are all checked before any model loads.

`python -m koala.evaluate convert=<inception|hps|open_clip|pickscore|clip> src=<original> out=<target> [tokenizer=<dir>]`
turns a metric's original pickled weights into safetensors once (torch.load with weights_only=True).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from koala.config.compose import run_command
from koala.devices import multi_cpu
from koala.evaluation.generation import generate_share, share, write_manifest, write_share_record
from koala.evaluation.inception import FidInput
from koala.evaluation.prompts import read_prompt_set
from koala.evaluation.registry import MetricContext, MetricName, build_metric, check_metrics
from koala.evaluation.report import write_grids, write_report
from koala.evaluation.weights import CONVERTERS, Converter
from koala.generate import PipelineDType, load_pipeline
from koala.ship.presets import PresetName, get_preset


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
    preset: PresetName = PresetName.v1
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


def _preset(cfg: Any, name: str) -> str:
    """The sampling preset of one model."""
    return (cfg.presets or {}).get(name, cfg.preset)


def check_inputs(cfg: Any) -> tuple[list[tuple[str, Optional[str]]], dict[str, Path]]:
    """Everything a run needs, checked before any model loads: models, presets, prompts, metric weights, reference."""
    if not cfg.models or not hasattr(cfg.models, "items"):
        raise SystemExit(
            "usage: python -m koala.evaluate protocol=<coco30k-bksdm|coco30k-torchmetrics|mjhq30k|hpsv2|custom> "
            "models='{<name>: <pipeline folder>, ...}' weights.<inception|clip|hps|pickscore>=... "
            f"(got models={cfg.models})"
        )
    for name, path in cfg.models.items():
        if not (Path(path) / "model_index.json").is_file():
            raise FileNotFoundError(f"models.{name}={path} is not a diffusers pipeline folder (no model_index.json)")
        get_preset(_preset(cfg, name))
    pairs = read_prompt_set(cfg.protocol.prompts)[: cfg.limit or None]
    return pairs, check_metrics(cfg.protocol.metrics, cfg.weights, cfg.protocol)


def default_out(cfg: Any) -> Path:
    """<run>/eval/<protocol> when the first model is a run's `export` folder, else eval/<protocol>."""
    first = Path(next(iter(cfg.models.values())))
    return (first.parent if first.name == "export" else Path()) / "eval" / cfg.protocol.name


def _distributed():
    """accelerate's process state; several processes and no GPU need cpu=True to get gloo (MULTI_CPU)."""
    from accelerate import PartialState

    return PartialState(cpu=multi_cpu())


def generate_all(cfg: Any, pairs: list, out: Path, state: Any) -> None:
    """Every model samples this rank's share of the prompts into out/<model>/images."""
    device = cfg.device or str(state.device)
    prompts = [p for p, _ in pairs]
    indices = share(len(pairs), state.process_index, state.num_processes)
    for name, path in cfg.models.items():
        pipe = load_pipeline(path, device, cfg.dtype)
        record = generate_share(
            pipe,
            prompts,
            indices,
            out / name / "images",
            _preset(cfg, name),
            cfg.seed,
            cfg.batch_size,
            steps=cfg.steps,
            guidance=cfg.guidance,
            height=cfg.protocol.height,
            width=cfg.protocol.width,
            model=str(path),
        )
        write_share_record(out / name, state.process_index, state.num_processes, record)
        del pipe


def evaluate(cfg: Any) -> dict[str, Any]:
    """Sample every model on the protocol's prompts (split across ranks) and score them on rank 0."""
    pairs, weights = check_inputs(cfg)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    state = _distributed()
    generate_all(cfg, pairs, out, state)
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    samples = {name: write_manifest(out / name, pairs, cfg.seed) for name in cfg.models}
    ctx = MetricContext(cfg.device or str(state.device), cfg.protocol, out)
    results: dict[str, dict[str, float]] = {name: {} for name in cfg.models}
    for metric_name, path in weights.items():
        metric = build_metric(metric_name, path, ctx)
        for name, rows in samples.items():
            results[name].update(metric(rows))
        del metric
    meta = {
        "protocol": cfg.protocol.name,
        "prompts": len(pairs),
        "seed": cfg.seed,
        "processes": state.num_processes,
        "models": dict(cfg.models),
        "presets": {n: _preset(cfg, n) for n in cfg.models},
        "image_size": cfg.protocol.image_size,
        "jpeg": cfg.protocol.jpeg,
        "fid_input": str(cfg.protocol.fid_input),
        "weights": {k: str(v) for k, v in weights.items()},
    }
    table = write_report(out, results, meta)
    write_grids(out, samples, cfg.grid)
    print(table)
    return {"out": str(out), **meta, "results": results}


def convert(cfg: Any) -> Path:
    """One-time conversion of a metric's original (pickled) weights to safetensors."""
    if not cfg.src or not cfg.out:
        raise SystemExit(
            f"usage: python -m koala.evaluate convert=<{'|'.join(CONVERTERS)}> src=<original> "
            "out=<target> [tokenizer=<CLIP tokenizer folder>]"
        )
    kwargs = {"tokenizer": cfg.tokenizer} if cfg.convert != "inception" else {}
    path = CONVERTERS[cfg.convert](cfg.src, cfg.out, **kwargs)
    print(f"wrote {path}")
    return path


def evaluate_command(cfg: Any) -> dict[str, Any] | Path:
    """Convert weights or evaluate, as a composed `evaluate` config asks."""
    return convert(cfg) if cfg.convert else evaluate(cfg)


def main(argv: list[str] | None = None) -> dict[str, Any] | Path:
    """CLI: compose `configs/evaluate.yaml` with key=value overrides, then convert or evaluate."""
    return run_command("evaluate", evaluate_command, argv)


if __name__ == "__main__":
    main()
