"""Bad values fail before any model loads, in one line naming the key, the value and what is allowed: a bad choice
at compose time (the schema's types), a bad range or path in `check_config`."""

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from safetensors.torch import save_file

from koala.choice import Choice
from koala.config.checks import ConfigError, check_config
from koala.config.compose import COMPOSE_ERRORS, compose_config, error_line
from koala.config.schema import TrainConfig


def config(tmp_path, pipeline, *overrides):
    shards = tmp_path / "shards"
    if not shards.exists():
        from koala.fixtures.shards import write_demo_shards

        write_demo_shards(shards, n=4, resolution=32, samples_per_shard=2)
    return compose_config("train", [
        f"teacher.pipeline={pipeline}",
        f"data.path='{shards}/demo-{{00000..00001}}.tar'", "data.resolution=32", f"output_dir={tmp_path / 'run'}",
        *overrides,
    ], schema=TrainConfig)  # fmt: skip


@pytest.mark.parametrize(
    "override,message",
    [
        ("batch_size=0", "batch_size=0 is not allowed: expected a number >= 1"),
        ("distill.balance_batches=0", "distill.balance_batches=0 is not allowed: expected a number >= 1"),
        ("batch_size=-2", "batch_size=-2"),
        ("grad_accum=0", "grad_accum=0"),
        ("checkpoint_every=0", "checkpoint_every=0"),
        ("log_every=0", "log_every=0"),
        ("optim.lr=-1e-4", "optim.lr=-0.0001 is not allowed: expected a finite number > 0"),
        ("data.caption_dropout=1.5", "data.caption_dropout=1.5 is not allowed: expected a number in [0.0, 1.0]"),
        ("ema_decay=2", "ema_decay=2.0"),
        ("data.resolution=33", "data.resolution=33 is not allowed: expected a positive multiple of 8"),
        ("data.resolution=0", "data.resolution=0"),
        ("data.resolution=36", "data.resolution=36 is not allowed: expected a positive multiple of 64"),  # buckets
        ("data.max_consecutive_skips=0", "data.max_consecutive_skips=0"),
        ("optim.lr=inf", "optim.lr=inf is not allowed: expected a finite number > 0"),
        ("optim.lr=nan", "optim.lr=nan is not allowed"),
        ("optim.max_grad_norm=inf", "optim.max_grad_norm=inf is not allowed"),
        ("distill.feat_weight=inf", "distill.feat_weight=inf is not allowed"),
        ("seed=-1", "seed=-1 is not allowed: expected a number in [0, 4294967295]"),
    ],
)
def test_bad_values_are_named_in_one_line(override, message, tmp_path, tiny_pipeline_dir):
    extra = ["data.buckets=true"] if "=36" in override else []
    with pytest.raises(ConfigError) as err:
        check_config(config(tmp_path, tiny_pipeline_dir, override, *extra))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_paths_are_checked_before_loading(tmp_path, tiny_pipeline_dir):
    pickle = tmp_path / "unet.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(ConfigError, match="pickle checkpoint, refused"):
        check_config(config(tmp_path, tiny_pipeline_dir, f"teacher.unet={pickle}"))
    with pytest.raises(ConfigError, match="is a pickle checkpoint"):
        check_config(config(tmp_path, pickle))
    single = tmp_path / "unet.safetensors"
    save_file({}, str(single))
    with pytest.raises(ConfigError, match="is not a Stable Diffusion checkpoint koala recognises"):
        check_config(config(tmp_path, single))  # a file must be a full SDXL checkpoint (tests/test_teacher_file.py)
    with pytest.raises(ConfigError, match="matches no shard on disk"):
        check_config(config(tmp_path, tiny_pipeline_dir, f"data.path='{tmp_path}/nothing-{{0..3}}.tar'"))
    with pytest.raises(ConfigError, match="does not exist"):
        check_config(config(tmp_path, tiny_pipeline_dir, "data=folder", f"data.path={tmp_path}/no-folder"))


def bad_folders(tmp_path, pipeline) -> dict[str, list[str]]:
    """Overrides naming folders a run cannot use: an empty teacher, a U-Net folder of pickle weights, a run folder
    that cannot be made."""
    import shutil

    (tmp_path / "empty-teacher").mkdir(exist_ok=True)
    pickled = tmp_path / "bin-unet"
    pickled.mkdir(exist_ok=True)
    shutil.copy(pipeline / "unet" / "config.json", pickled)
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"never unpickled")
    (tmp_path / "a-file").write_text("x")
    for empty in ("empty-vae", "empty-data"):
        (tmp_path / empty).mkdir(exist_ok=True)
    return {
        "empty vae": [f"teacher.vae={tmp_path / 'empty-vae'}"],
        "empty hf dataset": ["data=hf", f"data.path={tmp_path / 'empty-data'}"],
        "empty image folder": ["data=folder", f"data.path={tmp_path / 'empty-data'}"],
        "empty teacher": [f"teacher.pipeline={tmp_path / 'empty-teacher'}"],
        "pickled unet": [f"teacher.unet={pickled}"],
        "empty output_dir": ["output_dir="],
        "output_dir in a file": [f"output_dir={tmp_path / 'a-file' / 'run'}"],
        "no sample prompts": ["sample_prompts=[]", "sample_every=5"],
    }


REFUSED = {  # what the one line says for each of `bad_folders`
    "empty teacher": "teacher.pipeline=.* is not a diffusers SDXL pipeline folder: it has no unet, vae, text_encoder, "
    "text_encoder_2, tokenizer, tokenizer_2, scheduler folders",
    "empty vae": "teacher: .*empty-vae has no config.json",
    "empty hf dataset": "data.path=.* holds no dataset: no parquet files, no save_to_disk folder",
    "empty image folder": "data.path=.* holds no jpg/jpeg/png/webp images",
    "pickled unet": r"teacher: .*bin-unet: no diffusion_pytorch_model.safetensors .*found pickle weights "
    r"\['diffusion_pytorch_model.bin'\]",
    "empty output_dir": "output_dir='' is empty \\(the run would be written into the current folder\\)",
    "output_dir in a file": "output_dir=.* cannot be created or written: .*a-file is a file",
    "no sample prompts": "sample_prompts is empty while sample_every=5 renders them",
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unusable_folders_and_settings_are_refused_before_loading(case, tmp_path, tiny_pipeline_dir):
    overrides = bad_folders(tmp_path, tiny_pipeline_dir)[case]
    pipeline = overrides.pop()[len("teacher.pipeline=") :] if case == "empty teacher" else tiny_pipeline_dir
    with pytest.raises(ConfigError, match=REFUSED[case]) as err:
        check_config(config(tmp_path, pipeline, *overrides))
    assert "\n" not in str(err.value)
    if case == "no sample prompts":
        check_config(config(tmp_path, pipeline, "sample_prompts=[]", "sample_every=0"))  # nothing to render: fine


@pytest.mark.slow
def test_every_start_up_refusal_is_one_line_with_status_2(tmp_path, tiny_pipeline_dir):
    cases = {**bad_folders(tmp_path, tiny_pipeline_dir), "lr": ["optim.lr=inf"], "seed": ["seed=-1"]}
    for case, overrides in cases.items():
        if not any(o.startswith("teacher.pipeline=") for o in overrides):
            overrides = [f"teacher.pipeline={tiny_pipeline_dir}", *overrides]
        if not any(o.startswith("output_dir=") for o in overrides):
            overrides.append(f"output_dir={tmp_path / 'run'}")
        res = subprocess.run([sys.executable, "-m", "koala.train", *overrides], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)  # fmt: skip
        errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
        assert res.returncode == 2 and len(errors) == 1, (case, res.returncode, res.stderr[-1500:])
        assert "Traceback" not in res.stderr and "Loading" not in res.stderr, case  # refused before any model loads
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing ran (Hydra alone made the folder for its log)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a-file",
        "bin-unet",
        "empty-data",
        "empty-teacher",
        "empty-vae",
        "run",
    ]  # nothing written into the cwd


@pytest.mark.slow
def test_cli_prints_one_line_and_no_traceback(tmp_path, tiny_pipeline_dir):
    res = subprocess.run(
        [sys.executable, "-m", "koala.train", "batch_size=0", f"teacher.pipeline={tiny_pipeline_dir}",
         f"output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert "error: batch_size=0 is not allowed" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout and "torchvision" not in res.stderr + res.stdout
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing ran (Hydra alone made the folder for its log)


# (config, override, what the one-line error must say): every choice field of every command, composed through Hydra
BAD_CHOICES = [
    ("train", "distill.loss=mse2", "distill.loss=mse2: Invalid value 'mse2', expected one of [mse, normalized]"),
    ("train", "teacher.kind=lightening", "Invalid value 'lightening', expected one of [base, lightning, turbo]"),
    ("train", "mixed_precision=fp8", "expected one of [no, fp16, bf16]"),
    ("train", "teacher.dtype=int8", "expected one of [bf16, fp16, fp32]"),
    ("train", "teacher.arch=sd15", "expected one of [sdxl, tiny, medium, shapes]"),
    ("train", "data.kind=lmdb", "expected one of [webdataset, hf, folder, cached]"),
    ("train", "data.hf_format=zip", "expected one of [auto, disk, parquet, imagefolder]"),
    ("train", "data.caption_dropout_mode=blank", "expected one of [zeros, empty]"),
    ("train", "timesteps=trailing", "expected one of [uniform, teacher_schedule]"),
    ("train", "distill.sa_point=attn2", "expected one of [attn1, residual]"),
    ("train", "distill.balance=gradient", "expected one of [none, grad]"),
    ("train", "distill.pairing=middle", "expected one of [first, uniform, last]"),
    ("train", "unet.layer_select=middle", "expected one of [first, uniform, last]"),
    ("train", "unet.mid=half", "expected one of [keep, resnet, none]"),
    ("train", "distill.kinds=[sa,xa]", "Invalid value 'xa', expected one of [sa, ca, ffn, lf, rb]"),
    ("train", "distill.stages=[middle]", "Invalid value 'middle', expected one of [encoder, mid, decoder]"),
    (
        "train",
        "distill.kind_weights={xa: 2.0}",
        "Key 'xa' is incompatible with the enum type 'TapKind', valid: [sa, ca",
    ),
    ("train", "distill.stage_weights={decodr: 2.0}", "Key 'decodr' is incompatible with the enum type 'Stage', valid"),
    ("train", "optim.scheduler=cosine2", "expected one of [linear, cosine, cosine_with_restarts"),
    ("train", "report_to=[tensorbord]", "expected one of [tensorboard, wandb]"),
    ("train", "teacher=lightening", "Could not find 'teacher/lightening'; Available options in 'teacher': sdxl-base"),
    ("cache", "cache.dtype=int8", "expected one of [bf16, fp16, fp32]"),
    ("generate", "preset=fast", "expected one of [base, lightning, turbo]"),
    ("generate", "preset=v1", "expected one of [base, lightning, turbo]"),  # base was called v1 before issue 23
    ("generate", "dtype=fp8", "expected one of [auto, bf16, fp16, fp32]"),
    ("evaluate", "convert=inceptionv3", "expected one of [inception, hps, open_clip, pickscore, clip]"),
    (
        "evaluate",
        "protocol.metrics=[fid,imagereward]",
        "expected one of [fid, fd_clip, clip_score, clip_cosine, hps, pickscore]",
    ),
    ("evaluate", "protocol.fid_input=clean-fid", "expected one of [torch-fidelity, pytorch-fid]"),
    ("evaluate", "protocol=coco30k-256", "coco30k-bksdm"),
    ("fixtures", "world=moon", "expected one of [demo, shapes, shapes-all]"),
    ("bench_unet", "bench.arch=sd15", "expected one of [sdxl, tiny, medium, shapes]"),
    ("bench_train", "bench.arch=large", "expected one of [sdxl, tiny, medium, shapes]"),
    ("bench_data", "bench.cache_dtype=fp8", "expected one of [bf16, fp16, fp32]"),
    ("bench_ablation", "bench.protocols=[none,even]", "expected one of [none, grad]"),
]


# Every command config (configs/<name>.yaml) and the schema its command composes it against (`run_command(...,
# schema=...)`): a new command adds its line here.
COMMAND_SCHEMAS = {
    "train": "koala.config.schema:TrainConfig",
    "cache": "koala.cache:CacheJobConfig",
    "inspect": "koala.inspect:InspectConfig",
    "export": "koala.export:ExportConfig",
    "generate": "koala.generate:GenerateConfig",
    "evaluate": "koala.evaluate:EvaluateConfig",
    "lora": "koala.lora:LoraRemapConfig",
    "search": "koala.search:SearchConfig",
    "synth": "koala.synth:SynthConfig",
    "fixtures": "koala.fixtures.__main__:FixturesConfig",
    "shapes_evaluate": "koala.shapes.evaluate:ShapesEvaluateConfig",
    "shapes_teacher": "koala.shapes.teacher:TeacherTrainConfig",
    "bench_unet": "koala.bench.unet:BenchUNetJob",
    "bench_data": "koala.bench.data:BenchDataJob",
    "bench_train": "koala.bench.train:BenchTrainJob",
    "bench_memory": "koala.bench.memory:BenchMemoryJob",
    "bench_ablation": "koala.bench.ablation:BenchAblationJob",
    "bench_gpu": "koala.bench.gpu:BenchGPUJob",
    "bench_fullsize": "koala.bench.fullsize:BenchFullsizeJob",
}


def command_schema(config_name: str) -> type:
    """The schema class the command of `configs/<config_name>.yaml` composes it against (imports the command)."""
    import importlib

    module, name = COMMAND_SCHEMAS[config_name].split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("config,override,message", BAD_CHOICES)
def test_bad_choices_fail_at_compose_time_naming_the_choices(config, override, message):
    with pytest.raises(COMPOSE_ERRORS) as err:
        compose_config(config, [override], schema=command_schema(config))
    line = error_line(err.value)
    assert message in line and "\n" not in line, line


def test_choices_read_and_write_as_their_names():
    """A choice is its name as a string everywhere a config goes: comparisons, messages, json, YAML, a saved
    config.yaml read back (what a resume compares), dict keys."""
    from koala.train.runs import config_changes

    for name in COMMAND_SCHEMAS:  # imports every module that defines a choice
        command_schema(name)
    for choice in Choice.__subclasses__():
        assert [m.name for m in choice] == [m.value for m in choice], choice
    cfg = compose_config("train", ["distill=sa+lf", "distill.loss=normalized", "mixed_precision=bf16",
                                   "distill.kind_weights={lf: 0.5}", "report_to=[wandb]"], schema=TrainConfig)  # fmt: skip
    loss = cfg.distill.loss
    assert loss == "normalized" and str(loss) == f"{loss}" == "normalized" and repr(loss) == "'normalized'"
    assert {"normalized": 1}[loss] == 1 and cfg.distill.kind_weights["lf"] == 0.5
    assert f"{cfg.distill.kinds}" == "['sa', 'lf']" and f"{cfg.mixed_precision:>5}" == " bf16"
    container = OmegaConf.to_container(cfg, resolve=True)
    assert json.loads(json.dumps(container))["distill"]["kind_weights"]["lf"] == 0.5
    text = OmegaConf.to_yaml(cfg, resolve=True)
    assert "loss: normalized" in text and "  lf: 0.5" in text and "- wandb" in text
    saved = OmegaConf.to_container(OmegaConf.create(text))
    assert config_changes(saved, container) == {} and config_changes(json.loads(json.dumps(container)), container) == {}
    assert (
        OmegaConf.to_yaml(OmegaConf.merge(compose_config("train", schema=TrainConfig), OmegaConf.create(text))) == text
    )  # read back


def test_a_plain_string_is_converted_or_refused_naming_the_choices():
    from koala.distill.losses import FeatureLoss

    assert FeatureLoss("mse") is FeatureLoss.mse
    with pytest.raises(ValueError, match="'mse2' is not a valid FeatureLoss: expected one of mse, normalized"):
        FeatureLoss("mse2")


@pytest.mark.parametrize("override,message", [
    ("distill.loss=mse2", "error: distill.loss=mse2: Invalid value 'mse2', expected one of [mse, normalized]"),
    ("teacher.kind=lightening", "error: teacher.kind=lightening: Invalid value 'lightening', expected one of [base,"),
])  # fmt: skip
@pytest.mark.slow
def test_cli_reports_a_bad_choice_in_one_line_before_any_model_loads(override, message, tmp_path):
    res = subprocess.run([sys.executable, "-m", "koala.train", override, f"output_dir={tmp_path / 'run'}"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(message), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "run").exists()  # composition failed: nothing was made, no model was loaded


def test_every_command_reports_a_bad_config_in_one_line(capsys):
    from koala.generate import main

    with pytest.raises(SystemExit) as exit:
        main(["model=nowhere", "prompt=a koala", "preset=fast"])
    err = capsys.readouterr().err
    assert (
        exit.value.code == 2
        and err == "error: preset=fast: Invalid value 'fast', expected one of [base, lightning, turbo]\n"
    )


def test_every_command_config_composes_on_its_registered_schema():
    from koala.config.compose import CONFIG_DIR

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert set(names) == set(COMMAND_SCHEMAS)  # one schema per command config, and back
    for name in names:
        compose_config(name, schema=command_schema(name))


@pytest.mark.slow
def test_importing_a_command_registers_no_schema():
    code = ("import koala.train.loop, koala.export, koala.generate, koala.evaluate, koala.lora, koala.cache, "
            "koala.inspect, koala.demo, koala.bench.__main__, koala.fixtures.__main__, koala.shapes.evaluate, "
            "koala.shapes.teacher, koala.search\n"
            "from hydra.core.config_store import ConfigStore\n"
            "print(sorted(ConfigStore.instance().repo))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "koala" not in out, out  # importing a command registers nothing
