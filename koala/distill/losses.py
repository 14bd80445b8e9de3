"""The KOALA objective's terms: task, output KD and feature KD (KOALA.md section 3), all computed in fp32."""

from __future__ import annotations

from enum import auto

import torch

from koala.choice import Choice


class FeatureLoss(Choice):
    """`distill.loss`: how a feature pair is compared."""

    mse = auto()  # plain MSE (BK-SDM, KOALA)
    normalized = auto()  # MSE divided by the teacher feature's mean square (LAPTOP-Diff)


class Reduction(Choice):
    """`distill.reduction`: how the feature pairs' losses combine into the feature term."""

    sum = auto()  # the sum over pairs l of BK-SDM's objective (and the paper's): grows with the number of pairs
    mean = auto()  # the sum divided by the number of pairs: one feat_weight means one strength for any student


def mse(student: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in fp32; `weights` (B,) weight each sample (e.g. Min-SNR).

    Written as a difference first so `target` may be an inference-mode tensor from the teacher: subtraction keeps
    nothing of it for backward.
    """
    diff = student.float() - target.float()
    if weights is None:
        return diff.pow(2).mean()
    per_sample = diff.pow(2).flatten(1).mean(1)  # (B,)
    return (per_sample * weights.float()).mean()


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = FeatureLoss.mse) -> torch.Tensor:
    """MSE between paired features; `normalized` divides by the teacher feature's mean square (LAPTOP-Diff)."""
    if FeatureLoss(kind) is FeatureLoss.mse:
        return mse(student, teacher)
    t = teacher.float()
    return mse(student, t) / t.pow(2).mean().clamp_min(1e-8)
