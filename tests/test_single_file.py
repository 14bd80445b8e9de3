"""The exported single file (original SDXL layout) read back by diffusers' own `from_single_file`, without koala."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import UNet2DConditionModel
from rundir import write_run_dir
from safetensors.torch import load_file, save_file

from koala.models.convert import diffusers_to_original
from koala.models.specs import SPECS, StudentSpec
from koala.models.unets import build_student
from koala.ship.export import export_run

# Tiny analogues of the published layouts whose mid block or depths differ from SDXL's (KOALA.md section 1).
LAYOUTS = {
    "sdxl": SPECS["sdxl"],
    "tiny-1b": SPECS["tiny-1b"],  # mid block kept, shallower
    "ssd-1b-like": StudentSpec(
        "ssd-1b-like", encoder_depth=(0, 2, 3), decoder_depth=((3, 3, 4), (2, 1, 1), 0), mid="resnet"
    ),  # per-layer decoder depths, mid block without transformer
    "vega-like": StudentSpec("vega-like", encoder_depth=(0, 1, 2), decoder_depth=(2, 1, 0), mid="resnet"),
}


@pytest.mark.slow
def test_single_files_read_back_through_diffusers_from_single_file(tiny_pipeline_dir, tmp_path):
    run = write_run_dir(tmp_path, tiny_pipeline_dir)  # tiny-700m: no mid block
    folders = {"tiny-700m (koala.export default)": export_run(run, out=tmp_path / "export")}
    config = json.loads((tiny_pipeline_dir / "unet" / "config.json").read_text())
    for name, spec in LAYOUTS.items():
        torch.manual_seed(0)
        student = build_student(config, spec)
        student.save_pretrained(tmp_path / name / "unet")
        save_file(diffusers_to_original(student.state_dict()), str(tmp_path / name / "unet.safetensors"))
        folders[name] = tmp_path / name
    assert all(k.startswith("model.diffusion_model.") for k in load_file(folders["sdxl"] / "unet.safetensors"))
    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import UNet2DConditionModel
        for name, folder in {[(n, str(f)) for n, f in folders.items()]!r}:
            ref = UNet2DConditionModel.from_pretrained(folder + "/unet").state_dict()
            back = UNet2DConditionModel.from_single_file(folder + "/unet.safetensors", config=folder, subfolder="unet")
            got = back.state_dict()
            assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), name
            print("READ", name)
        assert not any(m == "koala" or m.startswith("koala.") for m in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("READ") == len(folders)
    assert UNet2DConditionModel.load_config(folders["ssd-1b-like"] / "unet")["mid_block_type"] == "UNetMidBlock2D"
