"""Evaluate local SDXL pipelines on a protocol (the library behind `koala.evaluate`).

`check_inputs` checks everything a run needs before any model loads (models, presets, prompts, metric weights,
reference); `evaluate` has every rank sample its share of the prompts (koala.evaluation.generation), then rank 0
writes the manifests, computes the protocol's metrics from local safetensors weights (koala.evaluation.registry)
and writes results.json, results.md and image grids; `convert` turns a metric's original weights into safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from koala.devices import multi_cpu
from koala.evaluation.generation import generate_share, share, write_manifest, write_share_record
from koala.evaluation.prompts import read_prompt_set
from koala.evaluation.registry import MetricContext, build_metric, check_metrics
from koala.evaluation.report import write_grids, write_report
from koala.evaluation.weights import CONVERTERS
from koala.ship.presets import get_preset
from koala.ship.sampling import load_pipeline

if TYPE_CHECKING:
    from koala.evaluate import EvaluateConfig


def _preset(cfg: EvaluateConfig, name: str) -> str:
    """The sampling preset of one model."""
    return (cfg.presets or {}).get(name, cfg.preset)


def check_inputs(cfg: EvaluateConfig) -> tuple[list[tuple[str, Optional[str]]], dict[str, Path]]:
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


def default_out(cfg: EvaluateConfig) -> Path:
    """<run>/eval/<protocol> when the first model is a run's `export` folder, else eval/<protocol>."""
    first = Path(next(iter(cfg.models.values())))
    return (first.parent if first.name == "export" else Path()) / "eval" / cfg.protocol.name


def _distributed():
    """accelerate's process state; several processes and no GPU need cpu=True to get gloo (MULTI_CPU)."""
    from accelerate import PartialState

    return PartialState(cpu=multi_cpu())


def generate_all(cfg: EvaluateConfig, pairs: list, out: Path, state: Any) -> None:
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


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
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


def convert(cfg: EvaluateConfig) -> Path:
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
