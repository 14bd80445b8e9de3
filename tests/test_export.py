"""Export: a run's checkpoint becomes a stock diffusers SDXL pipeline folder (KOALA.md section 5)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import UNet2DConditionModel
from rundir import write_run_dir
from safetensors.torch import load_file

from koala.export import main
from koala.ship.export import export_run
from koala.train.checkpoint import find_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tiny_pipeline_dir, tmp_path_factory):
    return write_run_dir(tmp_path_factory.mktemp("base"), tiny_pipeline_dir)


@pytest.fixture(scope="module")
def exported(run_dir):
    return export_run(run_dir, fp16=True)


def _same_weights(a: UNet2DConditionModel, b: UNet2DConditionModel) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_latest_skips_incomplete_checkpoints(run_dir):
    assert find_checkpoint(run_dir).name == "step-00000010"
    assert find_checkpoint(run_dir, 10).name == "step-00000010"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        find_checkpoint(run_dir, "step-00000020")


def test_missing_things_fail_with_what_exists(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"checkpoints present: step-00000010, step-00000020 \(incomplete"):
        find_checkpoint(run_dir, 30)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        export_run(tmp_path / "empty")


def test_export_layout_and_weights(run_dir, exported):
    files = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()}
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in files)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert any(f.startswith(f"{sub}/") and f.endswith(".fp16.safetensors") for f in files), sub
    assert {"model_index.json", "README.md", "unet/config.json", "tokenizer/tokenizer_config.json"} <= files
    ema = UNet2DConditionModel.from_pretrained(run_dir / "checkpoints/step-00000010/unet_ema")
    assert _same_weights(UNet2DConditionModel.from_pretrained(exported / "unet"), ema)
    fp16 = load_file(exported / "unet/diffusion_pytorch_model.fp16.safetensors")
    assert {t.dtype for t in fp16.values()} == {torch.float16}
    card = (exported / "README.md").read_text()
    for text in ("tiny-700m", "teacher | tiny", "kinds ['sa']", "loss/total | 0.1", "step 10"):
        assert text in card, text
    sched = json.loads((exported / "scheduler/scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerDiscreteScheduler" and sched["timestep_spacing"] == "leading"


def test_raw_weights_and_cli(run_dir, tmp_path):
    out = main([f"run_dir={run_dir}", "ema=false", f"out={tmp_path / 'raw'}"])
    raw = UNet2DConditionModel.from_pretrained(run_dir / "checkpoints/step-00000010/unet")
    assert _same_weights(UNet2DConditionModel.from_pretrained(out / "unet"), raw)


def test_single_file_export_reads_back_through_the_original_layout_loader(run_dir, tmp_path):
    from koala.models.teacher import load_unet

    out = main([f"run_dir={run_dir}", "single_file=true", "fp16=true", f"out={tmp_path / 'sf'}"])
    single = load_file(str(out / "unet.safetensors"))
    assert all(k.startswith("model.diffusion_model.") for k in single)
    assert {t.dtype for t in single.values()} == {torch.float32}  # the checkpoint's precision, fp16 variant or not
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    back = load_unet(out / "unet.safetensors", base_config=dict(unet.config))
    assert _same_weights(back, unet)


def test_exported_unet_config_holds_no_ema_settings(exported):
    import inspect

    config = json.loads((exported / "unet/config.json").read_text())
    accepted = set(inspect.signature(UNet2DConditionModel.__init__).parameters)
    assert {k for k in config if not k.startswith("_")} <= accepted, set(config) - accepted
    # the checkpoint's unet_ema/config.json does carry them (EMAModel.from_pretrained reads them back on resume)
    ema_config = json.loads((exported.parent / "checkpoints/step-00000010/unet_ema/config.json").read_text())
    assert "decay" in ema_config and "optimization_step" in ema_config


def test_export_never_deletes_what_koala_did_not_write(run_dir, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=rf"{theirs} .*not a koala export.*notes\.txt.*out=.*remove .*yourself"):
        export_run(run_dir, out=theirs)
    assert (theirs / "notes.txt").read_text() == "mine"
    out = tmp_path / "new"
    for sibling in ("new.tmp", "new.fp16"):  # names koala once used for its staging folders
        (tmp_path / sibling).mkdir()
        (tmp_path / sibling / "keep.txt").write_text("mine")
    export_run(run_dir, out=out, fp16=True)
    assert all((tmp_path / s / "keep.txt").read_text() == "mine" for s in ("new.tmp", "new.fp16"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "new.fp16", "new.tmp", "theirs"]


def test_reexport_replaces_only_a_koala_export(run_dir, tmp_path):
    out = export_run(run_dir, out=tmp_path / "out")
    marker = json.loads((out / ".koala-export").read_text())
    assert "unet/config.json" in marker["files"] and marker["checkpoint"] == "step-00000010"
    (out / "stale.txt").write_text("x")  # not listed in the marker: a later export must not delete it
    with pytest.raises(FileExistsError, match=r"stale\.txt"):
        export_run(run_dir, out=out, ema=False)
    (out / "stale.txt").unlink()
    export_run(run_dir, out=out, ema=False)  # a previous export, untouched: replaced
    raw = UNet2DConditionModel.from_pretrained(run_dir / "checkpoints/step-00000010/unet")
    assert _same_weights(UNet2DConditionModel.from_pretrained(out / "unet"), raw)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_run(run_dir, out=empty) == empty and (empty / ".koala-export").is_file()


def test_lightning_export_uses_trailing_spacing(tiny_pipeline_dir, tmp_path):
    run = write_run_dir(tmp_path, tiny_pipeline_dir, kind="lightning")
    out = export_run(run)
    sched = json.loads((out / "scheduler/scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerDiscreteScheduler" and sched["timestep_spacing"] == "trailing"
    assert "Euler, timestep spacing trailing, 10 steps, guidance 3.5" in (out / "README.md").read_text()


def test_turbo_export_ships_sdxl_turbos_sampler(tiny_pipeline_dir, tmp_path):
    out = export_run(write_run_dir(tmp_path, tiny_pipeline_dir, kind="turbo"))
    sched = json.loads((out / "scheduler/scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerAncestralDiscreteScheduler" and sched["timestep_spacing"] == "trailing"
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == ["diffusers", sched["_class_name"]]
    assert "Euler ancestral, timestep spacing trailing, 4 steps, guidance 0.0" in (out / "README.md").read_text()


@pytest.mark.slow
def test_export_loads_without_project_code(exported):
    script = textwrap.dedent(f"""
        import sys, torch
        from diffusers import StableDiffusionXLPipeline
        pipe = StableDiffusionXLPipeline.from_pretrained({str(exported)!r})
        image = pipe("a koala", num_inference_steps=2, height=32, width=32, output_type="pil",
                     generator=torch.Generator().manual_seed(0)).images[0]
        assert image.size == (32, 32), image.size
        assert not any(m == "koala" or m.startswith("koala.") for m in sys.modules)
        half = StableDiffusionXLPipeline.from_pretrained({str(exported)!r}, variant="fp16", torch_dtype=torch.float16)
        assert half.unet.dtype == torch.float16 and half.text_encoder.dtype == torch.float16
        print("LOADED", type(pipe.scheduler).__name__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=exported)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LOADED EulerDiscreteScheduler" in res.stdout
    assert "not expected" not in res.stderr, res.stderr[-2000:]  # diffusers warns about unknown config keys


def test_export_refuses_weights_that_are_not_finite(tiny_pipeline_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    from koala.train.checkpoint import NonFiniteWeights, seal_checkpoint

    run = write_run_dir(tmp_path, tiny_pipeline_dir)
    ckpt = run / "checkpoints" / "step-00000010"
    weights = ckpt / "unet_ema" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state[sorted(state)[0]] = torch.full_like(state[sorted(state)[0]], float("nan"))
    save_file(state, str(weights))  # a diverged EMA, sealed as the trainer of before would have sealed it
    (ckpt / "COMPLETE").unlink()
    seal_checkpoint(ckpt)
    with pytest.raises(NonFiniteWeights, match=r"unet_ema holds NaN or inf in 1 of \d+ tensors.*not exported"):
        export_run(run, checkpoint="10")
    assert not (run / "export").exists()
    assert export_run(run, checkpoint="10", ema=False).is_dir()  # the student itself is finite
    with pytest.raises(SystemExit) as code:
        main([f"run_dir={run}", f"out={tmp_path / 'cli'}"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code.value.code == 2 and last.startswith("error: ") and "NaN" in last and not (tmp_path / "cli").exists()


@pytest.mark.slow
def test_a_killed_export_leaves_nothing_that_the_next_export_does_not_remove(run_dir, tmp_path):
    out = tmp_path / "out"
    stop_in = textwrap.dedent(f"""
        import os, signal, sys, time
        import koala.export, koala.ship.export
        def stop(*args, **kwargs):  # the model card is written after the pipeline: the staging folder is full
            if sys.argv[1] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            print("staged", flush=True)
            time.sleep(600)
        koala.ship.export.write_model_card = stop
        koala.export.main(["run_dir={run_dir}", "out={out}"])
    """)  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", stop_in, "kill"], cwd=REPO, capture_output=True, timeout=300)
    assert killed.returncode == -9
    stale = sorted(p.name for p in tmp_path.iterdir())
    assert len(stale) == 2 and stale[0].startswith(".out.koala-tmp-") and stale[1] == stale[0] + ".lock"
    live = subprocess.Popen([sys.executable, "-c", stop_in, "wait"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        # a second export, still writing its staging folder (lines before: library notices, e.g. DeepSpeed's)
        assert any(line == "staged\n" for line in iter(live.stdout.readline, ""))
        running = {p.name for p in tmp_path.iterdir()} - set(stale)
        export_run(run_dir, out=out)
        assert {p.name for p in tmp_path.iterdir()} == {"out"} | running  # the killed one's gone, the live one kept
    finally:
        live.kill()
        live.wait()
    export_run(run_dir, out=out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
