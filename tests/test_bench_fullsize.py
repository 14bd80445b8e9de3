"""The full-size CPU step (`python -m koala.bench fullsize`): the same command at tiny size, so it cannot rot, and the
random pipeline writer, whose full size is checked against SDXL-Base-1.0's parameter counts on the meta device."""

import math

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open

from koala.bench.fullsize import main
from koala.fixtures.pipeline import components, pipeline_size, write_random_pipeline
from koala.fixtures.tiny import write_byte_tokenizer
from koala.models.archs import TINY_UNET_CONFIG
from koala.models.specs import get_spec
from koala.models.unets import build_student, count_parameters

# SDXL-Base-1.0's components as published: CLIP-L text model, OpenCLIP-bigG text model with projection, VAE, U-Net.
SDXL_PARAMS = {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863, "unet": 2_567_463_684}


@pytest.mark.parametrize(
    "size", [pytest.param("sdxl", marks=pytest.mark.slow), "tiny"]
)  # sdxl: ~60 s on the meta device
def test_random_pipeline_components_fit_together(size, tmp_path):
    toks = [write_byte_tokenizer(tmp_path / "a"), write_byte_tokenizer(tmp_path / "b", pad_token="!")]
    with torch.device("meta"):
        built = {name: build() for name, build, _ in components(size, toks, torch.bfloat16)}
    te, te2, unet = built["text_encoder"].config, built["text_encoder_2"].config, built["unet"].config
    assert te.hidden_size + te2.hidden_size == unet.cross_attention_dim  # prompt_embeds: both encoders concatenated
    assert te2.projection_dim + 6 * unet.addition_time_embed_dim == unet.projection_class_embeddings_input_dim
    assert te.vocab_size >= len(toks[0]) and te.eos_token_id == toks[0].eos_token_id  # pooled at the byte EOS
    if size == "sdxl":
        assert {name: count_parameters(m) for name, m in built.items()} == SDXL_PARAMS
    with pytest.raises(ValueError, match="expected one of tiny, sdxl"):
        pipeline_size("sd15")


def test_random_pipeline_is_stored_in_its_dtype_and_loads_in_diffusers(tmp_path):
    path = write_random_pipeline(tmp_path / "p", size="tiny", dtype="bf16")
    assert torch.get_default_dtype() == torch.float32  # building in bf16 left the global default alone
    for folder, dtype in (("unet", "BF16"), ("text_encoder_2", "BF16"), ("vae", "F32")):
        weights = next((path / folder).glob("*.safetensors"))
        with safe_open(str(weights), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {dtype}, folder
    stamp = (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert write_random_pipeline(path, size="tiny") == path  # a complete folder is reused, not rewritten
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    pipe = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=torch.bfloat16)
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and math.isfinite(float(image.mean()))


@pytest.mark.slow
def test_fullsize_command_runs_the_recipe_at_tiny_size(tmp_path, capsys):
    """koala-1b at the tiny teacher's size with the lean settings: pipeline, cache, one step, checkpoint, export."""
    rec = main(
        [
            "bench.arch=tiny",
            "unet=koala-1b",
            "bench.resolution=64",
            "bench.samples=2",
            f"bench.root={tmp_path}",
            f"bench.out={tmp_path}/out",
        ]
    )
    phases = {p["name"]: p for p in rec["phases"]}
    assert list(phases) == ["pipeline", "cache", "train", "export"]
    assert all(p["returncode"] == 0 and not p["skipped"] and p["wall_s"] > 0 for p in phases.values())
    assert all(p["peak_rss"] > 100 * 2**20 for p in phases.values())  # a real process's high-water mark
    assert math.isfinite(rec["loss"])
    # the shipped experiment's precision and memory settings ran; only sizes, cadences, paths and the lean groups moved
    assert rec["experiment"] == "koala-1b"
    assert rec["settings"] == {
        "teacher.dtype": "bf16", "mixed_precision": "bf16", "gradient_checkpointing": True, "ema": False,
        "optim.use_8bit": True, "data.kind": "cached", "data.resolution": 64, "batch_size": 1, "distill.name": "koala",
        "unet.name": "tiny-1b",
    }  # fmt: skip
    allowed = {"batch_size", "grad_accum", "max_steps", "checkpoint_every", "log_every", "sample_every", "report_to",
               "output_dir", "teacher.pipeline", "teacher.arch", "unet.name", "ema", "optim.use_8bit"}  # fmt: skip
    assert {k for k in rec["changed"] if not k.startswith("data.")} <= allowed
    assert "data.caption_dropout" not in rec["changed"]
    run = tmp_path / "runs" / "tiny-koala-1b"
    assert (run / "checkpoints" / "step-00000001" / "COMPLETE").is_file()
    assert rec["disk"]["checkpoint"] > 0 and rec["disk"]["export"] > 0
    pipe = StableDiffusionXLPipeline.from_pretrained(run / "export", torch_dtype=torch.bfloat16)  # stock diffusers
    student = build_student(TINY_UNET_CONFIG, get_spec("tiny-1b"), device="meta")
    assert count_parameters(pipe.unet) == count_parameters(student)
    table = capsys.readouterr().out
    assert "| train | " in table and "peak RSS GiB" in table and "max_steps: 500000 -> 1" in table
