"""The distillation task on stub models: tiny modules whose features are known constants give known loss terms.

A stub U-Net has one encoder and one decoder block, each a transformer with one `BasicTransformerBlock` whose
`attn1` outputs a constant (its parameter), so the taps see: encoder sa = a_enc, decoder sa = a_dec, decoder block
output (lf) = a_enc + a_dec (the residual stream), and the prediction is the constant `eps`. Every expected number
below is worked out by hand from those constants.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from koala.distill.losses import FeatureLoss
from koala.distill.pairing import TapPair
from koala.distill.taps import list_tap_points
from koala.distill.task import DistillationTask, LossWeights

TOKENS, WIDTH = 4, 3  # a feature is (B, TOKENS, WIDTH)


class Constant(nn.Module):
    """An attention stand-in whose output is its parameter, whatever the input."""

    def __init__(self, value: float):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(value))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.value * torch.ones_like(h)


class BasicTransformerBlock(nn.Module):  # the class name is how taps recognise a transformer layer's attn1
    def __init__(self, value: float):
        super().__init__()
        self.attn1 = Constant(value)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.attn1(h)


class Transformer(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(value)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.transformer_blocks:
            h = block(h)
        return h


class Block(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.attentions = nn.ModuleList([Transformer(value)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for attention in self.attentions:
            h = attention(h)
        return h


class StubUNet(nn.Module):
    """Called as an SDXL U-Net is (koala.models.forward.unet_forward); predicts the constant `eps`."""

    def __init__(self, a_enc: float, a_dec: float, eps: float):
        super().__init__()
        self.down_blocks = nn.ModuleList([Block(a_enc)])
        self.up_blocks = nn.ModuleList([Block(a_dec)])
        self.eps = nn.Parameter(torch.tensor(eps))

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None) -> SimpleNamespace:
        self.up_blocks[0](self.down_blocks[0](sample.new_zeros(sample.shape[0], TOKENS, WIDTH)))  # the taps see it
        return SimpleNamespace(sample=self.eps * torch.ones_like(sample))


# (student tap, weight): the weight a pairing would give it (distill.kind_weights[kind] * stage_weights[stage])
WEIGHTS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1": 2.0,
    "up_blocks.0.attentions.0.transformer_blocks.0.attn1": 0.5,
    "up_blocks.0": 3.0,
}


OBJECTIVE = LossWeights(task=1.0, out=0.5, feat=0.1)


def task(feature_loss: FeatureLoss = FeatureLoss.mse, weights: LossWeights = OBJECTIVE) -> DistillationTask:
    """Student (a_enc 1, a_dec 2, eps 0.5) and teacher (a_enc 0.5, a_dec 1.5, eps 0.25), every tap paired by name."""
    student, teacher = StubUNet(1.0, 2.0, 0.5), StubUNet(0.5, 1.5, 0.25)
    points = {p.name: p for p in list_tap_points(teacher, kinds=["sa", "lf"])}
    pairs = [TapPair(s, points[s.name], WEIGHTS[s.name]) for s in list_tap_points(student, kinds=["sa", "lf"])
             if s.name in WEIGHTS]  # fmt: skip
    assert [(p.student.kind, p.student.stage) for p in pairs] == [
        ("sa", "encoder"),
        ("lf", "decoder"),
        ("sa", "decoder"),
    ]
    return DistillationTask(student, teacher, pairs, weights, feature_loss=feature_loss)


def inputs(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    """Noisy latents, timesteps, conditioning and a target of 1 (the stubs ignore all but the shapes)."""
    cond = {"prompt_embeds": torch.zeros(batch, 7, 8), "pooled_prompt_embeds": torch.zeros(batch, 8),
            "time_ids": torch.zeros(batch, 6)}  # fmt: skip
    return torch.zeros(batch, 4, 2, 2), torch.tensor([10, 700][:batch]), cond, torch.ones(batch, 4, 2, 2)


def test_known_features_give_known_loss_terms():
    t = task()
    with t:
        losses = {k: v.item() for k, v in t(*inputs()).items()}
    # task (eps_S - target)^2 = (0.5 - 1)^2; out (eps_S - eps_T)^2 = (0.5 - 0.25)^2
    # encoder sa (1 - 0.5)^2 = 0.25, decoder sa (2 - 1.5)^2 = 0.25, decoder lf ((1 + 2) - (0.5 + 1.5))^2 = 1
    # feat = 2.0 x 0.25 + 0.5 x 0.25 + 3.0 x 1 = 3.625; per kind and per stage the terms are summed unweighted
    # loss = 1.0 x task + 0.5 x out + 0.1 x feat = 0.25 + 0.03125 + 0.3625
    assert losses == pytest.approx(
        {"task": 0.25, "out": 0.0625, "feat": 3.625, "feat/sa": 0.5, "feat/lf": 1.0, "feat/encoder": 0.25,
         "feat/decoder": 1.25, "loss": 0.64375}, abs=1e-7
    )  # fmt: skip


def test_normalized_feature_loss_divides_by_the_teacher_features_mean_square():
    t = task(FeatureLoss.normalized)
    with t:
        losses = {k: v.item() for k, v in t(*inputs()).items()}
    # encoder sa 0.25 / 0.5^2 = 1, decoder sa 0.25 / 1.5^2 = 1/9, decoder lf 1 / 2^2 = 0.25
    assert losses["feat/sa"] == pytest.approx(1 + 1 / 9) and losses["feat/lf"] == pytest.approx(0.25)
    assert losses["feat"] == pytest.approx(2.0 * 1 + 0.5 / 9 + 3.0 * 0.25)
    assert losses["loss"] == pytest.approx(0.25 + 0.5 * 0.0625 + 0.1 * (2.0 + 0.5 / 9 + 0.75))


def test_sample_weights_weight_the_task_term_only():
    t = task()
    noisy, steps, cond, target = inputs()
    with t:
        losses = t(noisy, steps, cond, target, sample_weights=torch.tensor([1.0, 3.0]))
    # each sample's task error is 0.25: (0.25 x 1 + 0.25 x 3) / 2; out and feat are not weighted by sample
    assert (losses["task"].item(), losses["out"].item()) == pytest.approx((0.5, 0.0625))


def test_zero_weights_skip_the_teacher_and_the_taps():
    t = task(weights=LossWeights(1.0, 0.0, 0.0))
    with t:
        losses = t(*inputs())
    assert set(losses) == {"task", "loss"} and losses["loss"].item() == pytest.approx(0.25)
    assert not t.need_teacher and t.student_taps.points == []


def test_gradients_reach_the_student_only_and_the_teacher_stays_frozen():
    t = task()
    t.train()
    assert t.student.training and not t.teacher.training  # train() on the task leaves the teacher in eval
    assert not any(p.requires_grad for p in t.teacher.parameters())
    assert list(t.parameters()) == list(t.student.parameters())  # the teacher is not a submodule
    with t:
        t(*inputs())["loss"].backward()
    # d loss / d a_enc (student): 0.1 x [2.0 x 2 (1 - 0.5) + 3.0 x 2 (3 - 2)] = 0.1 x 8 = 0.8 (a_enc feeds the
    # encoder sa tap and the decoder lf tap, each a mean of squared differences of constants)
    a_enc = t.student.down_blocks[0].attentions[0].transformer_blocks[0].attn1.value
    assert a_enc.grad.item() == pytest.approx(0.8)
    # d loss / d eps_S: 1.0 x 2 (0.5 - 1) + 0.5 x 2 (0.5 - 0.25) = -1 + 0.25
    assert t.student.eps.grad.item() == pytest.approx(-0.75)
