"""Human-preference scores of CLIP architecture from local transformers folders: HPSv2 / HPSv2.1 and PickScore.

HPSv2 (Wu et al. 2023) fine-tunes open_clip ViT-H-14; its score is the cosine of the image and prompt embeddings
(`image_features @ text_features.T` of normalised features). Its evaluation pads the image to a square (longer side
resized to 224, bicubic, centred on black); reported here x 100, as papers print it (KOALA's "HPSv2" column).
PickScore (Kirstain et al. 2023) is a transformers CLIPModel (ViT-H-14); its score is `logit_scale.exp()` times the
cosine, with CLIP's shorter-side resize and centre crop. Both load from folders written by
`python -m koala.evaluate convert=hps|pickscore ...`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from koala.evaluation.metrics import ClipScorer


class PreferenceScorer(ClipScorer):
    """Per-image preference score: `scale` x cos(image, prompt), images squared by `fit` before the CLIP tower."""

    def __init__(self, path: str | Path, device: str = "cpu", fit: str = "crop", scale: str = "hundred"):
        super().__init__(path, device)
        if fit not in ("crop", "pad") or scale not in ("hundred", "logit_scale"):
            raise ValueError(f"fit={fit!r} (crop | pad), scale={scale!r} (hundred | logit_scale)")
        self.fit = fit
        self.factor = 100.0 if scale == "hundred" else float(self.model.logit_scale.detach().exp())

    @torch.no_grad()
    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """One score per (image, prompt) pair."""
        img = torch.nn.functional.normalize(self.image_features(images), dim=-1)
        txt = torch.nn.functional.normalize(self.text_features(prompts), dim=-1)
        return (self.factor * (img * txt).sum(-1)).tolist()


def hps_scorer(path: str | Path, device: str = "cpu") -> PreferenceScorer:
    """HPSv2 / HPSv2.1 as its benchmark computes it (pad to square, 100 x cosine)."""
    return PreferenceScorer(path, device, fit="pad", scale="hundred")


def pickscore_scorer(path: str | Path, device: str = "cpu") -> PreferenceScorer:
    """PickScore_v1 as its model card computes it (centre crop, logit_scale x cosine)."""
    return PreferenceScorer(path, device, fit="crop", scale="logit_scale")
