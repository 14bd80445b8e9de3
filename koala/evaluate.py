"""`python -m koala.evaluate model=<pipeline> [compare=<pipeline>] prompts=<file> [reference=<images>] metrics.clip=<dir>`.

Samples every prompt once per model with the same per-image seeds (koala.generate), then reports CLIP score and
Fréchet distance of CLIP image features (FD-CLIP; see koala.metrics for why not Inception-FID) against a reference
image folder, and between the two models when `compare` is given. Metric weights are checked before any sampling.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from koala.generate import generate, load_pipeline, pick_device, read_prompts, save_images
from koala.metrics import ClipScorer, feature_stats, frechet_distance, load_images


@dataclass
class MetricsConfig:
    """Local metric weights."""

    clip: Optional[str] = None  # a transformers CLIPModel folder (safetensors): CLIP score and FD-CLIP features
    fid: str = "clip"  # feature model of the Fréchet distance: `clip` (metrics.clip) or another local CLIP folder


@dataclass
class EvaluateConfig:
    """Settings of `python -m koala.evaluate`; sampling settings as in koala.generate."""

    model: Optional[str] = None
    compare: Optional[str] = None  # a second pipeline (e.g. the teacher) sampled on the same prompts and seeds
    prompts: Optional[str] = None
    reference: Optional[str] = None  # real images for the Fréchet distance
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    preset: str = "v1"
    compare_preset: Optional[str] = None  # default: preset
    seed: int = 0
    steps: Optional[int] = None
    guidance: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    batch_size: int = 1
    device: Optional[str] = None
    dtype: str = "auto"
    out: Optional[str] = None  # default eval/<model folder name>


def sample_model(model: str, prompts: list[str], seeds: list[int], preset: str, cfg: Any) -> list:
    """Load one pipeline, sample the prompt set, and free it."""
    pipe = load_pipeline(model, cfg.device, cfg.dtype)
    images = generate(pipe, prompts, preset, seeds, steps=cfg.steps, guidance=cfg.guidance,
                      height=cfg.height, width=cfg.width, batch_size=cfg.batch_size)
    del pipe
    return images


def score_sets(
    sets: dict[str, list], prompts: list[str], clip: ClipScorer, fid: ClipScorer, reference: list | None
) -> dict[str, Any]:
    """CLIP score per image set, FD-CLIP to the reference set, and FD-CLIP between the first two sets."""
    results: dict[str, Any] = {}
    stats = {name: feature_stats(fid.image_features(images)) for name, images in sets.items()}
    ref_stats = feature_stats(fid.image_features(reference)) if reference else None
    for name, images in sets.items():
        results[name] = {"clip_score": clip.clip_score(images, prompts)}
        if ref_stats is not None:
            results[name]["fd_clip_to_reference"] = frechet_distance(*stats[name], *ref_stats)
    if len(sets) == 2:
        a, b = sets
        results["fd_clip_between_models"] = frechet_distance(*stats[a], *stats[b])
    return results


def evaluate(cfg: Any) -> dict[str, Any]:
    """Sample the model (and `compare`) on the prompt set and score the images; returns the results."""
    if not cfg.model or not cfg.prompts:
        raise SystemExit("usage: python -m koala.evaluate model=<pipeline> prompts=<file> metrics.clip=<CLIP folder> "
                         "[compare=<pipeline>] [reference=<image folder>]")
    device = pick_device(cfg.device)
    clip = ClipScorer(cfg.metrics.clip, device)  # fails with the list of needed files before any sampling
    fid = clip if cfg.metrics.fid == "clip" else ClipScorer(cfg.metrics.fid, device)
    prompts = read_prompts(cfg.prompts)
    seeds = [cfg.seed + i for i in range(len(prompts))]
    reference = load_images(cfg.reference) if cfg.reference else None
    out = Path(cfg.out or f"eval/{Path(cfg.model).resolve().name}")
    sets = {"model": sample_model(cfg.model, prompts, seeds, cfg.preset, cfg)}
    if cfg.compare:
        sets["compare"] = sample_model(cfg.compare, prompts, seeds, cfg.compare_preset or cfg.preset, cfg)
    for name, images in sets.items():
        save_images(images, prompts, seeds, out / name)
    results = {
        "model": cfg.model,
        "compare": cfg.compare,
        "prompts": len(prompts),
        "seeds": [seeds[0], seeds[-1]],
        "fd_features": f"CLIP image embeddings ({cfg.metrics.fid})",
        **score_sets(sets, prompts, clip, fid, reference),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(results, indent=1))
    return results


ConfigStore.instance().store(name="koala_evaluate", node=EvaluateConfig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """CLI: compose `configs/evaluate.yaml` with key=value overrides, evaluate, print the results."""
    from koala.hydra_utils import compose_config

    results = evaluate(compose_config("evaluate", sys.argv[1:] if argv is None else argv))
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
