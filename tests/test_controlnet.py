"""A stock SDXL ControlNet (tiny, built from the tiny teacher) driving students through koala.ship.controlnet."""

import pytest
import torch
from conftest import unet_inputs
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, UNet2DConditionModel

from koala.models.inherit import inherit_weights
from koala.models.specs import SPECS
from koala.models.unets import build_student, resolve
from koala.ship.controlnet import fit_controlnet, residual_sources


@pytest.fixture(scope="module")
def controlnet(tiny_teacher):
    """A ControlNet made from the tiny teacher, its zero-initialised output convolutions made random."""
    torch.manual_seed(0)
    cn = ControlNetModel.from_unet(tiny_teacher, conditioning_embedding_out_channels=(8, 16))  # VAE scale 2
    with torch.no_grad():
        for block in [*cn.controlnet_down_blocks, cn.controlnet_mid_block]:
            block.weight.normal_(0, 0.1)
    return cn.eval()


def _student(teacher, name):
    config = dict(teacher.config)
    plan = resolve(config, SPECS[name])
    student = build_student(config, SPECS[name])
    inherit_weights(student, teacher, plan)
    return student.eval(), plan


def _residual_shapes(unet, inputs):
    """Shapes of the skip tensors a U-Net's encoder hands its decoder (conv_in, layers, downsamplers)."""
    shapes = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))]
    hooks += [
        b.register_forward_hook(lambda m, i, o: shapes.extend(tuple(r.shape) for r in o[1])) for b in unet.down_blocks
    ]
    with torch.no_grad():
        unet(**inputs)
    for h in hooks:
        h.remove()
    return shapes


def _control_inputs(batch=2):
    x = unet_inputs(batch=batch)
    return x, {**x, "controlnet_cond": torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def test_residual_sources_follow_the_inheritance_map(tiny_teacher):
    # teacher residuals: conv_in 0 | stage 0 layers 1, 2, downsampler 3 | stage 1: 4, 5, 6 | stage 2: 7, 8
    assert residual_sources(resolve(dict(tiny_teacher.config), SPECS["tiny-700m"])) == [0, 1, 3, 4, 6, 7]
    assert residual_sources(resolve(dict(tiny_teacher.config), SPECS["sdxl"])) == list(range(9))


@pytest.mark.parametrize("name", ["tiny-700m", "tiny-1b"])
def test_fitted_residuals_match_the_student_and_drive_it(tiny_teacher, controlnet, name):
    student, plan = _student(tiny_teacher, name)
    fitted = fit_controlnet(controlnet, plan)
    x, cx = _control_inputs()
    with torch.no_grad():
        down, mid = fitted(**cx, return_dict=False)
        full, full_mid = controlnet(**cx, return_dict=False)
    assert [tuple(d.shape) for d in down] == _residual_shapes(student, x)
    for d, i in zip(down, residual_sources(plan)):
        assert torch.equal(d, full[i])
    assert torch.equal(mid, full_mid)
    with torch.no_grad():
        plain = student(**x).sample
        driven = student(**x, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert driven.shape == plain.shape and not torch.allclose(driven, plain)
    with pytest.raises(RuntimeError):  # the stock ControlNet's 9 residuals do not fit the student's skips
        student(**x, down_block_additional_residuals=full, mid_block_additional_residual=full_mid)


def test_identity_student_is_driven_exactly_like_the_teacher(tiny_teacher, controlnet):
    student, plan = _student(tiny_teacher, "sdxl")
    x, cx = _control_inputs()
    with torch.no_grad():
        d, m = fit_controlnet(controlnet, plan)(**cx, return_dict=False)
        td, tm = controlnet(**cx, return_dict=False)
        s = student(**x, down_block_additional_residuals=d, mid_block_additional_residual=m).sample
        t = tiny_teacher(**x, down_block_additional_residuals=td, mid_block_additional_residual=tm).sample
    assert torch.allclose(s, t, atol=1e-5)


def test_stock_controlnet_pipeline_runs_the_student(tiny_pipeline_dir, tiny_teacher, controlnet, tmp_path):
    student, plan = _student(tiny_teacher, "tiny-700m")
    student.save_pretrained(tmp_path / "unet")
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        tiny_pipeline_dir,
        unet=UNet2DConditionModel.from_pretrained(tmp_path / "unet"),
        controlnet=fit_controlnet(controlnet, plan),
    )
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = pipe(
        "a koala",
        image=image,
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 32, 32, 3)


def test_a_controlnet_for_another_teacher_is_refused(tiny_teacher, controlnet):
    _, plan = _student(tiny_teacher, "tiny-700m")
    sd15_like = ControlNetModel(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        layers_per_block=1,
        cross_attention_dim=64,
        norm_num_groups=8,
        attention_head_dim=2,
        conditioning_embedding_out_channels=(8, 16),
    )
    with pytest.raises(ValueError, match="produces 4 down-block residuals but the student's teacher has 9"):
        fit_controlnet(sd15_like, plan)


def test_a_controlnet_of_other_widths_is_refused_at_fit_time(tiny_teacher, controlnet):
    """The same layout (9 residuals) at other widths: refused by fit_controlnet, naming the first residuals that do not
    fit, instead of a shape error at the pipeline's first step."""
    _, plan = _student(tiny_teacher, "tiny-700m")
    config = {**dict(tiny_teacher.config), "block_out_channels": (16, 32, 64), "norm_num_groups": 8}
    wider = ControlNetModel.from_unet(
        UNet2DConditionModel.from_config(config), conditioning_embedding_out_channels=(8, 16)
    )
    assert len(wider.controlnet_down_blocks) == len(controlnet.controlnet_down_blocks)
    with pytest.raises(
        ValueError,
        match=r"conv_in: 16 channels, the student's has 32; down_blocks.0 layer 0: 16 channels.*"
        r"mid_block: 64 channels, the student's has 128.*block_out_channels \[16, 32, 64\].*\[32, 64, 128\]",
    ):
        fit_controlnet(wider, plan)
