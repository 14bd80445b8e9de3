"""The metric registry: every metric is a name, the weights it needs, a check run before any model loads, and a
builder. A built metric maps a list of generated samples (image file, prompt, style) to named numbers.

Add a metric (a toy-world scorer, another preference model) by registering one more `MetricEntry`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch
from PIL import Image

from koala.choice import Choice
from koala.evaluation.extractor import INCEPTION, Extractor, check_stats, read_stats, write_stats
from koala.evaluation.images import NO_PREP, ImagePrep, image_batches
from koala.evaluation.metrics import ClipScorer, feature_stats, frechet_distance, frechet_distance_of_features
from koala.evaluation.weights import check_clip_model, check_safetensors

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


@dataclass(frozen=True)
class Sample:
    """One generated image and what it was generated from."""

    file: Path
    prompt: str
    style: Optional[str] = None


class Metric(Protocol):
    """A built metric: samples -> {name: value}."""

    def __call__(self, samples: Sequence[Sample]) -> dict[str, float]: ...


@dataclass(frozen=True)
class MetricContext:
    """What a metric builder may use besides its weights."""

    device: str
    protocol: Any  # the protocol config (reference, image_size, jpeg, fid_input, ...)
    out: Path  # the run directory (reference statistics are written there)

    @property
    def prep(self) -> ImagePrep:
        """How the protocol prepares every image it scores (squash size, JPEG round trips)."""
        return protocol_prep(self.protocol)


@dataclass(frozen=True)
class MetricEntry:
    """How to check and build one metric; `key` names its weights under `weights.` in the config. A metric that
    compares against `protocol.reference` names the extractor its statistics must have been made with."""

    key: str
    kind: str  # convert=<kind> writes its weights
    check: Callable[[Any, str, str], Path]
    build: Callable[[Path, MetricContext], Metric]
    extractor: Optional[Callable[[Path, Any], Extractor]] = None

    @property
    def needs_reference(self) -> bool:
        return self.extractor is not None


def protocol_prep(protocol: Any) -> ImagePrep:
    """The ImagePrep of a protocol config (`image_size`, `jpeg`; absent means unset)."""
    return ImagePrep(getattr(protocol, "image_size", None), getattr(protocol, "jpeg", None))


def fid_extractor(weights: Path, protocol: Any) -> Extractor:
    """The FID Inception with the protocol's input handling, squash size and JPEG round trips."""
    prep = protocol_prep(protocol)
    return Extractor(INCEPTION, str(getattr(protocol, "fid_input", "torch-fidelity")), prep.size, prep.jpeg)


def clip_extractor(weights: Path, protocol: Any) -> Extractor:
    """CLIP image embeddings of the model in `weights` (named by its folder)."""
    prep = protocol_prep(protocol)
    return Extractor(f"clip-{Path(weights).name}", "clip", prep.size, prep.jpeg)


def reference_files(reference: str | Path) -> list[Path]:
    """Every image in a reference folder (sorted), or an error naming the folder."""
    folder = Path(reference)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"protocol.reference={folder}: no .png/.jpg/.jpeg/.webp images there")
    return files


class FrechetMetric:
    """Fréchet distance between the features of the samples and of the reference images (or stored statistics).

    Statistics computed from a reference folder are saved (with their extractor record) to `stats_out`, reusable as
    `protocol.reference=<file>` by any protocol that extracts the same way."""

    def __init__(
        self,
        name: str,
        features: Callable[[list[Image.Image]], torch.Tensor],
        reference: str | Path,
        extractor: Extractor,
        prep: ImagePrep = NO_PREP,
        declared: Optional[str] = None,
        batch_size: int = 32,
        stats_out: Optional[Path] = None,
    ):
        self.name, self.features, self.batch_size = name, features, batch_size
        self.reference, self.stats_out = Path(reference), stats_out
        self.extractor, self.prep, self.declared = extractor, prep, declared
        self._ref: torch.Tensor | tuple[np.ndarray, np.ndarray] | None = None

    def features_of(self, files: Sequence[Path], prepare: Callable[[Image.Image], Image.Image]) -> torch.Tensor:
        """(N, D) features of image files, each prepared by `prepare`."""
        return torch.cat([self.features(b) for b in image_batches(files, self.batch_size, prepare)])

    def reference_features(self) -> torch.Tensor | tuple[np.ndarray, np.ndarray]:
        """Reference features computed from the folder, or (mu, sigma) of a checked .npz; cached."""
        if self._ref is None:
            if self.reference.suffix == ".npz":
                check_stats(self.reference, self.extractor, self.declared, self.name)
                self._ref = read_stats(self.reference)
            else:
                self._ref = self.features_of(reference_files(self.reference), self.prep.reference)
                if self.stats_out is not None:
                    write_stats(self.stats_out, *feature_stats(self._ref), self.extractor)
        return self._ref

    def __call__(self, samples: Sequence[Sample]) -> dict[str, float]:
        feats = self.features_of([s.file for s in samples], self.prep.generated)
        ref = self.reference_features()
        if isinstance(ref, tuple):
            return {self.name: frechet_distance(*feature_stats(feats), *ref)}
        return {self.name: frechet_distance_of_features(feats, ref)}


class InceptionFeatures:
    """Prepared images -> FID Inception features, the network's input made as `input` says (FidInput)."""

    def __init__(self, weights: Path, device: str, input: str = "torch-fidelity"):
        from koala.evaluation.inception import load_fid_inception

        self.net, self.device = load_fid_inception(weights, device, input), device

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, 2048) float32 features; images of different sizes go through the network in separate groups."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        tensors = []
        for i, img in enumerate(images):
            tensors.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
            groups[img.size].append(i)
        out = torch.empty(len(images), 2048)
        for idx in groups.values():
            out[idx] = self.net(torch.stack([tensors[i] for i in idx]).to(self.device)).float().cpu()
        return out


class ScoreMetric:
    """Mean of a per-image score, overall and per style (HPSv2 reports its four styles and their average); `reduce`
    turns each mean into the reported number (torchmetrics' CLIP score clamps the mean at 0)."""

    def __init__(
        self,
        name: str,
        score: Callable[[list[Image.Image], list[str]], list[float]],
        prep: ImagePrep = NO_PREP,
        reduce: Callable[[float], float] = float,
        batch_size: int = 16,
    ):
        self.name, self.score, self.prep, self.reduce, self.batch_size = name, score, prep, reduce, batch_size

    def __call__(self, samples: Sequence[Sample]) -> dict[str, float]:
        values: list[float] = []
        batches = image_batches([s.file for s in samples], self.batch_size, self.prep.generated)
        for i, images in enumerate(batches):
            values += self.score(images, [s.prompt for s in samples[i * self.batch_size : (i + 1) * self.batch_size]])
        out = {self.name: self.reduce(float(np.mean(values)))}
        by_style: dict[str, list[float]] = defaultdict(list)
        for s, v in zip(samples, values):
            if s.style:
                by_style[s.style].append(v)
        if len(by_style) > 1:
            out.update({f"{self.name}/{st}": self.reduce(float(np.mean(v))) for st, v in sorted(by_style.items())})
        return out


def _fid(weights: Path, ctx: MetricContext) -> Metric:
    """FID with the TF-ported Inception, its input made as protocol.fid_input says (koala.evaluation.inception)."""
    return FrechetMetric(
        "fid",
        InceptionFeatures(weights, ctx.device, str(getattr(ctx.protocol, "fid_input", "torch-fidelity"))),
        ctx.protocol.reference,
        fid_extractor(weights, ctx.protocol),
        ctx.prep,
        getattr(ctx.protocol, "reference_extractor", None),
        stats_out=ctx.out / "reference-stats" / "fid.npz",
    )


def _fd_clip(weights: Path, ctx: MetricContext) -> Metric:
    """Fréchet distance of CLIP image embeddings (Kynkäänniemi et al. 2023)."""
    return FrechetMetric(
        "fd_clip",
        ClipScorer(weights, ctx.device).image_features,
        ctx.protocol.reference,
        clip_extractor(weights, ctx.protocol),
        ctx.prep,
        getattr(ctx.protocol, "reference_extractor", None),
        stats_out=ctx.out / "reference-stats" / "fd_clip.npz",
    )


def _cosines(scorer: ClipScorer, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
    """cos(image embedding, its prompt's embedding) per image."""
    img, txt = scorer.image_features(images), scorer.text_features(prompts)
    return torch.nn.functional.cosine_similarity(img, txt, dim=-1)


def _clip_score(weights: Path, ctx: MetricContext) -> Metric:
    """CLIP score as torchmetrics' CLIPScore computes it: max(mean over images of 100 x cos, 0)."""
    scorer = ClipScorer(weights, ctx.device)
    return ScoreMetric(
        "clip_score", lambda im, pr: (100 * _cosines(scorer, im, pr)).tolist(), ctx.prep, lambda m: max(m, 0.0)
    )


def _clip_cosine(weights: Path, ctx: MetricContext) -> Metric:
    """CLIP score as BK-SDM reports it (src/eval_clip_score.py: open_clip ViT-g-14): the mean raw cosine, no scaling,
    no clamp, prompts tokenized as open_clip does."""
    scorer = ClipScorer(weights, ctx.device)
    scorer.split_special_tokens = True
    return ScoreMetric("clip_cosine", lambda im, pr: _cosines(scorer, im, pr).tolist(), ctx.prep)


def _hps(weights: Path, ctx: MetricContext) -> Metric:
    """HPSv2 / HPSv2.1 (x 100)."""
    from koala.evaluation.preference import hps_scorer

    return ScoreMetric("hps", hps_scorer(weights, ctx.device).scores, ctx.prep)


def _pickscore(weights: Path, ctx: MetricContext) -> Metric:
    """PickScore_v1."""
    from koala.evaluation.preference import pickscore_scorer

    return ScoreMetric("pickscore", pickscore_scorer(weights, ctx.device).scores, ctx.prep)


METRICS: dict[str, MetricEntry] = {
    "fid": MetricEntry("inception", "inception", check_safetensors, _fid, fid_extractor),
    "fd_clip": MetricEntry("clip", "clip", check_clip_model, _fd_clip, clip_extractor),
    "clip_score": MetricEntry("clip", "clip", check_clip_model, _clip_score),
    "clip_cosine": MetricEntry("clip", "open_clip", check_clip_model, _clip_cosine),
    "hps": MetricEntry("hps", "hps", check_clip_model, _hps),
    "pickscore": MetricEntry("pickscore", "pickscore", check_clip_model, _pickscore),
}
MetricName = Choice("MetricName", list(METRICS))  # an entry of protocol.metrics: a key of METRICS


def check_reference(name: str, entry: MetricEntry, weights: Path, protocol: Any) -> None:
    """protocol.reference exists (a folder with images, or statistics made by this metric's extractor)."""
    if not protocol.reference:
        raise FileNotFoundError(
            f"metric {name} needs protocol.reference (a folder of real images or a .npz with mu and sigma); "
            "it is not set"
        )
    ref = Path(protocol.reference)
    if ref.suffix != ".npz":
        reference_files(ref)
    elif not ref.is_file():
        raise FileNotFoundError(f"protocol.reference={ref}: no such file")
    else:
        check_stats(ref, entry.extractor(weights, protocol), getattr(protocol, "reference_extractor", None), name)


def check_metrics(names: Sequence[str], weights: Any, protocol: Any) -> dict[str, Path]:
    """Check every requested metric's weights (and reference) before any model loads; returns name -> weights."""
    out = {}
    for name in names:
        entry = METRICS[MetricName(name)]
        out[name] = entry.check(getattr(weights, entry.key, None), f"weights.{entry.key}", entry.kind)
        if entry.needs_reference:
            check_reference(name, entry, out[name], protocol)
    return out


def build_metric(name: str, weights: Path, ctx: MetricContext) -> Metric:
    """Load one checked metric."""
    return METRICS[name].build(weights, ctx)
