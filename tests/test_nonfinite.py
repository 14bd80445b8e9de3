"""The non-finite guard inside `train_step`, on a stub task (one linear layer) whose loss a test can poison.

A diverging run end to end (a real student, checkpoints, the error line) is test_train.py's
`test_a_diverging_run_stops_with_an_error_and_writes_no_nan`; this checks the step itself, fast.
"""

import pytest
import torch
from accelerate import Accelerator
from diffusers import DDPMScheduler

from koala.train.diffusion import TimestepSampler
from koala.train.step import Noising, NonFiniteGuard, NonFiniteSteps, Trainable, train_step
from koala.train.tracking import MetricsLog


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerator() sets process-wide state (the accumulation steps): later in-process tests choose their own."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


class StubTask(torch.nn.Module):
    """A distillation task in shape only: a linear map of the noisy latents towards the target; `cond["scale"]`
    multiplies the loss (NaN poisons it)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, noisy, t, cond, target, sample_weights=None, timer=None) -> dict[str, torch.Tensor]:
        out = self.lin(noisy.movedim(1, -1)).movedim(-1, 1)
        loss = ((out - target) ** 2).mean() * cond["scale"]
        return {"loss": loss, "out": loss.detach()}


def stub_run(grad_accum: int, limit: int = 3) -> tuple[Trainable, MetricsLog]:
    """A Trainable over the stub task with accelerate's accumulation, and the metrics log it adds to."""
    acc = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
    task = StubTask()
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    student, optimizer, schedule = acc.prepare(task, optimizer, schedule)
    noising = Noising(DDPMScheduler(), TimestepSampler("uniform", 1000))
    run = Trainable(acc, student, student, optimizer, schedule, None, noising, 0.0, None, NonFiniteGuard(limit))
    return run, MetricsLog(acc, path=None)


def batch(scale: float) -> dict[str, torch.Tensor]:
    return {"latents": torch.randn(2, 4, 4, 4), "scale": torch.tensor(scale)}


def weights(run: Trainable) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.student.parameters()]


def test_a_non_finite_first_micro_step_skips_the_step_and_logs_none_of_it():
    run, metrics = stub_run(grad_accum=2)
    before = weights(run)
    for scale in (float("nan"), 1.0):  # one optimizer step: the first micro-step's loss is NaN
        train_step(run, batch(scale), metrics)
    assert run.guard.skipped == 1 and run.guard.in_a_row == 1
    assert all(torch.equal(a, b) for a, b in zip(before, weights(run)))  # the update was not taken
    assert metrics.count == 0  # before: the NaN micro-step was added before the step was judged (a NaN row)
    for scale in (1.0, 1.0):  # the next step is taken and logged, both micro-steps
        train_step(run, batch(scale), metrics)
    assert run.guard.in_a_row == 0 and not all(torch.equal(a, b) for a, b in zip(before, weights(run)))
    assert metrics.count == 2 and all(torch.isfinite(v) for v in metrics.sums.values())


def test_the_guard_stops_the_run_at_max_nonfinite_steps_in_a_row():
    run, metrics = stub_run(grad_accum=1, limit=2)
    train_step(run, batch(float("inf")), metrics)
    train_step(run, batch(1.0), metrics)  # a finite step resets the count
    train_step(run, batch(float("nan")), metrics)
    with pytest.raises(NonFiniteSteps, match="2 optimizer steps in a row had a non-finite loss"):
        train_step(run, batch(float("nan")), metrics)
    assert run.guard.skipped == 3 and metrics.count == 1
