"""CLIP models from local folders and the Fréchet distance: the pieces koala.evaluation's metrics are built from.

CLIP models come from transformers `CLIPModel` folders (safetensors), e.g. openai/clip-vit-large-patch14 saved
locally or an open_clip checkpoint converted once (koala.evaluation.weights); the CLIP scores built from them are in
koala.evaluation.registry (torchmetrics' `clip_score`, BK-SDM's `clip_cosine`).

Fréchet distance: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, of Inception features (FID, see
koala.evaluation.inception) or of CLIP image embeddings ("FD-CLIP", Kynkäänniemi et al. 2023).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP preprocessing, used when no preprocessor_config.json
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MissingMetricWeights(FileNotFoundError):
    """Metric weights are not where the config says; the message lists the files needed."""


def check_clip_folder(path: str | Path | None) -> Path:
    """A local CLIPModel folder with config, safetensors weights and tokenizer, or an error naming what is missing."""
    need = (
        "config.json",
        "model.safetensors (or model.safetensors.index.json and its shards)",
        "tokenizer.json, or vocab.json + merges.txt",
        "optionally preprocessor_config.json (image mean/std)",
    )
    how = (
        "Put a transformers CLIPModel there, e.g. on a machine with the hub: CLIPModel.from_pretrained("
        "'openai/clip-vit-large-patch14').save_pretrained(DIR, safe_serialization=True) and the same with "
        "CLIPTokenizer and CLIPImageProcessor; then copy DIR here."
    )
    if not path:
        raise MissingMetricWeights(
            f"weights.clip is not set: it must name a local CLIP folder holding {'; '.join(need)}. {how}"
        )
    path = Path(path)
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    has_tok = (path / "tokenizer.json").is_file() or (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    )
    if not ((path / "config.json").is_file() and has_weights and has_tok):
        have = sorted(p.name for p in path.iterdir()) if path.is_dir() else "the folder does not exist"
        raise MissingMetricWeights(
            f"CLIP metric weights missing in {path} (found: {have}); needed: {'; '.join(need)}. {how}"
        )
    return path


class ClipScorer:
    """A local CLIP model: image and text embeddings, CLIP score, image features for Fréchet distance."""

    fit = "crop"  # how a non-square image becomes square: `crop` (CLIP, PickScore) or `pad` (HPSv2)
    # True: tokenize as open_clip does, reading a special token's text inside a prompt as text (laion's tokenizers
    # pad with "!", which transformers would otherwise turn into the pad token wherever a caption has one)
    split_special_tokens = False

    def __init__(self, path: str | Path, device: str = "cpu"):
        path = check_clip_folder(path)
        self.device = device
        self.model = CLIPModel.from_pretrained(path, use_safetensors=True).to(device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(path)
        pre = (
            json.loads((path / "preprocessor_config.json").read_text())
            if (path / "preprocessor_config.json").is_file()
            else {}
        )
        self.mean = torch.tensor(pre.get("image_mean", CLIP_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", CLIP_STD)).view(1, 3, 1, 1)
        self.size = self.model.config.vision_config.image_size

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Square each image (`fit`), resize to the model's size (bicubic), normalise: (B, 3, S, S)."""
        out = []
        for img in images:
            img = _square(img.convert("RGB"), self.size, self.fit)
            out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
        return (torch.stack(out) - self.mean) / self.std

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
        """CLIP image embeddings (projected, not normalised): (N, D)."""
        feats = [
            _embedding(
                self.model.get_image_features(pixel_values=self.pixels(images[i : i + batch_size]).to(self.device))
            )
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(feats).float().cpu()

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP text embeddings (projected, not normalised): (N, D)."""
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            return_tensors="pt",
            split_special_tokens=self.split_special_tokens,
        )
        feats = self.model.get_text_features(
            input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device)
        )
        return _embedding(feats).float().cpu()


def _square(img: Image.Image, size: int, fit: str) -> Image.Image:
    """`crop`: shorter side to `size`, centre crop (CLIP). `pad`: longer side to `size`, centred on black (HPSv2)."""
    if fit == "pad":
        scale = size / max(img.size)
        w, h = round(img.width * scale), round(img.height * scale)
        canvas = Image.new("RGB", (size, size))
        canvas.paste(img.resize((w, h), Image.BICUBIC), ((size - w) // 2, (size - h) // 2))
        return canvas
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _embedding(output) -> torch.Tensor:
    """The embedding tensor of a `get_*_features` result (a tensor, or a model output in newer transformers)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of (N, D) features; needs N >= 2."""
    x = features.double().numpy()
    if len(x) < 2:
        raise ValueError("a Fréchet distance needs at least 2 images per set")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (negative round-off eigenvalues clipped)."""
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians in float64.

    Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the right side is a symmetric PSD matrix, so eigh is exact
    and stable where a general sqrtm of S1 S2 can turn complex from round-off.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    r1 = _sqrt_psd(s1)
    covmean_trace = np.trace(_sqrt_psd(r1 @ s2 @ r1))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * covmean_trace)


def frechet_distance_of_features(x1: torch.Tensor, x2: torch.Tensor) -> float:
    """The Fréchet distance of the Gaussians fitted to two feature sets (N1, D), (N2, D), exactly, in float64.

    With A = (X1 - mu1) / sqrt(N1 - 1) and B likewise, S1 = A^T A and S2 = B^T B, and the non-zero eigenvalues of
    S1 S2 are the squared singular values of A B^T, so Tr((S1 S2)^(1/2)) is the nuclear norm of the N1 x N2 matrix
    A B^T: no D x D matrix is formed. Used when N1 * N2 <= D^2 (small sets); otherwise through `feature_stats`.
    """
    a, b = x1.double(), x2.double()
    if len(a) * len(b) > a.shape[1] ** 2:
        return frechet_distance(*feature_stats(x1), *feature_stats(x2))
    if min(len(a), len(b)) < 2:
        raise ValueError("a Fréchet distance needs at least 2 images per set")
    mu1, mu2 = a.mean(0), b.mean(0)
    a, b = (a - mu1) / math.sqrt(len(a) - 1), (b - mu2) / math.sqrt(len(b) - 1)
    trace_sqrt = torch.linalg.svdvals(a @ b.T).sum()
    return float((mu1 - mu2).square().sum() + a.square().sum() + b.square().sum() - 2 * trace_sqrt)
