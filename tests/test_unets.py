"""Student specs, derived configs and weight inheritance (KOALA.md sections 1 and 2)."""

import subprocess
import sys

import pytest
import torch
from conftest import unet_inputs
from diffusers import UNet2DConditionModel

from koala.models.archs import SDXL_UNET_CONFIG, TINY_UNET_CONFIG
from koala.models.inherit import inherit_weights, map_name, module_map, select_layers
from koala.models.specs import SPECS, StudentSpec, get_spec, spec_from_fields
from koala.models.unets import build_student, build_unet, count_parameters, count_self_attention, resolve, stage_rows


@pytest.mark.parametrize(
    "name,params,sa",
    [("sdxl", 2_567_463_684, 70), ("koala-1b", 1_161_184_324, 30), ("koala-700m", 782_822_724, 21)],
)
def test_exact_parameter_counts_on_meta(name, params, sa):
    unet = build_student(SDXL_UNET_CONFIG, get_spec(name), device="meta")
    assert next(unet.parameters()).device.type == "meta"
    assert count_parameters(unet) == params
    assert count_self_attention(unet) == sa


def _depths(unet):
    """Per-layer transformer depths in ComfyUI's order: encoder input blocks, decoder output blocks."""
    enc, dec = [], []
    for b in unet.down_blocks:
        atts = getattr(b, "attentions", None) or []
        enc += [len(a.transformer_blocks) for a in atts] or [0] * len(b.resnets)
    for b in unet.up_blocks:
        atts = getattr(b, "attentions", None) or []
        dec += [len(a.transformer_blocks) for a in atts] or [0] * len(b.resnets)
    return enc, dec


def test_ssd1b_and_vega_depths_match_published_layouts():
    # ComfyUI lists decoder depths from the shallowest output block; diffusers' up_blocks start at the deepest.
    ssd = build_student(SDXL_UNET_CONFIG, get_spec("ssd-1b"), device="meta")
    enc, dec = _depths(ssd)
    assert enc == [0, 0, 2, 2, 4, 4] and dec == list(reversed([0, 0, 0, 1, 1, 2, 10, 4, 4]))
    assert ssd.mid_block is not None and len(ssd.mid_block.attentions) == 0
    vega = build_student(SDXL_UNET_CONFIG, get_spec("vega"), device="meta")
    enc, dec = _depths(vega)
    assert enc == [0, 0, 1, 1, 2, 2] and dec == list(reversed([0, 0, 0, 1, 1, 1, 2, 2, 2]))


def test_koala_stage_structure():
    k7 = build_student(SDXL_UNET_CONFIG, get_spec("koala-700m"), device="meta")
    assert k7.mid_block is None
    rows = {r["stage"]: r for r in stage_rows(k7)}
    assert rows["encoder.2"]["depth"] == [5] and rows["decoder.0"]["depth"] == [5, 5]
    assert [r["resnets"] for r in stage_rows(k7)] == [1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("name", ["tiny-1b", "tiny-700m"])
def test_every_inherited_tensor_equals_its_mapped_teacher_tensor(tiny_teacher, name):
    plan = resolve(dict(tiny_teacher.config), get_spec(name))
    student = build_student(dict(tiny_teacher.config), get_spec(name))
    report = inherit_weights(student, tiny_teacher, plan)
    t_state, s_state = tiny_teacher.state_dict(), student.state_dict()
    assert set(report.copied) == set(s_state)  # no tensor left without a source
    for s_name, t_name in report.copied.items():
        assert torch.equal(s_state[s_name], t_state[t_name]), s_name
    # the documented decoder mapping: student layer 1 <- teacher layer 2
    assert report.copied["up_blocks.1.resnets.1.conv1.weight"] == "up_blocks.1.resnets.2.conv1.weight"
    assert report.copied["down_blocks.1.resnets.0.conv1.weight"] == "down_blocks.1.resnets.0.conv1.weight"


def test_identity_spec_is_bit_identical(tiny_teacher):
    spec = get_spec("sdxl")
    student = build_student(dict(tiny_teacher.config), spec).eval()
    inherit_weights(student, tiny_teacher, resolve(dict(tiny_teacher.config), spec))
    x = unet_inputs()
    with torch.no_grad():
        assert torch.equal(student(**x).sample, tiny_teacher(**x).sample)


def test_layer_selection_rules():
    assert select_layers(10, 5, "first") == (0, 1, 2, 3, 4)
    assert select_layers(10, 5, "last") == (5, 6, 7, 8, 9)
    assert select_layers(10, 6, "uniform") == (0, 2, 4, 5, 7, 9)
    assert select_layers(4, 2, "uniform") == (0, 3)
    with pytest.raises(ValueError, match="first, uniform, last"):
        select_layers(4, 2, "middle")


@pytest.mark.parametrize("rule,expected", [("uniform", (0, 3)), ("last", (2, 3))])
def test_uniform_and_last_pick_documented_teacher_layers(tiny_teacher, rule, expected):
    spec = spec_from_fields("tiny-700m", layer_select=rule)
    plan = resolve(dict(tiny_teacher.config), spec)
    student = build_student(dict(tiny_teacher.config), spec)
    report = inherit_weights(student, tiny_teacher, plan)
    for a, b in enumerate(expected):
        key = f"up_blocks.0.attentions.1.transformer_blocks.{a}.attn1.to_q.weight"
        assert report.copied[key] == f"up_blocks.0.attentions.2.transformer_blocks.{b}.attn1.to_q.weight"
        assert torch.equal(student.state_dict()[key], tiny_teacher.state_dict()[report.copied[key]])


@pytest.mark.slow
def test_saved_student_loads_with_plain_diffusers(tmp_path, tiny_teacher):
    spec = get_spec("tiny-700m")
    student = build_student(dict(tiny_teacher.config), spec)
    inherit_weights(student, tiny_teacher, resolve(dict(tiny_teacher.config), spec))
    student.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    code = (
        "import sys, torch; from diffusers import UNet2DConditionModel as U;"
        f"u = U.from_pretrained({str(tmp_path / 'unet')!r});"
        "print(sum(p.numel() for p in u.parameters())); assert 'koala' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) == count_parameters(student)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(student.config)
    for k, v in student.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_asymmetric_spec_round_trips_through_config(tmp_path):
    unet = build_student(TINY_UNET_CONFIG, StudentSpec("x", decoder_depth=((4, 2, 4), 2, 0), mid="resnet"))
    unet.save_pretrained(tmp_path)
    again = UNet2DConditionModel.from_pretrained(tmp_path)
    assert _depths(again) == _depths(unet)


def test_unknown_spec_names_valid_choices():
    with pytest.raises(KeyError) as e:
        get_spec("koala-2b")
    for name in SPECS:
        assert name in str(e.value)
    with pytest.raises(KeyError, match="koala-700m"):
        spec_from_fields("koala-2b")


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"encoder_keep": [[0, 1, 2], [0], [0]]}, "teacher's stage has layers"),
        ({"encoder_depth": [1, 2, 11], "decoder_depth": [11, 2, 1]}, "has only 10"),
        ({"encoder_keep": [[0, 1], [0], [0]]}, "one more decoder layer"),
        ({"layer_select": "middle"}, "first, uniform, last"),
        ({"mid": "all"}, "keep, resnet, none"),
    ],
)
def test_spec_asking_for_more_than_the_teacher_has_fails(fields, match):
    with pytest.raises(ValueError, match=match):
        resolve(SDXL_UNET_CONFIG, spec_from_fields("koala-700m", **fields))


def test_missing_teacher_tensor_is_an_error_naming_it():
    teacher = build_unet(TINY_UNET_CONFIG)
    spec = get_spec("tiny-700m")
    plan = resolve(TINY_UNET_CONFIG, spec)
    student = build_student(TINY_UNET_CONFIG, spec)
    state = teacher.state_dict()
    del state["up_blocks.0.resnets.2.conv1.weight"]
    teacher_missing = build_unet(TINY_UNET_CONFIG)
    teacher_missing.state_dict = lambda: state  # a teacher checkpoint lacking one tensor
    with pytest.raises(ValueError, match=r"up_blocks\.0\.resnets\.1\.conv1\.weight"):
        inherit_weights(student, teacher_missing, plan)


def test_random_init_only_where_asked():
    teacher = build_unet(TINY_UNET_CONFIG)
    spec = spec_from_fields("tiny-700m", random_init=["conv_out"])
    student = build_student(TINY_UNET_CONFIG, spec)
    report = inherit_weights(student, teacher, resolve(TINY_UNET_CONFIG, spec))
    assert report.random_init == ["conv_out.weight", "conv_out.bias"]


def test_module_map_is_data():
    plan = resolve(SDXL_UNET_CONFIG, get_spec("koala-700m"))
    m = module_map(plan)
    assert m["up_blocks.0.attentions.1"] == "up_blocks.0.attentions.2"
    assert map_name("up_blocks.0.attentions.1.transformer_blocks.4.attn1", m) == (
        "up_blocks.0.attentions.2.transformer_blocks.4.attn1"
    )
    assert map_name("conv_in.weight", m) == "conv_in.weight"


@pytest.mark.slow
def test_inspect_prints_counts():
    out = subprocess.run(
        [sys.executable, "-m", "koala.inspect", "unet=koala-700m"], capture_output=True, text=True, check=True
    ).stdout
    assert "782,822,724" in out and "2,567,463,684" in out and "0.305" in out


@pytest.mark.slow
def test_inspect_unknown_spec_fails_naming_choices():
    res = subprocess.run([sys.executable, "-m", "koala.inspect", "unet=koala-2b"], capture_output=True, text=True)
    assert res.returncode != 0 and "koala-700m" in res.stderr + res.stdout
