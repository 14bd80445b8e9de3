"""Teacher loading from local files: every route gives the source model's outputs; bad inputs fail clearly."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import unet_inputs
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import save_file

from koala.models.archs import TINY_UNET_CONFIG
from koala.models.convert import diffusers_to_original, is_original_layout
from koala.models.specs import get_spec
from koala.models.teacher import load_teacher, load_unet
from koala.models.unets import build_student, build_unet


def teacher_cfg(**kw):
    base = {"pipeline": None, "unet": None, "arch": "tiny", "dtype": "fp32", "name": "t"}
    return SimpleNamespace(**{**base, **kw})


def same_outputs(a, b):
    x = unet_inputs()
    with torch.no_grad():
        return torch.equal(a(**x).sample, b(**x).sample)


def random_unet(seed=1, config=TINY_UNET_CONFIG):
    torch.manual_seed(seed)
    return build_unet(config).eval()


def test_route_a_pipeline_folder(tiny_pipeline_dir, tiny_teacher):
    teacher = load_teacher(teacher_cfg(pipeline=str(tiny_pipeline_dir)))
    assert isinstance(teacher, UNet2DConditionModel)
    assert same_outputs(teacher, tiny_teacher)


def test_route_b_unet_folder(tiny_pipeline_dir, tiny_teacher):
    teacher = load_teacher(teacher_cfg(unet=str(tiny_pipeline_dir / "unet")))
    assert same_outputs(teacher, tiny_teacher)


def test_route_c_diffusers_single_file_on_pipeline_config(tmp_path, tiny_pipeline_dir):
    source = random_unet(seed=7)  # Lightning-style: other weights, same architecture
    save_file(source.state_dict(), tmp_path / "lightning_unet.safetensors")
    teacher = load_teacher(
        teacher_cfg(pipeline=str(tiny_pipeline_dir), unet=str(tmp_path / "lightning_unet.safetensors"))
    )
    assert same_outputs(teacher, source)
    # without a pipeline folder the built-in arch config is the base
    assert same_outputs(load_teacher(teacher_cfg(unet=str(tmp_path / "lightning_unet.safetensors"))), source)


def test_route_d_original_layout_single_file(tmp_path, tiny_teacher):
    original = diffusers_to_original(tiny_teacher.state_dict())
    assert is_original_layout(original) and "model.diffusion_model.input_blocks.0.0.weight" in original
    # a full single-file checkpoint also holds the text encoders and the VAE: they are ignored
    extra = {"conditioner.embedders.0.x": torch.zeros(2), "first_stage_model.decoder.y": torch.zeros(2)}
    save_file({**original, **extra}, tmp_path / "sdxl_single_file.safetensors")
    teacher = load_unet(tmp_path / "sdxl_single_file.safetensors", base_config=dict(tiny_teacher.config))
    assert same_outputs(teacher, tiny_teacher)


def test_route_d_student_round_trip(tmp_path):
    """The conversion also fits a student with fewer layers (export of a KOALA student as one file)."""
    spec = get_spec("tiny-700m")
    torch.manual_seed(3)
    student = build_student(TINY_UNET_CONFIG, spec).eval()
    save_file(diffusers_to_original(student.state_dict()), tmp_path / "student.safetensors")
    loaded = load_unet(tmp_path / "student.safetensors", base_config=dict(student.config))
    assert same_outputs(loaded, student)


def test_frozen_eval_sdpa_and_dtype(tiny_pipeline_dir):
    teacher = load_teacher(teacher_cfg(pipeline=str(tiny_pipeline_dir), dtype="bf16"))
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    assert all(isinstance(p, AttnProcessor2_0) for p in teacher.attn_processors.values())
    parent = torch.nn.ModuleDict({"teacher": teacher, "head": torch.nn.Dropout(0.5)})
    parent.train()
    assert parent["head"].training and not any(m.training for m in teacher.modules())
    teacher.train(True)
    assert not any(m.training for m in teacher.modules())


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_formats_are_refused(tmp_path, suffix):
    path = tmp_path / f"unet{suffix}"
    path.write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors"):
        load_unet(path)


def test_folder_with_only_pickle_weights_points_to_safetensors(tmp_path, tiny_pipeline_dir):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_pipeline_dir / "unet" / "config.json").read_text())
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_unet(folder)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-unet"):
        load_unet(tmp_path / "no-such-unet")
    with pytest.raises(ValueError, match="expected one of bf16, fp16, fp32"):
        load_unet(tmp_path, dtype="fp8")


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    student = build_student(TINY_UNET_CONFIG, get_spec("tiny-700m"))
    save_file(student.state_dict(), tmp_path / "student.safetensors")
    with pytest.raises(ValueError, match=r"missing \(556\): down_blocks\.0\.resnets\.1\.norm1\.weight"):
        load_unet(tmp_path / "student.safetensors", base_config=TINY_UNET_CONFIG)
    state = random_unet().state_dict()
    state["conv_in.weight"] = torch.zeros(32, 4, 1, 1)
    save_file(state, tmp_path / "bad_shape.safetensors")
    with pytest.raises(ValueError, match=r"shape mismatch .*conv_in\.weight"):
        load_unet(tmp_path / "bad_shape.safetensors", base_config=TINY_UNET_CONFIG)


def test_sharded_unet_folder(tmp_path):
    source = random_unet(seed=5)
    source.save_pretrained(tmp_path / "unet", safe_serialization=True, max_shard_size="200KB")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    assert same_outputs(load_unet(tmp_path / "unet"), source)


def test_writing_the_tiny_teacher_leaves_the_global_rng_alone(tmp_path):
    from koala.fixtures.tiny import write_tiny_pipeline

    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    write_tiny_pipeline(tmp_path / "tiny")
    assert torch.equal(torch.rand(3), expected)
