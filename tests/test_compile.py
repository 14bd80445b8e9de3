"""torch.compile keeps the distillation step exact: taps still capture, losses equal the eager ones."""

import pytest
import torch
from conftest import unet_inputs

from koala.config.compose import compose_config
from koala.config.schema import TrainConfig
from koala.distill.pairing import pair_taps
from koala.distill.taps import unwrap
from koala.distill.task import DistillationTask, LossWeights
from koala.models.archs import TINY_UNET_CONFIG
from koala.models.inherit import inherit_weights
from koala.models.specs import get_spec
from koala.models.unets import build_student, build_unet, resolve


def models():
    """A tiny random teacher and the tiny-700m student inherited from it."""
    torch.manual_seed(0)
    teacher = build_unet(TINY_UNET_CONFIG).eval().requires_grad_(False)
    spec = get_spec("tiny-700m")
    plan = resolve(TINY_UNET_CONFIG, spec)
    student = build_student(TINY_UNET_CONFIG, spec)
    inherit_weights(student, teacher, plan)
    return teacher, student.train(), plan


def step(task: DistillationTask, x: dict) -> tuple[dict, dict]:
    """Losses and the student's gradients of one step."""
    task.student.zero_grad(set_to_none=True)
    cond = {
        "prompt_embeds": x["encoder_hidden_states"],
        "pooled_prompt_embeds": x["added_cond_kwargs"]["text_embeds"],
        "time_ids": x["added_cond_kwargs"]["time_ids"],
    }
    losses = task(x["sample"], x["timestep"], cond, torch.zeros_like(x["sample"]))
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in unwrap(task.student).named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("sa_point", ["attn1", "residual"])
@pytest.mark.slow
def test_compiled_student_and_teacher_give_the_eager_losses(sa_point):
    torch._dynamo.reset()
    teacher, student, plan = models()
    d = compose_config("train", ["distill=sa+lf", f"distill.sa_point={sa_point}"], schema=TrainConfig).distill
    pairs = pair_taps(plan, d, student, teacher)
    weights = LossWeights(d.task_weight, d.out_weight, d.feat_weight)
    eager = DistillationTask(student, teacher, pairs, weights, d.loss, sa_point)
    compiled = DistillationTask(
        torch.compile(student, backend="aot_eager"),
        torch.compile(teacher, backend="aot_eager"),
        pairs,
        weights,
        d.loss,
        sa_point,
    )
    x = unet_inputs(batch=2, size=16)
    with eager:
        want, want_grads = step(eager, x)
    with compiled:
        for _ in range(2):  # the second call runs the cached graph
            got, got_grads = step(compiled, x)
            assert len(compiled.student_taps.features) == len(compiled.teacher_taps.features) == len(pairs)
    assert set(got) == set(want) and want["feat"] > 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert set(got_grads) == set(want_grads)
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-4, atol=1e-6)
