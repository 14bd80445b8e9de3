"""The shapes world: its generator and shards, the pixel scorer, the teacher trainer and the shipped teacher."""

import random
import tarfile

import numpy as np
import pytest
from PIL import Image

from koala.config.compose import compose_config
from koala.config.schema import TrainConfig
from koala.data import build_dataloader
from koala.fixtures import ensure_fixtures, fixture_command
from koala.fixtures.shards import ensure_demo_shards, write_demo_shards
from koala.shapes.judge import eval_prompts
from koala.shapes.score import agreement, caption_accuracy, read_scene, score
from koala.shapes.world import COLOURS, SHAPES, all_captions, caption, draw_scene, parse_caption, render


def scenes(n: int, seed: int = 1) -> list[tuple[Image.Image, dict]]:
    rng = random.Random(seed)
    return [draw_scene(rng) for _ in range(n)]


def members(shard) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_scorer_reads_the_generators_ground_truth():
    pictures = scenes(300)
    assert caption_accuracy([im for im, _ in pictures], [m["caption"] for _, m in pictures]) >= 98.0
    for image, meta in pictures[:20]:  # every field read right, not only the verdict
        got = read_scene(image)
        assert (got.shape, got.colour, got.background) == (meta["shape"], meta["colour"], meta["background"])


def test_scorer_fails_pictures_that_do_not_match():
    for image, meta in scenes(40, seed=2):
        shape, colour, background = meta["shape"], meta["colour"], meta["background"]
        other_shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
        other_colour = next(c for c in COLOURS if c not in (colour, background))
        assert score(image, meta["caption"])
        assert not score(image, caption(other_shape, colour, background))
        assert not score(image, caption(shape, other_colour, background))
        assert not score(image, caption(shape, colour, other_colour))
        assert not score(image, caption(shape, background, colour))  # colours swapped


def test_scorer_fails_noise_blank_and_distorted_pictures():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    blank = Image.new("RGB", (64, 64), COLOURS["blue"])
    stretched = render("circle", "red", "blue", 32, 32, 14).resize((64, 24)).crop((0, 0, 64, 24))
    wide = Image.new("RGB", (64, 64), COLOURS["blue"])
    wide.paste(stretched, (0, 20))  # a flat ellipse is not a circle
    half = Image.new("RGB", (64, 64), COLOURS["blue"])
    half.paste(Image.new("RGB", (64, 32), COLOURS["red"]), (0, 32))  # no shape, only a split background
    for picture in (noise, blank, wide, half):
        assert not any(score(picture, caption(s, "red", "blue")) for s in SHAPES)
    assert caption_accuracy([noise, blank], [caption("circle", "red", "blue")] * 2) == 0.0


def test_agreement_is_exact_for_identical_pictures_and_drops_with_change():
    (a, _), (b, _) = scenes(2, seed=3)
    same, diff = agreement([a], [a]), agreement([a], [b])
    assert same["mae"] == 0.0 and same["psnr"] > 90
    assert diff["mae"] > 5 and diff["psnr"] < same["psnr"]


def test_captions_parse_and_bad_ones_are_named():
    assert len(all_captions()) == 90 and len(set(eval_prompts(90))) == 90
    assert {parse_caption(p)["shape"] for p in eval_prompts(18)} == set(SHAPES)
    assert parse_caption("a red circle on a blue background") == {
        "shape": "circle",
        "colour": "red",
        "background": "blue",
    }
    with pytest.raises(ValueError, match="'a koala bear'.*expected"):
        parse_caption("a koala bear")


def test_world_shards_are_deterministic_and_read_back_scored(tmp_path):
    one = write_demo_shards(tmp_path / "a", 24, samples_per_shard=8, seed=5, world="shapes")
    two = write_demo_shards(tmp_path / "b", 24, samples_per_shard=8, seed=5, world="shapes")
    assert [members(p) for p in one] == [members(p) for p in two]  # same samples (tar headers carry mtimes)
    cfg = compose_config(
        "train",
        [
            "data=shapes",
            f"data.path='{tmp_path}/c/shapes-{{00000..00002}}.tar'",
            "data.resampled=false",
            "data.shuffle=false",
        ],
        schema=TrainConfig,
    )
    assert "world=shapes" in fixture_command(cfg)
    ensure_fixtures(cfg, samples=24)
    batches = list(build_dataloader(cfg.data, batch_size=8, seed=0))
    pixels = [b["pixel_values"] for b in batches]
    captions = [c for b in batches for c in b["captions"]]
    images = [Image.fromarray(((p.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for t in pixels for p in t]
    assert len(images) == 24 and caption_accuracy(images, captions) == 100.0
    with pytest.raises(ValueError, match="'moon' is not a valid World: expected one of demo, shapes"):
        ensure_demo_shards(str(tmp_path / "d" / "x-{00000..00001}.tar"), 4, 64, world="moon")


def test_teacher_trainer_writes_a_loadable_sdxl_pipeline(tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from koala.models.archs import SHAPES_UNET_CONFIG
    from koala.shapes.teacher import main

    out = main(
        [
            f"out={tmp_path / 'p'}",
            "vae_steps=2",
            "vae_batch=4",
            "scenes=8",
            "unet_steps=2",
            "unet_batch=4",
            "warmup=1",
            "log_every=1",
            "save_every=1",
        ]
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert {k: pipe.unet.config[k] for k in ("block_out_channels", "transformer_layers_per_block")} == {
        k: SHAPES_UNET_CONFIG[k] for k in ("block_out_channels", "transformer_layers_per_block")
    }
    assert pipe.vae.config.scaling_factor != 1.0 and pipe.unet.dtype.is_floating_point
    stored = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {str(v.dtype) for v in stored.values()} == {"torch.float16"}  # stored half, loaded as fp32
    log = (tmp_path / "p-train_log.jsonl").read_text()
    assert '"stage": "saved", "step": 2' in log and (tmp_path / "p-vae.png").is_file()
    with pytest.raises(SystemExit) as exit:
        main([f"out={tmp_path / 'q'}", "vae_stepz=2"])
    assert exit.value.code == 2 and "error: Could not override 'vae_stepz'" in capsys.readouterr().err


TEACHER_MIN_ACCURACY = 75.0  # the shipped teacher: 83.3% (15 of 18) on these prompts (README)


@pytest.mark.slow
def test_shipped_teacher_draws_its_captions():
    from koala.config.compose import compose_config
    from koala.shapes.judge import judge, load_pipeline, sample
    from koala.ship.presets import get_preset

    cfg = compose_config("train", ["teacher=shapes"], schema=TrainConfig)
    prompts = eval_prompts(18)  # every (shape, colour) pair once
    pictures = sample(load_pipeline(cfg.teacher.pipeline), prompts, get_preset(cfg.teacher.kind))
    assert judge(pictures, prompts)["caption_accuracy"] >= TEACHER_MIN_ACCURACY


@pytest.mark.slow
def test_demo_student_improves_on_both_figures(tmp_path):
    from koala.demo import main

    summary = main(
        [
            f"output_dir={tmp_path / 'run'}",
            "max_steps=80",
            "checkpoint_every=80",
            "report_to=[]",
            f"data.path='{tmp_path}/shards/shapes-{{00000..00003}}.tar'",
        ],
        prompts=12,
        samples=512,
    )
    before, after = (summary["results"][f"student {w} distillation"] for w in ("before", "after"))
    assert after["caption_accuracy"] > before["caption_accuracy"]
    assert after["psnr"] > before["psnr"] and after["eps_rel_error"] < before["eps_rel_error"]
    for name in ("teacher_vs_student.png", "loss_curve.png", "demo_table.md", "export/model_index.json"):
        assert (tmp_path / "run" / name).is_file()


@pytest.mark.slow
def test_ablation_command_writes_table_and_plot_and_resumes(tmp_path):
    from koala.bench.ablation import main

    args = [
        f"bench.out={tmp_path / 'abl'}",
        "bench.presets=[out,koala]",
        "bench.seeds=1",
        "bench.steps=2",
        "bench.prompts=2",
        f"data.path='{tmp_path}/shards/shapes-{{00000..00003}}.tar'",
        "bench.samples=64",
        "batch_size=2",
    ]
    result = main(args)
    assert [(r["preset"], r["seed"], r["steps"]) for r in result["runs"]] == [("out", 0, 2), ("koala", 0, 2)]
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert "| koala |" in table and "| out |" in table and (tmp_path / "abl" / "ablation.png").is_file()
    again = main(args)  # every run is recorded: nothing is trained again
    assert again["runs"] == result["runs"]
    assert len((tmp_path / "abl" / "runs.jsonl").read_text().splitlines()) == 2
