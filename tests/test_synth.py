"""`koala.synth`: prompts in, teacher samples out as a latent cache that `data=synth` trains from."""

import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import two_process_launch
from PIL import Image
from safetensors.torch import load, save_file

from koala.config.compose import compose_config
from koala.config.schema import TrainConfig
from koala.data.prompts import PromptFileError, read_prompts
from koala.data.synth import synthesize
from koala.synth import SynthConfig, main

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a koala", "a yellow circle"]


def synth_args(pipeline: Path, prompts: Path, out: Path, **extra) -> list[str]:
    """A tiny synth run: the tiny teacher at 32 px, 2 samples per prompt, fp32 storage (exact comparisons)."""
    base = {"teacher.pipeline": pipeline, "prompts": prompts, "out": out, "license": "test-licence", "per_prompt": 2,
            "resolution": 32, "steps": 4, "batch_size": 3, "samples_per_shard": 4, "dtype": "fp32", "preview": 32}  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def read_samples(out: Path) -> dict[str, dict]:
    """key -> {tensors..., meta, jpg, json, shard} of every complete shard in a synth folder."""
    samples = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                sample = samples.setdefault(key, {"shard": shard.name, "count": 0})
                data = tar.extractfile(member).read()
                if ext == "safetensors":
                    sample.update(load(data))
                    sample["count"] += 1
                sample[ext] = data
    return samples


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory, tiny_pipeline_dir):
    root = tmp_path_factory.mktemp("synth")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = compose_config("synth", synth_args(tiny_pipeline_dir, root / "prompts.txt", root / "out"), schema=SynthConfig)
    return cfg, synthesize(cfg)


# ---- prompt sources -------------------------------------------------------------------------------------------


def write_sources(root: Path) -> dict[str, Path]:
    """The same two prompts in every supported format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    (root / "p.txt").write_text("# a comment\n  a red circle  \n\na blue square\n")
    (root / "p.csv").write_text('id,prompt\n1,a red circle\n2,"a blue square"\n')
    (root / "p.json").write_text('[\n  "a red circle",\n  {"caption": "a blue square"}\n]\n')
    (root / "p.jsonl").write_text('{"text": "a red circle"}\n\n"a blue square"\n')
    pq.write_table(pa.table({"n": [1, 2], "prompt": ["a red circle", "a blue square"]}), root / "p.parquet")
    with tarfile.open(root / "s-0.tar", "w") as tar:
        for key, caption in (("000", "a red circle"), ("001", None), ("002", "a blue square")):
            for ext, data in (("png", b"\x89PNG"), ("json", json.dumps({"cap": caption}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return {p.suffix: p for p in root.iterdir()}


def test_every_prompt_format_reads_the_same_prompts(tmp_path):
    files = write_sources(tmp_path / "src")
    expected = ["a red circle", "a blue square"]
    for suffix in (".txt", ".csv", ".json", ".jsonl", ".parquet"):
        assert read_prompts(str(files[suffix])) == expected, suffix
    assert read_prompts(str(tmp_path / "src" / "s-{0..0}.tar"), caption_key="json.cap") == expected  # one skipped
    assert read_prompts(str(tmp_path / "src" / "s-0.tar"), caption_key="json.cap") == expected
    folder = read_prompts(str(tmp_path / "src"), caption_key="json.cap")  # every file, sorted by name
    assert folder == expected * 6
    assert read_prompts(str(files[".csv"]), column="id") == ["1", "2"]


BAD = [  # file name, content, the error's text
    ("bad.txt", b"a red circle\na blue square\nan \xff circle\n", "bad.txt:3: not UTF-8 text"),
    ("empty.txt", b"\n# only a comment\n", "empty.txt: holds no prompts"),
    ("nocol.csv", b"id,words\n1,a red circle\n", "nocol.csv:1: expected a column named prompt or caption or text"),
    ("fields.csv", b"id,prompt\n1,a red circle\n2,a blue,square\n", "fields.csv:3: 3 fields where the header has 2"),
    ("blank.csv", b"id,prompt\n1,a red circle\n2,\n", "blank.csv:3: empty prompt"),
    ("syntax.json", b'[\n  "a red circle",\n  "a blue square\n]\n', "syntax.json:3: invalid JSON"),
    ("entry.json", b'[\n  "a red circle",\n\n  42\n]\n', "entry.json:4: expected a prompt string, found int"),
    ("object.json", b'{"prompts": ["a"]}', "object.json:1: expected a JSON list of prompts"),
    ("key.json", b'[\n  {"caption": "a"},\n  {"words": "b"}\n]', "key.json:3: expected a column named prompt"),
    ("line.jsonl", b'"a red circle"\n{"prompt": "a blue\n', "line.jsonl:2: invalid JSON"),
    ("prompts.yaml", b"- a red circle\n", "prompts.yaml: unknown prompt file type '.yaml'"),
]


@pytest.mark.parametrize("name,content,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_prompt_file_fails_at_start_naming_the_file_and_line(name, content, message, tmp_path, capsys):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SystemExit) as e:
        main([f"prompts={tmp_path / name}", "license=x", f"out={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()  # nothing written, no model loaded


def test_bad_parquet_rows_and_missing_sources_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", None]}), tmp_path / "null.parquet")
    with pytest.raises(PromptFileError, match=r"null.parquet:row 2: expected a prompt string, found NoneType"):
        read_prompts(str(tmp_path / "null.parquet"))
    pq.write_table(pa.table({"words": ["a"]}), tmp_path / "col.parquet")
    with pytest.raises(PromptFileError, match=r"col.parquet:header: expected a column named prompt"):
        read_prompts(str(tmp_path / "col.parquet"))
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(PromptFileError, match=r"fake.parquet:row 1: not a parquet file"):
        read_prompts(str(tmp_path / "fake.parquet"))
    with pytest.raises(PromptFileError, match="no such prompt file or folder"):
        read_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(PromptFileError, match=r"none-0.tar: unreadable shard \(\[Errno 2\] No such file"):
        read_prompts(str(tmp_path / "none-{0..1}.tar"))
    with pytest.raises(PromptFileError, match="no shards match"):
        read_prompts(str(tmp_path / "none-*.tar"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["prompts=p.txt"], "license= is required"),
        (["license=x"], "prompts= is required"),
        (["prompts=p.txt", "license=x", "per_prompt=0"], "per_prompt=0: expected a number >= 1"),
        (["prompts=p.txt", "license=x", "identity=md5"], "identity"),
        (["prompts=p.txt", "license=x", "teacher.pipeline=/no/such/sdxl"], "teacher.pipeline=/no/such/sdxl: no such"),
    ],
)
def test_missing_or_bad_settings_fail_at_start(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a red circle\n")
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err, err


# ---- what a run writes --------------------------------------------------------------------------------------------


def test_shards_hold_cached_samples_with_preview_prompt_seed_and_settings(synth_run, tiny_pipeline_dir):
    from koala.models.identity import teacher_identity

    cfg, out = synth_run
    assert sorted(p.name for p in out.glob("*.tar")) == ["synth-00000000.tar", "synth-00000004.tar",
                                                          "synth-00000008.tar"]  # fmt: skip
    assert not list(out.glob("*.tmp")) and (out / "empty_prompt.safetensors").is_file()
    samples = read_samples(out)
    assert sorted(samples) == [f"{i:08d}" for i in range(10)]
    identity = teacher_identity(cfg.teacher, "sha256")
    info = json.loads((out / "info.json").read_text())
    assert info["samples"] == 10 and info["complete"] and info["license"] == "test-licence"
    assert info["teacher"]["sha256"] == identity["sha256"] and len(info["teacher"]["files"]) == 4
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        i = int(key)
        assert meta["prompt"] == PROMPTS[i // 2] and meta["seed"] == i and meta["license"] == "test-licence"
        assert meta["teacher"]["sha256"] == identity["sha256"] and meta["teacher"]["name"] == "tiny"
        assert meta["settings"] == {"preset": "sdxl", "steps": 4, "guidance": 7.5, "scheduler": "EulerDiscreteScheduler",
                                    "timestep_spacing": "leading", "height": 32, "width": 32, "negative_prompt": None,
                                    "dtype": "float32"}  # fmt: skip
        assert sample["latents"].shape == (4, 16, 16) and sample["prompt_embeds"].shape == (77, 64)
        assert sample["time_ids"].tolist() == [32, 32, 0, 0, 32, 32]
        assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 32)


def test_embeddings_are_the_training_conditioning_of_the_prompt(synth_run, tiny_pipeline_dir):
    from koala.data.conditioning import SDXLConditioner

    _, out = synth_run
    samples = read_samples(out)
    embeds, pooled = SDXLConditioner.from_pretrained(tiny_pipeline_dir).encode_prompts(PROMPTS)
    for key, sample in samples.items():
        torch.testing.assert_close(sample["prompt_embeds"], embeds[int(key) // 2])
        torch.testing.assert_close(sample["pooled_prompt_embeds"], pooled[int(key) // 2])


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR (dB) of two RGB pictures."""
    x, y = (torch.tensor(list(im.convert("RGB").getdata()), dtype=torch.float32) for im in (a, b))
    return float(10 * torch.log10(255**2 / ((x - y) ** 2).mean().clamp_min(1e-6)))


def test_latents_decode_to_the_preview_and_are_the_pipelines_own_sample(synth_run, tiny_pipeline_dir):
    from koala.shapes.judge import load_pipeline
    from koala.ship.presets import teacher_preset
    from koala.ship.sampling import decode_latents, generate

    _, out = synth_run
    samples = read_samples(out)
    pipe = load_pipeline(tiny_pipeline_dir)
    decoded = {k: decode_latents(pipe, s["latents"][None])[0] for k, s in samples.items()}
    previews = {k: Image.open(io.BytesIO(s["jpg"])) for k, s in samples.items()}
    for key in samples:
        own = psnr(decoded[key], previews[key])
        others = max(psnr(decoded[key], previews[k]) for k in samples if k != key)
        assert own > 25 and own > others + 10, (key, own, others)  # its own picture (JPEG of noise), no neighbour's
    # the stock pipeline (koala.ship.sampling) with the teacher's preset draws the same pictures for the same prompt and seed
    keys = ["00000000", "00000007"]
    stock = generate(pipe, [PROMPTS[0], PROMPTS[3]], teacher_preset("base", 4), seeds=[0, 7], height=32, width=32)
    for key, image in zip(keys, stock):
        assert psnr(image, decoded[key]) > 40, key


def test_data_synth_reads_the_folder_as_a_cache(synth_run, tiny_pipeline_dir):
    from koala.config.checks import ConfigError, check_config
    from koala.data import build_dataloader

    _, out = synth_run
    cfg = compose_config(
        "train", ["data=synth", f"data.path={out}", "data.resampled=false", "data.shuffle=false"], schema=TrainConfig
    )
    assert cfg.data.kind == "cached"
    keys = [k for b in build_dataloader(cfg.data, batch_size=4, seed=0) for k in b["keys"]]
    assert sorted(keys) == [f"{i:08d}" for i in range(10)]
    # the teacher sampled on CPU in fp32: training checks conditioning.dtype against that, as for a koala.cache folder
    assert json.loads((out / "info.json").read_text())["conditioning_dtype"] == "fp32"
    args = ["data=synth", f"data.path={out}", f"teacher.pipeline={tiny_pipeline_dir}"]
    check_config(compose_config("train", [*args, "conditioning.dtype=fp32"], schema=TrainConfig))
    with pytest.raises(ConfigError, match="conditioning.dtype=bf16 differs from the cache's: .* encoded in fp32"):
        check_config(compose_config("train", [*args, "conditioning.dtype=bf16"], schema=TrainConfig))
    assert (
        compose_config("train", ["data=synth", "teacher=shapes"], schema=TrainConfig).data.path
        == ".cache/koala/synth/shapes"
    )


def test_a_rerun_adds_nothing_and_another_setup_is_refused(synth_run, tiny_pipeline_dir, capsys):
    cfg, out = synth_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    synthesize(cfg)  # everything is done: nothing drawn again
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    args = synth_args(tiny_pipeline_dir, cfg.prompts, out, guidance=3.0)
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "holds samples of another setup (settings differ" in err, err


def test_lightning_and_turbo_teachers_sample_with_their_own_preset(tmp_path, tiny_pipeline_dir):
    (tmp_path / "p.txt").write_text("a red circle\n")
    for kind, sampler in (("lightning", "EulerDiscreteScheduler"), ("turbo", "EulerAncestralDiscreteScheduler")):
        out = tmp_path / kind
        args = synth_args(tiny_pipeline_dir, tmp_path / "p.txt", out, per_prompt=1, steps="null",
                          **{"teacher.kind": kind, "teacher.steps": 4})  # fmt: skip
        synthesize(compose_config("synth", args, schema=SynthConfig))
        settings = json.loads((out / "info.json").read_text())["settings"]
        assert (settings["steps"], settings["guidance"], settings["timestep_spacing"]) == (4, 0.0, "trailing")
        assert settings["scheduler"] == sampler and settings["preset"] == f"sdxl-{kind}"


def test_teacher_presets_sample_as_the_teachers_releases_ship():
    from koala.ship.presets import SAMPLERS, TEACHER_PRESETS, preset_scheduler, shipped_scheduler_config

    for kind, preset in TEACHER_PRESETS.items():
        shipped = shipped_scheduler_config(kind)
        scheduler = preset_scheduler(shipped, preset)
        assert SAMPLERS[preset.sampler].__name__ == type(scheduler).__name__ == shipped["_class_name"], kind
        assert scheduler.config.timestep_spacing == shipped["timestep_spacing"], kind
    assert [TEACHER_PRESETS[k].guidance for k in ("base", "lightning", "turbo")] == [7.5, 0.0, 0.0]


def test_identity_sha256_sees_new_weights_header_only_a_new_layout(tmp_path):
    from omegaconf import OmegaConf

    from koala.models.identity import teacher_identity

    def teacher(weights: dict) -> dict:
        (tmp_path / "unet").mkdir(exist_ok=True)
        save_file(weights, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
        save_file(weights, str(tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors"))  # a variant: unused
        cfg = OmegaConf.create({"name": "t", "kind": "base", "pipeline": str(tmp_path), "unet": None, "vae": None})
        return {m: teacher_identity(cfg, m) for m in ("sha256", "header")}

    base = teacher({"w": torch.zeros(4)})
    assert list(base["sha256"]["files"]) == ["unet/diffusion_pytorch_model.safetensors"]
    tuned = teacher({"w": torch.ones(4)})  # a fine-tune: same layout, new values
    assert tuned["sha256"]["sha256"] != base["sha256"]["sha256"]
    assert tuned["header"]["sha256"] == base["header"]["sha256"]
    reshaped = teacher({"w": torch.ones(5)})
    assert reshaped["header"]["sha256"] != base["header"]["sha256"]


# ---- several processes, interruption, training -----------------------------------------------------------------


@pytest.mark.slow
def test_two_process_launch_draws_disjoint_shares_covering_everything(synth_run, tiny_pipeline_dir, tmp_path):
    cfg, single = synth_run
    out = tmp_path / "out"
    cmd = two_process_launch("koala.synth", *synth_args(tiny_pipeline_dir, cfg.prompts, out, samples_per_shard=2))
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    samples, reference = read_samples(out), read_samples(single)
    ranks = {r: {k for k, s in samples.items() if json.loads(s["json"])["rank"] == r} for r in (0, 1)}
    assert len(ranks[0]) == len(ranks[1]) == 5 and not ranks[0] & ranks[1]
    assert ranks[0] | ranks[1] == set(reference) and all(s["count"] == 1 for s in samples.values())
    for key, sample in samples.items():  # the same sample whichever rank drew it (batched with other items)
        torch.testing.assert_close(sample["latents"], reference[key]["latents"], rtol=1e-4, atol=1e-3)
    assert json.loads((out / "info.json").read_text())["samples"] == 10


@pytest.mark.slow
def test_a_killed_run_resumes_without_losing_or_repeating_a_sample(synth_run, tiny_pipeline_dir, tmp_path):
    cfg, single = synth_run
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "koala.synth", *synth_args(tiny_pipeline_dir, cfg.prompts, out, samples_per_shard=2,
                                                          batch_size=1)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob("*.tar")) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert 1 <= len(kept) < 5, kept
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {n: t for n, t in ((p.name, p.stat().st_mtime_ns) for p in out.glob("*.tar")) if n in kept} == kept
    samples, reference = read_samples(out), read_samples(single)
    pairs = [(json.loads(s["json"])["prompt"], json.loads(s["json"])["seed"]) for s in samples.values()]
    expected = [(json.loads(s["json"])["prompt"], json.loads(s["json"])["seed"]) for s in reference.values()]
    assert sorted(pairs) == sorted(expected) and all(s["count"] == 1 for s in samples.values())
    for key, sample in samples.items():  # drawn in batches of 1 here, of 3 in the reference: equal to rounding
        torch.testing.assert_close(sample["latents"], reference[key]["latents"], rtol=1e-4, atol=1e-3)
    assert not list(out.glob("*.tmp")) and json.loads((out / "info.json").read_text())["complete"]
    assert f"{len(kept) * 2} were already there" in res.stdout


@pytest.mark.slow
def test_training_on_synth_samples(synth_run, tiny_pipeline_dir, tmp_path):
    from koala.train.loop import train

    _, out = synth_run
    args = ["data=synth", f"data.path={out}", f"teacher.pipeline={tiny_pipeline_dir}", "unet=tiny-700m",
            f"output_dir={tmp_path / 'run'}", "batch_size=2", "max_steps=3", "log_every=1", "checkpoint_every=3",
            "sample_every=0", "report_to=[]", "record_ranks=true"]  # fmt: skip
    run = train(compose_config("train", args, schema=TrainConfig))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in rows)
    seen = json.loads((run / "ranks" / "rank0.json").read_text())["keys"]
    assert len(seen) == 6 and set(seen) <= set(read_samples(out))
    assert (run / "checkpoints" / "step-00000003" / "COMPLETE").exists()
