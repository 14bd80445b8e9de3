"""The metric registry: every metric is a name, the weights it needs, a check run before any model loads, and a
builder. A built metric maps a list of generated samples (image file, prompt, style) to named numbers.

Add a metric (a toy-world scorer, another preference model) by registering one more `MetricEntry`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np
import torch
from PIL import Image

from koala.choice import Choice
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
    protocol: Any  # the protocol config (reference, fid_size, ...)
    out: Path  # the run directory (reference statistics are written there)


@dataclass(frozen=True)
class MetricEntry:
    """How to check and build one metric; `key` names its weights under `weights.` in the config."""

    key: str
    kind: str  # convert=<kind> writes its weights
    check: Callable[[Any, str, str], Path]
    build: Callable[[Path, MetricContext], Metric]
    needs_reference: bool = False


def image_batches(files: Sequence[Path], batch_size: int) -> Iterator[list[Image.Image]]:
    """RGB images of `files`, `batch_size` at a time (so 30K images never sit in memory together)."""
    for i in range(0, len(files), batch_size):
        yield [Image.open(f).convert("RGB") for f in files[i : i + batch_size]]


def reference_files(reference: str | Path) -> list[Path]:
    """Every image in a reference folder (sorted), or an error naming the folder."""
    folder = Path(reference)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"protocol.reference={folder}: no .png/.jpg/.jpeg/.webp images there")
    return files


class FrechetMetric:
    """Fréchet distance between the features of the samples and of the reference images (or stored statistics)."""

    def __init__(
        self,
        name: str,
        features: Callable[[list[Image.Image]], torch.Tensor],
        reference: str | Path,
        batch_size: int = 32,
        stats_out: Optional[Path] = None,
    ):
        self.name, self.features, self.batch_size = name, features, batch_size
        self.reference, self.stats_out = Path(reference), stats_out
        self._ref: torch.Tensor | tuple[np.ndarray, np.ndarray] | None = None

    def features_of(self, files: Sequence[Path]) -> torch.Tensor:
        """(N, D) features of image files."""
        return torch.cat([self.features(b) for b in image_batches(files, self.batch_size)])

    def reference_features(self) -> torch.Tensor | tuple[np.ndarray, np.ndarray]:
        """Reference features computed from the folder, or (mu, sigma) of a .npz (pytorch-fid's layout); cached."""
        if self._ref is None:
            if self.reference.suffix == ".npz":
                with np.load(self.reference, allow_pickle=False) as z:
                    self._ref = (z["mu"], z["sigma"])
            else:
                self._ref = self.features_of(reference_files(self.reference))
                if self.stats_out is not None:  # reusable as protocol.reference=<file> with the same protocol
                    self.stats_out.parent.mkdir(parents=True, exist_ok=True)
                    mu, sigma = feature_stats(self._ref)
                    np.savez(self.stats_out, mu=mu, sigma=sigma)
        return self._ref

    def __call__(self, samples: Sequence[Sample]) -> dict[str, float]:
        feats, ref = self.features_of([s.file for s in samples]), self.reference_features()
        if isinstance(ref, tuple):
            return {self.name: frechet_distance(*feature_stats(feats), *ref)}
        return {self.name: frechet_distance_of_features(feats, ref)}


class InceptionFeatures:
    """Images -> FID Inception features; `size` first squashes each image to size x size (PIL bicubic), as BK-SDM's
    COCO-256 protocol resizes both its generated and its real images before pytorch-fid."""

    def __init__(self, weights: Path, device: str, size: Optional[int]):
        from koala.evaluation.inception import load_fid_inception

        self.net, self.device, self.size = load_fid_inception(weights, device), device, size

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, 2048) float32 features; images of different sizes go through the network in separate groups."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        tensors = []
        for i, img in enumerate(images):
            if self.size:
                img = img.resize((self.size, self.size), Image.BICUBIC)
            tensors.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
            groups[img.size].append(i)
        out = torch.empty(len(images), 2048)
        for idx in groups.values():
            out[idx] = self.net(torch.stack([tensors[i] for i in idx]).to(self.device)).float().cpu()
        return out


class ScoreMetric:
    """Mean of a per-image score, overall and per style (HPSv2 reports its four styles and their average)."""

    def __init__(self, name: str, score: Callable[[list[Image.Image], list[str]], list[float]], batch_size: int = 16):
        self.name, self.score, self.batch_size = name, score, batch_size

    def __call__(self, samples: Sequence[Sample]) -> dict[str, float]:
        values: list[float] = []
        for i, images in enumerate(image_batches([s.file for s in samples], self.batch_size)):
            values += self.score(images, [s.prompt for s in samples[i * self.batch_size : (i + 1) * self.batch_size]])
        out = {self.name: float(np.mean(values))}
        by_style: dict[str, list[float]] = defaultdict(list)
        for s, v in zip(samples, values):
            if s.style:
                by_style[s.style].append(v)
        if len(by_style) > 1:
            out.update({f"{self.name}/{style}": float(np.mean(v)) for style, v in sorted(by_style.items())})
        return out


def _fid(weights: Path, ctx: MetricContext) -> Metric:
    """FID with the TF-ported Inception (see koala.evaluation.inception)."""
    return FrechetMetric(
        "fid",
        InceptionFeatures(weights, ctx.device, ctx.protocol.fid_size),
        ctx.protocol.reference,
        stats_out=ctx.out / "reference-stats" / "fid.npz",
    )


def _fd_clip(weights: Path, ctx: MetricContext) -> Metric:
    """Fréchet distance of CLIP image embeddings (Kynkäänniemi et al. 2023)."""
    return FrechetMetric(
        "fd_clip",
        ClipScorer(weights, ctx.device).image_features,
        ctx.protocol.reference,
        stats_out=ctx.out / "reference-stats" / "fd_clip.npz",
    )


def _clip_score(weights: Path, ctx: MetricContext) -> Metric:
    """CLIP score: 100 x max(cos, 0), torchmetrics' definition."""
    scorer = ClipScorer(weights, ctx.device)

    def score(images: list[Image.Image], prompts: list[str]) -> list[float]:
        """Per-image CLIP score."""
        img, txt = scorer.image_features(images), scorer.text_features(prompts)
        return (100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1).clamp(min=0)).tolist()

    return ScoreMetric("clip_score", score)


def _hps(weights: Path, ctx: MetricContext) -> Metric:
    """HPSv2 / HPSv2.1 (x 100)."""
    from koala.evaluation.preference import hps_scorer

    return ScoreMetric("hps", hps_scorer(weights, ctx.device).scores)


def _pickscore(weights: Path, ctx: MetricContext) -> Metric:
    """PickScore_v1."""
    from koala.evaluation.preference import pickscore_scorer

    return ScoreMetric("pickscore", pickscore_scorer(weights, ctx.device).scores)


METRICS: dict[str, MetricEntry] = {
    "fid": MetricEntry("inception", "inception", check_safetensors, _fid, needs_reference=True),
    "fd_clip": MetricEntry("clip", "clip", check_clip_model, _fd_clip, needs_reference=True),
    "clip_score": MetricEntry("clip", "clip", check_clip_model, _clip_score),
    "hps": MetricEntry("hps", "hps", check_clip_model, _hps),
    "pickscore": MetricEntry("pickscore", "pickscore", check_clip_model, _pickscore),
}
MetricName = Choice("MetricName", list(METRICS))  # an entry of protocol.metrics: a key of METRICS


def check_metrics(names: Sequence[str], weights: Any, protocol: Any) -> dict[str, Path]:
    """Check every requested metric's weights (and reference) before any model loads; returns name -> weights."""
    out = {}
    for name in names:
        entry = METRICS[MetricName(name)]
        out[name] = entry.check(getattr(weights, entry.key, None), f"weights.{entry.key}", entry.kind)
        if entry.needs_reference:
            if not protocol.reference:
                raise FileNotFoundError(
                    f"metric {name} needs protocol.reference (a folder of real images or a .npz "
                    "with mu and sigma); it is not set"
                )
            ref = Path(protocol.reference)
            if ref.suffix != ".npz":
                reference_files(ref)
            elif not ref.is_file():
                raise FileNotFoundError(f"protocol.reference={ref}: no such file")
    return out


def build_metric(name: str, weights: Path, ctx: MetricContext) -> Metric:
    """Load one checked metric."""
    return METRICS[name].build(weights, ctx)
