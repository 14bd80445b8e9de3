"""A full single-file SDXL checkpoint (original SGM layout) as the teacher: `teacher.pipeline=<file>.safetensors`.

The file is written from the tiny teacher by koala's own writer (U-Net, CLIP-L, OpenCLIP-bigG and VAE converted back to
the SGM names) and read by diffusers' single-file conversion; every part must read back equal to the folder's.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from conftest import comfy_package
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from koala.config.checks import ConfigError, check_teacher_paths
from koala.config.compose import compose_config
from koala.config.schema import TrainConfig
from koala.devices import parse_dtype
from koala.fixtures.pipeline import CLIP_L, OPENCLIP_BIGG, SDXL_VAE_CONFIG
from koala.models.archs import SDXL_SCHEDULER_CONFIG, SDXL_UNET_CONFIG
from koala.models.clip_vocab import BPE_MERGES, clip_vocab
from koala.models.convert_parts import pipeline_to_original
from koala.models.pipeline_parts import SDXL_BASE_CONFIG, PipelineSource, check_parts
from koala.models.single_file import CheckpointInfo, describe_checkpoint, require_full_sdxl
from koala.models.teacher import load_teacher
from koala.models.unets import count_parameters
from koala.ship.checkpoint_file import write_checkpoint_file

DTYPES = ("fp32", "fp16", "bf16")
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


@pytest.fixture(scope="module")
def files(tiny_pipeline_dir, tmp_path_factory):
    """The tiny teacher as one checkpoint per dtype, and its configs and tokenizers without any weights."""
    root = tmp_path_factory.mktemp("teacher-file")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pipeline_dir)
    out = {d: write_checkpoint_file(pipe, root / f"tiny-{d}.safetensors", parse_dtype(d)) for d in DTYPES}
    shutil.copytree(tiny_pipeline_dir, root / "config", ignore=shutil.ignore_patterns("*.safetensors"))
    return {**out, "config": root / "config", "pipe": pipe}


def teacher_section(**kw):
    return OmegaConf.create({"name": "t", "arch": "tiny", "dtype": "fp32", "pipeline": None, "unet": None,
                             "vae": None, "config": None, **kw})  # fmt: skip


def assert_same(got: torch.nn.Module, ref: torch.nn.Module, dtype: torch.dtype) -> None:
    a, b = got.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        want = b[k].to(dtype) if b[k].is_floating_point() else b[k]
        assert a[k].dtype == want.dtype and torch.equal(a[k], want), k


def test_the_file_holds_every_part_under_the_sgm_names(files):
    info = describe_checkpoint(files["fp32"])
    assert info.is_full_sdxl and info.parts == ["unet", "text_encoder", "text_encoder_2", "vae"]
    keys = set(info.shapes)
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
    ):
        assert key in keys, key
    assert len(info.shapes["first_stage_model.encoder.mid.attn_1.q.weight"]) == 4  # a 1x1 convolution, as SGM's
    assert {info.dtypes[k] for k in keys if not k.endswith("position_ids")} == {"F32"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_part_reads_back_equal_to_the_folder_in_its_stored_precision(files, dtype):
    source = PipelineSource(files[dtype], files["config"])
    source.check_file()
    pipe, torch_dtype = files["pipe"], parse_dtype(dtype)
    text_encoder, text_encoder_2 = source.text_encoders()
    assert_same(text_encoder, pipe.text_encoder, torch_dtype)
    assert_same(text_encoder_2, pipe.text_encoder_2, torch_dtype)
    assert_same(source.vae(), pipe.vae, torch_dtype)
    teacher = load_teacher(teacher_section(pipeline=str(files[dtype]), config=str(files["config"])), dtype=None)
    assert_same(teacher, pipe.unet, torch_dtype)
    for got, ref in zip(source.tokenizers(), (pipe.tokenizer, pipe.tokenizer_2)):
        assert got("a red circle").input_ids == ref("a red circle").input_ids and got.pad_token == ref.pad_token
    assert source.component_config("scheduler") == json.loads(
        (files["config"] / "scheduler" / "scheduler_config.json").read_text()
    )


def header_only(path: Path, shapes: dict[str, tuple[int, ...]], dtype=torch.float16) -> str:
    save_file({k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()}, str(path))
    return str(path)


UNET = "model.diffusion_model."
OTHER_FILES = {
    "sd1": ({"cond_stage_model.transformer.text_model.final_layer_norm.weight": (4,), UNET + "out.2.weight": (4,),
             "first_stage_model.decoder.conv_in.weight": (4,)}, "an SD 1.x checkpoint"),
    "sd2": ({"cond_stage_model.model.ln_final.weight": (4,), UNET + "out.2.weight": (4,)}, "an SD 2.x checkpoint"),
    "refiner": ({"conditioner.embedders.0.model.ln_final.weight": (4,), UNET + "label_emb.0.0.weight": (4, 4)},
                "an SDXL refiner checkpoint"),
    "sd3": ({UNET + "joint_blocks.0.x_block.attn.qkv.weight": (4,), "text_encoders.clip_g.x": (4,)}, "SD3"),
    "flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": (4,)}, "a Flux checkpoint"),
    "sd1-unet": ({UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (4, 768)}, "an SD 1.x U-Net"),
    "bare-unet": ({"input_blocks.0.0.weight": (4,), "out.2.weight": (4,)}, "pass it as teacher.unet"),
    "diffusers-unet": ({"conv_in.weight": (4,), "down_blocks.1.attentions.0.proj_in.weight": (4,)},
                       "a U-Net in diffusers key layout"),
    "no-vae": ({UNET + "label_emb.0.0.weight": (4, 4), "conditioner.embedders.0.transformer.x": (4,),
                "conditioner.embedders.1.model.x": (4,)}, "an SDXL checkpoint without its vae (first_stage_model.*)"),
    "junk": ({"foo.weight": (4,), "bar.bias": (4,)}, "not a Stable Diffusion checkpoint koala recognises"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(OTHER_FILES))
def test_other_files_are_named_before_anything_loads(case, tmp_path):
    shapes, what = OTHER_FILES[case]
    path = header_only(tmp_path / f"{case}.safetensors", shapes)
    with pytest.raises(ValueError, match="teacher.pipeline takes a full SDXL checkpoint") as e:
        require_full_sdxl(path)
    assert what in str(e.value)
    with pytest.raises(ConfigError) as e:  # the same one line from the config check, naming the key
        check_teacher_paths(OmegaConf.create({"teacher": teacher_section(pipeline=path)}))
    assert str(e.value).startswith(f"teacher.pipeline={path!r}: ") and what in str(e.value)
    assert "\n" not in str(e.value)


def test_an_sdxl_unet_alone_points_to_teacher_unet(files, tmp_path):
    from koala.models.convert import diffusers_to_original

    path = tmp_path / "unet-only.safetensors"
    save_file(diffusers_to_original(files["pipe"].unet.state_dict()), str(path))
    with pytest.raises(ValueError, match=r"an SDXL U-Net alone \(no text encoders, no VAE\): pass it as teacher.unet"):
        require_full_sdxl(path)


def test_pickles_fp8_and_unreadable_files_are_refused(files, tmp_path):
    for name in ("teacher.ckpt", "teacher.pt"):
        (tmp_path / name).write_bytes(b"\x80\x04")
        with pytest.raises(ConfigError, match="pickle checkpoint, refused because loading it can run code"):
            check_teacher_paths(OmegaConf.create({"teacher": teacher_section(pipeline=str(tmp_path / name))}))
    (tmp_path / "renamed.safetensors").write_bytes(b"\x80\x04 not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        require_full_sdxl(tmp_path / "renamed.safetensors")
    state = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in pipeline_state(files).items()}
    save_file(state, str(tmp_path / "fp8.safetensors"))
    with pytest.raises(ValueError, match="stores tensors as F8_E4M3; koala reads checkpoints in fp32, fp16 or bf16"):
        require_full_sdxl(tmp_path / "fp8.safetensors")


def pipeline_state(files) -> dict[str, torch.Tensor]:
    pipe = files["pipe"]
    return pipeline_to_original(
        *(getattr(pipe, n).state_dict() for n in ("unet", "text_encoder", "text_encoder_2", "vae"))
    )


def test_a_file_of_another_shape_needs_teacher_config(files):
    with pytest.raises(ConfigError) as e:  # the tiny file against koala's SDXL-Base configs
        check_teacher_paths(OmegaConf.create({"teacher": teacher_section(pipeline=str(files["fp32"]))}))
    message = str(e.value)
    assert "its unet (model.diffusion_model.*) does not fit the config in" in message
    assert "conv_in.weight (32, 4, 3, 3) vs (320, 4, 3, 3)" in message and "pass teacher.config=" in message
    check_teacher_paths(OmegaConf.create({"teacher": teacher_section(pipeline=str(files["fp32"]),
                                                                     config=str(files["config"]))}))  # fmt: skip


def meta_sdxl_shapes(config_dir: Path) -> tuple[dict[str, tuple[int, ...]], tuple]:
    """The tensor names and shapes of a full-size SDXL checkpoint in the SGM layout, built on meta from configs."""
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((config_dir / "unet/config.json").read_text()))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2"))
        vae = AutoencoderKL.from_config(json.loads((config_dir / "vae/config.json").read_text()))
    state = pipeline_to_original(unet.state_dict(), te.state_dict(), te2.state_dict(), vae.state_dict())
    return {k: tuple(v.shape) for k, v in state.items()}, (unet, te, te2, vae)


@pytest.mark.slow
def test_shipped_sdxl_base_configs_are_sdxls_and_fit_its_checkpoint_layout():
    shapes, (unet, te, te2, vae) = meta_sdxl_shapes(SDXL_BASE_CONFIG)
    # the published parameter counts (KOALA.md section 1; koala.fixtures.pipeline)
    assert [count_parameters(m) for m in (unet, te, te2, vae)] == [2_567_463_684, 123_060_480, 694_659_840, 83_653_863]
    unet_config = json.loads((SDXL_BASE_CONFIG / "unet/config.json").read_text())
    assert {k: v for k, v in unet_config.items() if not k.startswith("_")} == {
        k: v for k, v in SDXL_UNET_CONFIG.items() if not k.startswith("_")
    }
    vae_config = json.loads((SDXL_BASE_CONFIG / "vae/config.json").read_text())
    assert {k: vae_config[k] for k in SDXL_VAE_CONFIG} == SDXL_VAE_CONFIG
    for name, sizes in (("text_encoder", CLIP_L), ("text_encoder_2", OPENCLIP_BIGG)):
        config = json.loads((SDXL_BASE_CONFIG / name / "config.json").read_text())
        assert {k: config[k] for k in sizes} == sizes and config["vocab_size"] == 49408
    scheduler = json.loads((SDXL_BASE_CONFIG / "scheduler/scheduler_config.json").read_text())
    assert {k: scheduler[k] for k in SDXL_SCHEDULER_CONFIG} == SDXL_SCHEDULER_CONFIG
    # A checkpoint of SDXL's shapes in the SGM layout converts onto these configs with nothing missing or mis-shaped.
    info = CheckpointInfo(Path("sdxl.safetensors"), shapes, dict.fromkeys(shapes, "F16"), "full SDXL")
    check_parts(info, SDXL_BASE_CONFIG)
    assert sum(k.startswith("conditioner.embedders.1.model.transformer.resblocks.") for k in shapes) == 32 * 12


# CLIP ViT-L/14's tokenizer on known strings: "a photo of a cat" is its documented example.
KNOWN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "A Koala bear, eating eucalyptus leaves!!": [49406, 320, 36654, 4298, 267, 4371, 42351, 5579, 748, 49407],
}


def test_derived_tokenizers_are_sdxls():
    tokenizer, tokenizer_2 = PipelineSource(Path("x.safetensors")).tokenizers()  # from the shipped merges
    for text, ids in KNOWN_IDS.items():
        assert tokenizer(text).input_ids == ids
    assert tokenizer_2("a photo of a cat").input_ids == KNOWN_IDS["a photo of a cat"]
    # "!" is tokenizer_2's pad token, so transformers splits text at it, as with SDXL's own tokenizer_2
    assert tokenizer_2("leaves!!").input_ids == [49406, 5579, 0, 0, 49407]
    padded = tokenizer_2("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[4:] == [0] * 73  # bigG pads with "!" (id 0), as SDXL's tokenizer_2 does
    assert tokenizer("a cat", padding="max_length", max_length=77).input_ids[4:] == [49407] * 73
    assert len(tokenizer) == 49408
    # the merge list as the open_clip_torch 3.3.0 wheel ships it (open_clip/bpe_simple_vocab_16e6.txt.gz)
    assert hashlib.sha256(BPE_MERGES.read_bytes()).hexdigest() == BPE_SHA256


def test_derived_vocabulary_is_the_clip_vocabulary_comfyui_ships():
    """ComfyUI vendors openai/clip-vit-large-patch14's vocab.json and merges.txt: the derivation gives them exactly,
    and its CLIP configs are koala's shipped text-encoder configs."""
    comfy = comfy_package()
    vocab, merges = clip_vocab()
    assert vocab == json.loads((comfy / "sd1_tokenizer" / "vocab.json").read_text())
    assert ["#version: 0.2", *merges, ""] == (comfy / "sd1_tokenizer" / "merges.txt").read_text().split("\n")
    references = [CLIPTokenizer.from_pretrained(comfy / "sd1_tokenizer", pad_token=p) for p in ("<|endoftext|>", "!")]
    for ours, reference in zip(PipelineSource(Path("x.safetensors")).tokenizers(), references):
        for text in ("naïve café 東京 🐨 1024x1024, <|endoftext|>", "  Mixed   CASE and 'quotes' don't!!"):
            assert (
                ours(text, padding="max_length", max_length=77).input_ids
                == reference(text, padding="max_length", max_length=77).input_ids
            )
    for ours_name, theirs in (("text_encoder", "sd1_clip_config.json"), ("text_encoder_2", "clip_config_bigg.json")):
        shipped = json.loads((SDXL_BASE_CONFIG / ours_name / "config.json").read_text())
        comfy_config = json.loads((comfy / theirs).read_text())
        keys = set(CLIP_L) | {"hidden_act", "vocab_size", "eos_token_id", "bos_token_id", "pad_token_id"}
        assert {k: shipped[k] for k in keys} == {k: comfy_config[k] for k in keys}, ours_name


def test_teacher_config_and_moved_paths_are_resume_safe():
    from koala.train.runs import MAY_CHANGE, MOVED_PATHS

    cfg = compose_config(
        "train", ["teacher.pipeline=/models/fine-tune.safetensors", "teacher.config=/models/cfg"], schema=TrainConfig
    )
    assert cfg.teacher.pipeline.endswith(".safetensors") and cfg.teacher.config == "/models/cfg"
    assert "teacher.config" in MAY_CHANGE and "teacher.config" in MOVED_PATHS


@pytest.fixture(scope="module")
def distilled(files, shared, tmp_path_factory):
    """The same short distillation (sample grids included) from the folder and from the fp32 file."""
    from koala.train.loop import train

    root = tmp_path_factory.mktemp("distil-from-file")
    teachers = {
        "folder": {"teacher.pipeline": shared / "tiny-sdxl"},
        "file": {"teacher.pipeline": files["fp32"], "teacher.config": files["config"]},
    }
    runs = {}
    for name, teacher in teachers.items():
        overrides = {
            "teacher": "tiny", "unet": "tiny-700m", "data": "demo", "data.resolution": 32,
            "data.path": f"'{shared / 'demo-shards' / 'demo-{00000..00003}.tar'}'", "output_dir": root / name,
            "batch_size": 2, "max_steps": 3, "log_every": 1, "checkpoint_every": 3, "sample_every": 3,
            "sample_steps": 2, "report_to": "[]", **teacher,
        }  # fmt: skip
        runs[name] = train(compose_config("train", [f"{k}={v}" for k, v in overrides.items()], schema=TrainConfig))
    return runs


def losses(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("loss/")} for r in rows]


@pytest.mark.slow
def test_distilling_from_the_file_gives_the_folders_losses_and_samples(distilled):
    folder, file = losses(distilled["folder"]), losses(distilled["file"])
    assert len(folder) == 3 and folder == file  # every loss term, every step, exactly
    for grid in ("teacher.png", "student-00000003.png"):  # the sample grids: text encoders and VAE from the file
        assert (distilled["folder"] / "samples" / grid).read_bytes() == (
            distilled["file"] / "samples" / grid
        ).read_bytes()


@pytest.mark.slow
def test_a_run_on_a_file_teacher_exports_the_same_pipeline(distilled, tmp_path):
    from koala.ship.export import export_run

    exports = {name: export_run(run, out=tmp_path / name, full_checkpoint=None) for name, run in distilled.items()}
    a = StableDiffusionXLPipeline.from_pretrained(exports["folder"])
    b = StableDiffusionXLPipeline.from_pretrained(exports["file"])
    for part in ("unet", "text_encoder", "text_encoder_2", "vae"):
        assert_same(getattr(b, part), getattr(a, part), torch.float32)
    assert b.tokenizer("a red circle").input_ids == a.tokenizer("a red circle").input_ids
    assert b.scheduler.config == a.scheduler.config


@pytest.mark.slow
def test_a_run_on_a_file_teacher_resumes_and_refuses_another_file(distilled, files, shared, tmp_path):
    from koala.train.loop import train

    run_dir = Path(shutil.copytree(distilled["file"], tmp_path / "run"))  # the shared run stays as it is

    def resume(teacher_file: Path) -> Path:
        overrides = {
            "teacher": "tiny", "unet": "tiny-700m", "data": "demo", "data.resolution": 32,
            "data.path": f"'{shared / 'demo-shards' / 'demo-{00000..00003}.tar'}'", "output_dir": run_dir,
            "batch_size": 2, "max_steps": 4, "log_every": 1, "checkpoint_every": 3, "sample_every": 3,
            "sample_steps": 2, "report_to": "[]", "resume": "latest", "teacher.pipeline": teacher_file,
            "teacher.config": files["config"],
        }  # fmt: skip
        return train(compose_config("train", [f"{k}={v}" for k, v in overrides.items()], schema=TrainConfig))

    other = tmp_path / "other.safetensors"  # another teacher of the same shape (the fp16 file's values)
    write_checkpoint_file(files["pipe"], other, torch.float16)
    with pytest.raises(ConfigError, match=r"the teacher is not the one .*step-00000003 was trained from: its "
                                          r"pipeline, unet weights differ"):  # fmt: skip
        resume(other)
    moved = Path(shutil.copy(files["fp32"], tmp_path / "moved.safetensors"))  # the same teacher, moved: resumes
    assert resume(moved) == run_dir
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.slow
def test_inspect_and_lora_read_a_file_teacher_as_the_folder(files, shared, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from koala.inspect import main as inspect_main
    from koala.lora import main as lora_main

    teachers = {"folder": [f"teacher.pipeline={shared / 'tiny-sdxl'}"],
                "file": [f"teacher.pipeline={files['fp32']}", f"teacher.config={files['config']}"]}  # fmt: skip
    printed = {name: inspect_main([*t, "unet=tiny-1b"]) for name, t in teachers.items()}
    assert printed["file"] == printed["folder"] and "parameters   teacher" in printed["file"]
    unet = UNet2DConditionModel.from_pretrained(shared / "tiny-sdxl" / "unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q", "conv1"]))
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    for name, t in teachers.items():
        lora_main([*t, "unet=tiny-1b", f"lora={lora}", f"out={tmp_path / name}.safetensors"])
    assert (tmp_path / "file.safetensors").read_bytes() == (tmp_path / "folder.safetensors").read_bytes()


@pytest.mark.slow
def test_caching_from_the_file_equals_caching_from_the_folder(files, shared, tmp_path):
    from safetensors.torch import load

    from koala.cache import main as cache_main

    out = {}
    for name, teacher in (("folder", [f"teacher.pipeline={shared / 'tiny-sdxl'}"]),
                          ("file", [f"teacher.pipeline={files['fp32']}", f"teacher.config={files['config']}"])):  # fmt: skip
        out[name] = cache_main([
            *teacher, "data=demo", f"data.path='{shared / 'demo-shards' / 'demo-{00000..00001}.tar'}'",
            "data.resolution=32", "cache.dtype=fp32", f"cache.out={tmp_path / name}",
        ])  # fmt: skip
    import tarfile

    def members(folder: Path) -> dict[str, bytes]:
        found = {}
        for shard in sorted(folder.glob("*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    found[m.name] = tar.extractfile(m).read()
        return found

    a, b = members(out["folder"]), members(out["file"])
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        if k.endswith(".safetensors"):
            ta, tb = load(a[k]), load(b[k])
            assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta), k


def test_a_tiny_single_file_teacher_is_never_taken_for_the_generated_folder(tmp_path):
    """teacher=tiny with a file: the fixtures writer leaves it alone (it wrote a folder over its path before), and a
    missing file gets no `koala.fixtures pipeline=` hint, which would write a folder."""
    from koala.fixtures import ensure_fixtures, fixture_command

    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"a user's file")
    for pipeline in (path, tmp_path / "missing.safetensors"):
        cfg = OmegaConf.create({"teacher": {"name": "tiny", "pipeline": str(pipeline)}, "data": {"name": "mine"}})
        assert ensure_fixtures(cfg) == [] and fixture_command(cfg) is None
    assert path.read_bytes() == b"a user's file" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    folder = OmegaConf.create(
        {"teacher": {"name": "tiny", "pipeline": str(tmp_path / "tiny-sdxl")}, "data": {"name": "mine"}}
    )
    assert fixture_command(folder) == f"python -m koala.fixtures pipeline={tmp_path / 'tiny-sdxl'}"
