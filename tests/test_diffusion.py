"""Timestep sampling, targets, Min-SNR weighting and the loss terms."""

import pytest
import torch
from diffusers import DDPMScheduler

from koala.distill.losses import feature_loss, mse
from koala.models.archs import SDXL_SCHEDULER_CONFIG
from koala.train.diffusion import TimestepSampler, min_snr_weights, sample_noise, task_target, teacher_timesteps


def test_teacher_schedule_is_lightnings_trailing_steps():
    assert teacher_timesteps(1000, 4).tolist() == [999, 749, 499, 249]
    s = TimestepSampler("teacher_schedule", 1000, teacher_steps=4)
    assert set(s(1000).tolist()) == {999, 749, 499, 249}
    j = TimestepSampler("teacher_schedule", 1000, teacher_steps=4, jitter=5)(2000)
    assert j.max() <= 999 and any(abs(int(x) - 749) <= 5 and int(x) != 749 for x in j)


def test_uniform_covers_range_and_unknown_sampler_names_choices():
    t = TimestepSampler("uniform", 1000)(5000)
    assert t.min() >= 0 and t.max() <= 999 and len(set(t.tolist())) > 900
    with pytest.raises(ValueError, match="uniform, teacher_schedule"):
        TimestepSampler("logit", 1000)


def test_targets_follow_prediction_type():
    lat, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    eps = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    assert torch.equal(task_target(eps, lat, noise, t), noise)
    v = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG, prediction_type="v_prediction")
    assert torch.allclose(task_target(v, lat, noise, t), v.get_velocity(lat, noise, t))


def test_min_snr_weights_clip_high_snr():
    s = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    w = min_snr_weights(s, torch.tensor([1, 999]), gamma=5.0)
    assert w[0] < 1.0 and torch.isclose(w[1], torch.tensor(1.0))


def test_noise_offset_shifts_channels():
    torch.manual_seed(0)
    n = sample_noise(torch.zeros(64, 4, 8, 8), offset=1.0)
    assert n.mean(dim=(2, 3)).std() > 0.5  # per-channel shifts dominate


def test_losses_fp32_and_normalised():
    a = torch.randn(2, 16, 8, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(2, 16, 8, dtype=torch.bfloat16)
    loss = mse(a, b)
    assert loss.dtype == torch.float32
    assert torch.isclose(loss, ((a.float() - b.float()) ** 2).mean())
    big = feature_loss(a * 10, b * 10, "normalized")
    assert torch.isclose(big, feature_loss(a, b, "normalized"), rtol=1e-2)  # scale-free
    with pytest.raises(ValueError, match="mse, normalized"):
        feature_loss(a, b, "l1")


def test_loss_accepts_inference_mode_teacher_features():
    with torch.inference_mode():
        t = torch.randn(4, 8)
    s = torch.randn(4, 8, requires_grad=True)
    mse(s, t).backward()
    assert s.grad is not None


@pytest.mark.parametrize("teacher", ["sdxl-turbo", "sdxl-lightning-4step"])
def test_teacher_schedule_trains_at_the_steps_its_students_sample(teacher):
    from diffusers import EulerDiscreteScheduler

    from koala.config.compose import compose_config
    from koala.config.schema import TrainConfig
    from koala.models.archs import SDXL_SCHEDULER_CONFIG
    from koala.ship.presets import get_preset, preset_scheduler

    cfg = compose_config("train", [f"teacher={teacher}", "timesteps=teacher_schedule"], schema=TrainConfig)
    trained = set(TimestepSampler(cfg.timesteps, 1000, cfg.teacher.steps).choices.tolist())
    scheduler = preset_scheduler(
        EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG).config, get_preset(cfg.teacher.kind)
    )
    scheduler.set_timesteps(cfg.teacher.steps)
    assert trained == {round(t) for t in scheduler.timesteps.tolist()} and len(trained) == 4
