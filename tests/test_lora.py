"""SDXL LoRAs carried over to a student through the inheritance map (koala.lora), read back by stock diffusers/peft."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from rundir import write_run_dir
from safetensors.torch import load_file, save_file

from koala.lora import main
from koala.models.convert import diffusers_to_original
from koala.models.specs import SPECS
from koala.models.unets import resolve
from koala.ship.export import export_run
from koala.ship.lora_remap import remap_file

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


@pytest.fixture(scope="module")
def loras(tiny_pipeline_dir, tmp_path_factory):
    """One random LoRA on the tiny teacher, saved by diffusers (PEFT layout) and in kohya's SGM layout."""
    root = tmp_path_factory.mktemp("loras")
    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet")
    full = unet.state_dict()
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=TARGETS))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    state = get_peft_model_state_dict(unet)
    StableDiffusionXLPipeline.save_lora_weights(
        root / "peft", unet_lora_layers=state, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict()
    )
    original = dict(zip(full, diffusers_to_original(full, prefix="")))
    kohya = {}
    for key in (k for k in state if k.endswith(".lora_A.weight")):
        module = key[: -len(".lora_A.weight")]
        name = "lora_unet_" + original[module + ".weight"][: -len(".weight")].replace(".", "_")
        kohya[f"{name}.lora_down.weight"] = state[key]
        kohya[f"{name}.lora_up.weight"] = state[f"{module}.lora_B.weight"]
        kohya[f"{name}.alpha"] = torch.tensor(8.0)
    for te, out_features in (("te1", 32), ("te2", 64)):  # kohya text-encoder adapters (tiny CLIP width 32)
        name = f"lora_{te}_text_model_encoder_layers_0_" + ("self_attn_q_proj" if te == "te1" else "mlp_fc1")
        kohya[f"{name}.lora_down.weight"] = torch.randn(4, 32) * 0.1
        kohya[f"{name}.lora_up.weight"] = torch.randn(out_features, 4) * 0.1
    save_file(kohya, str(root / "kohya.safetensors"))
    return {"peft": root / "peft" / "pytorch_lora_weights.safetensors", "kohya": root / "kohya.safetensors"}


@pytest.fixture(scope="module")
def teacher_config(tiny_pipeline_dir):
    return dict(UNet2DConditionModel.load_config(tiny_pipeline_dir / "unet"))


def test_both_layouts_remap_to_the_same_student_lora(loras, teacher_config, tmp_path):
    plan = resolve(teacher_config, SPECS["tiny-700m"])
    report = remap_file(loras["peft"], tmp_path / "a.safetensors", teacher_config, plan)
    remap_file(loras["kohya"], tmp_path / "b.safetensors", teacher_config, plan)
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == {k for k in b if k.startswith("unet.")} and all(torch.allclose(a[k], b[k]) for k in a)
    assert {k for k in b if not k.startswith("unet.")} == {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight",
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight",
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight",
    }
    # student decoder layer 1 inherits teacher layer 2 (KOALA.md section 2): its adapter comes from there
    assert report.kept["up_blocks.1.resnets.1.conv1"] == "up_blocks.1.resnets.2.conv1"
    assert "up_blocks.1.resnets.1.conv1" in {k for k in report.dropped}
    assert not any(k.startswith("mid_block.") for k in report.kept)  # tiny-700m has no mid block
    summary = report.summary()
    assert "dropped mid_block.attentions.0 " in summary and "down_blocks.2.attentions.0.transformer_blocks.2" in summary
    assert 0.3 < report.fraction_kept < 0.9


def test_identity_spec_keeps_every_layer(loras, teacher_config, tmp_path):
    report = remap_file(
        loras["kohya"], tmp_path / "id.safetensors", teacher_config, resolve(teacher_config, SPECS["sdxl"])
    )
    assert not report.dropped and report.fraction_kept == pytest.approx(1.0)
    unet_keys = {k for k in load_file(tmp_path / "id.safetensors") if k.startswith("unet.")}
    assert unet_keys == set(load_file(loras["peft"]))


@pytest.mark.slow
def test_stock_diffusers_loads_the_remapped_lora(loras, tiny_pipeline_dir, teacher_config, tmp_path):
    """Teacher + LoRA vs student + remapped LoRA, both through `pipe.load_lora_weights` in a koala-free process."""
    student_dir = export_run(write_run_dir(tmp_path, tiny_pipeline_dir), out=tmp_path / "export")
    out = tmp_path / "student_lora.safetensors"
    report = main([f"run_dir={tmp_path / 'run'}", f"lora={loras['peft']}", f"out={out}"])
    remap_file(
        loras["kohya"], tmp_path / "identity.safetensors", teacher_config, resolve(teacher_config, SPECS["sdxl"])
    )
    g = torch.Generator().manual_seed(0)
    save_file(
        {
            "sample": torch.randn(2, 4, 16, 16, generator=g),
            "timestep": torch.tensor([100, 700]),
            "encoder_hidden_states": torch.randn(2, 77, 64, generator=g),
            "text_embeds": torch.randn(2, 32, generator=g),
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2),
        },
        str(tmp_path / "inputs.safetensors"),
    )
    jobs = [
        ("teacher", tiny_pipeline_dir, loras["peft"]),
        ("identity", tiny_pipeline_dir, tmp_path / "identity.safetensors"),
        ("student", student_dir, out),
    ]
    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import StableDiffusionXLPipeline
        from safetensors.torch import load_file, save_file
        x = load_file({str(tmp_path / "inputs.safetensors")!r})
        res = {{}}
        for name, model, lora in {[(n, str(m), str(f)) for n, m, f in jobs]!r}:
            pipe = StableDiffusionXLPipeline.from_pretrained(model)
            def eps():
                with torch.no_grad():
                    return pipe.unet(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                                     added_cond_kwargs={{"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}}).sample
            before, weights = eps(), {{k: v.clone() for k, v in pipe.unet.state_dict().items()}}
            pipe.load_lora_weights(lora)
            res[name] = eps() - before
            res[name + "_text_adapters"] = torch.tensor([
                sum("lora_A" in n for n, _ in te.named_parameters()) for te in (pipe.text_encoder, pipe.text_encoder_2)])
            if name == "identity":
                continue
            pipe.fuse_lora()
            for k, v in pipe.unet.state_dict().items():
                if k.endswith(".base_layer.weight"):
                    plain = k.replace(".base_layer", "")
                    res[name + ":" + plain] = v - weights[plain]
        assert not any(m == "koala" or m.startswith("koala.") for m in sys.modules)
        save_file(res, {str(tmp_path / "deltas.safetensors")!r})
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    d = load_file(tmp_path / "deltas.safetensors")

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])

    assert corr(d["identity"], d["teacher"]) > 0.99  # kohya in, identity spec: the teacher's own LoRA
    assert torch.allclose(d["identity"], d["teacher"], atol=1e-5)
    assert d["identity_text_adapters"].tolist() == [1, 1]  # kohya lora_te1_ / lora_te2_ reach the text encoders
    # every kept student layer gets exactly the weight delta of the teacher layer it inherited from
    for s, t in report.kept.items():
        assert torch.allclose(d[f"student:{s}.weight"], d[f"teacher:{t}.weight"], atol=1e-6), s
    assert len(report.kept) == sum(k.startswith("student:") for k in d)
    assert d["student"].abs().max() > 1e-3  # and it changes the student's output


def _write(path, state):
    save_file(state, str(path))
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("sd15_kohya", "SD 1.x / 2.x"),
        ("sd15_unet", "SD 1.x / 2.x"),
        ("sd15_shape", "768-wide"),
        ("unknown", "no LoRA layout"),
        ("loha", "LoHa"),
        ("pickle", "pickle"),
        ("pickle_named_safetensors", "pickle"),
    ],
)
def test_bad_loras_fail_clearly_and_write_nothing(case, message, teacher_config, tmp_path):
    down, up = torch.zeros(4, 32), torch.zeros(32, 4)
    if case == "sd15_kohya":
        src = _write(
            tmp_path / "x.safetensors",
            {
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
            },
        )
    elif case == "sd15_unet":
        k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
        src = _write(tmp_path / "x.safetensors", {f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up})
    elif case == "sd15_shape":
        k = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
        src = _write(
            tmp_path / "x.safetensors",
            {f"{k}.lora_A.weight": torch.zeros(4, 768), f"{k}.lora_B.weight": torch.zeros(64, 4)},
        )
    elif case == "unknown":
        src = _write(tmp_path / "x.safetensors", {"some.random.tensor": down})
    elif case == "loha":
        src = _write(tmp_path / "x.safetensors", {"lora_unet_input_blocks_4_1_proj_in.hada_w1_a": down})
    elif case == "pickle":
        src = tmp_path / "x.ckpt"
        torch.save({"a": down}, src)
    else:
        src = tmp_path / "x.safetensors"
        torch.save({"a": down}, src)
    out = tmp_path / "out.safetensors"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        remap_file(src, out, teacher_config, resolve(teacher_config, SPECS["tiny-700m"]))
    assert not out.exists() and not out.with_name(out.name + ".tmp").exists()


def test_older_diffusers_layout_reads_the_same(loras, teacher_config, tmp_path):
    """`.lora.down/.up` and attention-processor keys (`processor.to_q_lora`) with `.alpha`, as older diffusers wrote."""
    state, old = load_file(loras["peft"]), {}
    for key in (k for k in state if k.endswith(".lora_A.weight")):
        module = key[: -len(".lora_A.weight")]
        parent, _, proj = module.rpartition(".attn1.")
        if proj in ("to_q", "to_k", "to_v", "to_out.0"):
            base = f"{parent}.attn1.processor.{proj.split('.')[0]}_lora"
        else:
            base = f"{module}.lora"
        old[f"{base}.down.weight"], old[f"{base}.up.weight"] = state[key], state[f"{module}.lora_B.weight"]
        old[f"{module}.alpha"] = torch.tensor(8.0)
    assert any(".processor.to_out_lora." in k for k in old)
    plan = resolve(teacher_config, SPECS["tiny-1b"])
    remap_file(_write(tmp_path / "old.safetensors", old), tmp_path / "a.safetensors", teacher_config, plan)
    remap_file(loras["peft"], tmp_path / "b.safetensors", teacher_config, plan)
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k]) for k in a)
