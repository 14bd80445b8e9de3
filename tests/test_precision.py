"""Mixed precision as real recipes use it: bf16 teacher and text encoders, fp32 student under bf16 autocast."""

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from PIL import Image

from koala.config.compose import compose_config
from koala.config.schema import TrainConfig
from koala.distill.task import DistillationTask, LossWeights
from koala.models.plans import student_plan
from koala.train.build import build_trainable, load_frozen
from koala.train.sampling import SampleRenderer


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerator() here sets process-wide state; later in-process runs choose their own mixed precision."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def recipe(tiny_pipeline_dir, *extra):
    return compose_config("train", [
        "experiment=koala-700m", "unet=tiny-700m", f"teacher.pipeline={tiny_pipeline_dir}", "teacher.arch=tiny",
        "data=demo", "data.resolution=32", "sample_steps=2", "report_to=[]", *extra,
    ], schema=TrainConfig)  # fmt: skip


def test_bf16_teacher_and_fp32_student_sample_real_images(tiny_pipeline_dir, tmp_path):
    cfg = recipe(tiny_pipeline_dir)
    assert cfg.teacher.dtype == "bf16" and cfg.mixed_precision == "bf16"
    conditioner, _, teacher = load_frozen(cfg, torch.device("cpu"))
    teacher.to(torch.bfloat16)
    student = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet")  # fp32
    renderer = SampleRenderer(cfg, conditioner, Accelerator(cpu=True), tmp_path)
    for path in (renderer.render(teacher, "teacher"), renderer.render(student, "student-00000001", 1)):
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (32, 64, 3) and pixels.std() > 0


def test_student_inherits_the_stored_precision_not_the_teacher_dtype(tiny_pipeline_dir):
    cfg = recipe(tiny_pipeline_dir)
    _, noising, teacher = load_frozen(cfg, torch.device("cpu"))
    stored = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet").state_dict()
    plan = student_plan(dict(teacher.config), cfg.unet)
    run = build_trainable(cfg, Accelerator(cpu=True), teacher, noising, plan, latent_size=16)
    s = run.student.state_dict()
    for name in ("conv_in.weight", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"):
        assert s[name].dtype == torch.float32 and torch.equal(s[name], stored[name]), name  # not bf16-rounded


def test_teacher_computes_in_its_own_dtype_under_the_students_autocast(tiny_teacher):
    student = UNet2DConditionModel.from_config(tiny_teacher.config)
    task = DistillationTask(student, tiny_teacher, [], LossWeights())
    g = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    cond = {
        "prompt_embeds": torch.randn(1, 77, 64, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 32, generator=g),
        "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]]),
    }
    plain = task.teacher_forward(noisy, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = task.teacher_forward(noisy, t, cond)
    assert under.dtype == torch.float32 and torch.equal(plain, under)


def test_time_ids_reach_teacher_and_student_unrounded(tiny_teacher):
    """A bf16 teacher beside a bf16-autocast student: both embed the exact sizes (bf16 holds 1023 as 1024)."""
    import copy

    teacher = copy.deepcopy(tiny_teacher).to(torch.bfloat16)
    student = UNet2DConditionModel.from_config(tiny_teacher.config)
    task = DistillationTask(student, teacher, [], LossWeights())
    seen = {}
    for name, unet in (("teacher", teacher), ("student", student)):
        unet.add_time_proj.register_forward_pre_hook(lambda m, args, name=name: seen.update({name: args[0].clone()}))
    g = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    sizes = torch.tensor([[1023.0, 1365, 7, 3, 1023, 1365]])
    cond = {
        "prompt_embeds": torch.randn(1, 77, 64, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 32, generator=g),
        "time_ids": sizes,
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        task(noisy, t, cond, torch.randn(1, 4, 8, 8, generator=g))
    assert seen.keys() == {"teacher", "student"}
    for name, time_ids in seen.items():
        assert time_ids.dtype == torch.float32 and time_ids.tolist() == sizes.flatten().tolist(), name


def test_text_encoders_run_in_conditioning_dtype_not_the_teachers(tiny_pipeline_dir):
    from koala.data.conditioning import conditioning_dtype

    cfg = recipe(tiny_pipeline_dir)  # teacher.dtype=bf16
    assert cfg.teacher.dtype == "bf16" and cfg.conditioning.dtype == "auto"
    assert conditioning_dtype(cfg, "cpu") == "fp32" and conditioning_dtype(cfg, "cuda") == "fp16"
    for setting, dtype in (([], torch.float32), (["conditioning.dtype=fp16"], torch.float16)):
        conditioner = load_frozen(recipe(tiny_pipeline_dir, *setting), torch.device("cpu"))[0]
        assert {p.dtype for p in conditioner.text_encoders.parameters()} == {dtype}, setting
        assert {p.dtype for p in conditioner.vae.parameters()} == {torch.float32}  # SDXL's VAE: fp32 always
    renderer = SampleRenderer(recipe(tiny_pipeline_dir, "conditioning.dtype=bf16"), None, Accelerator(cpu=True), None)
    assert renderer.text_dtype == torch.bfloat16  # what sample grids encode in, when the conditioner holds no encoders
