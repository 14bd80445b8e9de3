"""DistillationTask: a trainable student, a frozen teacher, their feature taps, and the named KOALA losses."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from koala.distill.losses import FeatureLoss, feature_loss, mse
from koala.distill.pairing import TapPair
from koala.distill.taps import FeatureTaps, SaPoint
from koala.models.forward import unet_forward
from koala.models.teacher import freeze
from koala.timing import Timer, no_timer


@dataclass(frozen=True)
class LossWeights:
    """The weights of the objective's three terms (`distill.task_weight`, `out_weight`, `feat_weight`)."""

    task: float = 1.0
    out: float = 1.0
    feat: float = 1.0


class DistillationTask(nn.Module):
    """Runs teacher and student on the same inputs and returns `{name: loss}`; `loss` is the objective.

    The student may be wrapped (DDP, accelerate). The teacher is frozen here (`koala.models.teacher.freeze`: no
    grads, eval mode whatever `train()` asks) and kept out of this module's parameters and submodules, so nothing
    prepares, trains or checkpoints it. `feature_loss` compares each feature pair (`distill.loss`).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        pairs: list[TapPair],
        weights: LossWeights,
        feature_loss: FeatureLoss = FeatureLoss.mse,
        sa_point: SaPoint = SaPoint.attn1,
    ):
        super().__init__()
        self.student = student
        self._teacher = [freeze(teacher)]  # a list hides it from nn.Module registration
        self.pairs = pairs
        self.weights = weights
        self.feature_loss = FeatureLoss(feature_loss)
        self.sa_point = sa_point
        need_feats = weights.feat > 0 and bool(pairs)
        self.student_taps = FeatureTaps(student, [p.student for p in pairs] if need_feats else [], sa_point=sa_point)
        self.teacher_taps = FeatureTaps(
            teacher, [p.teacher for p in pairs] if need_feats else [], detach=True, sa_point=sa_point
        )
        self.need_teacher = weights.out > 0 or need_feats

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def running(self, student: nn.Module) -> DistillationTask:
        """The same pairs and weights on `student` as wrapped for training (DDP, FSDP, `torch.compile`)."""
        return DistillationTask(student, self.teacher, self.pairs, self.weights, self.feature_loss, self.sa_point)

    def __enter__(self) -> DistillationTask:
        self.student_taps.__enter__()
        self.teacher_taps.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.teacher_taps.__exit__(*exc)
        self.student_taps.__exit__(*exc)

    @torch.inference_mode()
    def teacher_forward(self, noisy: Tensor, t: Tensor, cond: dict) -> Tensor:
        """The teacher's prediction (features land in `teacher_taps`); no graph, teacher's own dtype."""
        dtype = next(self.teacher.parameters()).dtype
        # Outside any autocast the caller runs the student under: the teacher computes in its own dtype
        # (teacher.dtype), so an fp32 teacher stays fp32 beside a bf16-autocast student.
        no_autocast = (
            torch.autocast(noisy.device.type, enabled=False)
            if noisy.device.type != "meta"
            else contextlib.nullcontext()
        )  # (the meta device, used by the memory benchmark, has no autocast)
        with no_autocast:
            return unet_forward(self.teacher, noisy, t, cond, dtype=dtype)

    def forward(
        self,
        noisy: Tensor,
        t: Tensor,
        cond: dict,
        target: Tensor,
        sample_weights: Tensor | None = None,
        timer: Timer = no_timer,
    ) -> dict[str, Tensor]:
        """All loss terms for one batch (`cond`: koala.models.forward.COND_KEYS); `timer` names each part."""
        self.student_taps.reset()
        self.teacher_taps.reset()
        with timer("teacher forward"):
            eps_t = self.teacher_forward(noisy, t, cond) if self.need_teacher else None
        with timer("student forward"):
            # fp32 once, as accelerate hands it back under DDP: the gradients of both terms sum in fp32
            eps_s = unet_forward(self.student, noisy, t, cond).float()
        with timer("losses"):
            return self.losses(eps_s, eps_t, target, sample_weights)

    def losses(self, eps_s: Tensor, eps_t: Tensor | None, target: Tensor, sample_weights=None) -> dict[str, Tensor]:
        """Task, output-KD and feature-KD terms and their weighted sum `loss` (the taps hold this step's features)."""
        losses: dict[str, Tensor] = {"task": mse(eps_s, target, sample_weights)}
        if eps_t is not None:
            losses["out"] = mse(eps_s, eps_t)
        if self.student_taps.points:
            losses.update(self.feature_losses())
        total = self.weights.task * losses["task"]
        if "out" in losses:
            total = total + self.weights.out * losses["out"]
        if "feat" in losses:
            total = total + self.weights.feat * losses["feat"]
        losses["loss"] = total
        return losses

    def feature_losses(self) -> dict[str, Tensor]:
        """Weighted sum over paired taps, plus one logged term per kind and per stage."""
        s_feats, t_feats = self.student_taps.features, self.teacher_taps.features
        by_kind: dict[str, Tensor] = defaultdict(float)
        by_stage: dict[str, Tensor] = defaultdict(float)
        total = 0.0
        for p in self.pairs:
            term = feature_loss(s_feats[p.student.name], t_feats[p.teacher.name], self.feature_loss)
            total = total + p.weight * term
            by_kind[p.student.kind] = by_kind[p.student.kind] + term.detach()
            by_stage[p.student.stage] = by_stage[p.student.stage] + term.detach()
        out = {"feat": total}
        out.update({f"feat/{k}": v for k, v in by_kind.items()})
        out.update({f"feat/{s}": v for s, v in by_stage.items()})
        return out
