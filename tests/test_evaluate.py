"""Evaluation from local safetensors: FID parity with torchmetrics, preference scores, checks before loading, presets.

Metric networks are random (the real FID Inception architecture with random weights; tiny CLIPs), saved to disk and
loaded by the real loading code.
"""

import json

import numpy as np
import pytest
import torch
from conftest import two_process_launch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

import koala.evaluation.runner
from koala.evaluate import main
from koala.evaluation.inception import load_fid_inception, random_fid_inception_state
from koala.evaluation.metrics import (
    MissingMetricWeights,
    check_clip_folder,
    feature_stats,
    frechet_distance,
    frechet_distance_of_features,
)
from koala.evaluation.preference import hps_scorer, pickscore_scorer
from koala.evaluation.registry import FrechetMetric, InceptionFeatures, Sample, fid_extractor
from koala.fixtures.tiny import write_byte_tokenizer, write_tiny_pipeline


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.safetensors"
    save_file(random_fid_inception_state(), str(path))
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip"
    tok = write_byte_tokenizer(path)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            pad_token_id=tok.pad_token_id,
            bos_token_id=len(tok) - 2,
            eos_token_id=len(tok) - 1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path, safe_serialization=True)
    return path


def write_images(folder, n, seed, size=(48, 40)):
    """n smooth random RGB images (PNG) in a new folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BICUBIC).save(folder / f"{i:03d}.png")
    return sorted(folder.iterdir())


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    mu, sigma = feature_stats(torch.from_numpy(a))
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-8)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s1, s2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == pytest.approx(
        5.0
    )
    d = frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.ones(2), np.diag([9.0, 16.0]))
    assert d == pytest.approx(2 + (1 - 3) ** 2 + (2 - 4) ** 2)
    # small sets (N1 * N2 <= D^2) go through the N1 x N2 form: the same number as the D x D one
    x1, x2 = torch.randn(6, 64, generator=torch.Generator().manual_seed(1)), torch.randn(9, 64) + 0.3
    expected = frechet_distance(*feature_stats(x1), *feature_stats(x2))
    assert frechet_distance_of_features(x1, x2) == pytest.approx(expected, rel=1e-6)


# torch-fidelity 0.4.0's FeatureExtractorInceptionV3 (the network torchmetrics' FID runs), loaded with
# random_fid_inception_state(0), on the two images below: its 2048-d features (first 8 of image 0), their sums and norms.
# Recorded once with torch-fidelity's module file imported without its package (which needs torchvision); koala's
# network gave bit-identical features then.
TORCH_FIDELITY_FIRST8 = [0.0, 0.009662, 0.038876, 9.075985, 1.511524, 3.967955, 8.587535, 1.339485]
TORCH_FIDELITY_SUMS = [4678.16015625, 4682.39111328125]
TORCH_FIDELITY_NORMS = [177.96340942382812, 178.01283264160156]


def test_inception_reproduces_torch_fidelity(tmp_path):
    save_file(random_fid_inception_state(0), str(tmp_path / "w.safetensors"))
    net = load_fid_inception(tmp_path / "w.safetensors")
    images = torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = net(images)
    assert feats.shape == (2, 2048)
    assert feats[0, :8].tolist() == pytest.approx(TORCH_FIDELITY_FIRST8, rel=1e-4, abs=1e-5)
    assert feats.sum(1).tolist() == pytest.approx(TORCH_FIDELITY_SUMS, rel=1e-5)
    assert feats.norm(dim=1).tolist() == pytest.approx(TORCH_FIDELITY_NORMS, rel=1e-5)


@pytest.mark.slow  # two 2048 x 2048 Fréchet computations (torchmetrics' eigvals alone takes ~20 s on 2 cores)
def test_fid_matches_torchmetrics(inception_file, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    fake = write_images(tmp_path / "fake", 3, seed=1)
    real = write_images(tmp_path / "real", 4, seed=2, size=(40, 40))
    ours = FrechetMetric("fid", InceptionFeatures(inception_file, "cpu"), tmp_path / "real", fid_extractor(None, None))
    value = ours([Sample(f, "") for f in fake])["fid"]

    def as_uint8(files):
        return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])

    reference = FrechetInceptionDistance(feature=load_fid_inception(inception_file))
    reference.update(as_uint8(real), real=True)
    reference.update(as_uint8(fake), real=False)
    expected = float(reference.compute())
    assert value > 0 and value == pytest.approx(expected, rel=1e-3)


def test_inception_converter_refuses_to_load_pickles(inception_file, tmp_path):
    state = random_fid_inception_state(seed=3)
    torch.save(state, tmp_path / "pt_inception-2015-12-05.pth")
    with pytest.raises(
        MissingMetricWeights, match=r"is a pickle.*python -m koala.evaluate convert=inception src=.*pth"
    ):
        koala.evaluation.runner.check_metrics(
            ["fid"], _ns(inception=str(tmp_path / "pt_inception-2015-12-05.pth")), _ns(reference=str(tmp_path))
        )
    out = main(
        ["convert=inception", f"src={tmp_path / 'pt_inception-2015-12-05.pth'}", f"out={tmp_path / 'inc.safetensors'}"]
    )
    net = load_fid_inception(out)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def _ns(**kw):
    """A config-like namespace."""
    from types import SimpleNamespace

    return SimpleNamespace(**kw)


def test_preference_scores_are_deterministic_and_discriminative(tiny_clip, tmp_path):
    files = write_images(tmp_path / "img", 3, seed=4, size=(48, 32))
    images = [Image.open(f).convert("RGB") for f in files]
    prompts = ["a koala", "a koala", "a red car"]
    for scorer in (hps_scorer(tiny_clip), pickscore_scorer(tiny_clip)):
        a = scorer.scores([images[0], images[0]], prompts[:2])
        assert a[0] == a[1]  # identical image and prompt: identical score
        b = scorer.scores(images, prompts)
        assert b[0] == pytest.approx(a[0]) and len(set(np.round(b, 6))) == 3  # different images: different scores
    # HPSv2 pads to a square, PickScore crops: a non-square image scores differently under the two preprocessings
    assert hps_scorer(tiny_clip).pixels(images[:1]).ne(pickscore_scorer(tiny_clip).pixels(images[:1])).any()


def _open_clip_state(vocab: int, width: int = 32, embed: int = 16, patch: int = 8, image: int = 32, seed: int = 0):
    """A random state dict in open_clip's ViT layout (HPSv2's checkpoint format), one block per tower."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    def block(p):
        return {
            f"{p}.ln_1.weight": 1 + r(width),
            f"{p}.ln_1.bias": r(width),
            f"{p}.ln_2.weight": 1 + r(width),
            f"{p}.ln_2.bias": r(width),
            f"{p}.attn.in_proj_weight": r(3 * width, width),
            f"{p}.attn.in_proj_bias": r(3 * width),
            f"{p}.attn.out_proj.weight": r(width, width),
            f"{p}.attn.out_proj.bias": r(width),
            f"{p}.mlp.c_fc.weight": r(4 * width, width),
            f"{p}.mlp.c_fc.bias": r(4 * width),
            f"{p}.mlp.c_proj.weight": r(width, 4 * width),
            f"{p}.mlp.c_proj.bias": r(width),
        }

    return {
        "visual.conv1.weight": r(width, 3, patch, patch),
        "visual.class_embedding": r(width),
        "visual.positional_embedding": r((image // patch) ** 2 + 1, width),
        "visual.ln_pre.weight": 1 + r(width),
        "visual.ln_pre.bias": r(width),
        **block("visual.transformer.resblocks.0"),
        "visual.ln_post.weight": 1 + r(width),
        "visual.ln_post.bias": r(width),
        "visual.proj": r(width, embed),
        "token_embedding.weight": r(vocab, width),
        "positional_embedding": r(77, width),
        **block("transformer.resblocks.0"),
        "ln_final.weight": 1 + r(width),
        "ln_final.bias": r(width),
        "text_projection": r(width, embed),
        "logit_scale": torch.tensor(4.6),
    }


def _open_clip_forward(s, pixels, ids, heads=16):
    """open_clip's ViT semantics written out: pre-LN blocks with fused q/k/v, class-token / end-of-text pooling."""
    f = torch.nn.functional

    def blocks(x, prefix, causal):
        p = f"{prefix}.0"
        h = f.layer_norm(x, x.shape[-1:], s[f"{p}.ln_1.weight"], s[f"{p}.ln_1.bias"])
        q, k, v = (h @ s[f"{p}.attn.in_proj_weight"].T + s[f"{p}.attn.in_proj_bias"]).chunk(3, -1)
        split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)  # noqa: E731
        a = f.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=causal).transpose(1, 2).flatten(2)
        x = x + a @ s[f"{p}.attn.out_proj.weight"].T + s[f"{p}.attn.out_proj.bias"]
        h = f.layer_norm(x, x.shape[-1:], s[f"{p}.ln_2.weight"], s[f"{p}.ln_2.bias"])
        h = f.gelu(h @ s[f"{p}.mlp.c_fc.weight"].T + s[f"{p}.mlp.c_fc.bias"])
        return x + h @ s[f"{p}.mlp.c_proj.weight"].T + s[f"{p}.mlp.c_proj.bias"]

    x = f.conv2d(pixels, s["visual.conv1.weight"], stride=s["visual.conv1.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + s["visual.positional_embedding"]
    x = blocks(
        f.layer_norm(x, x.shape[-1:], s["visual.ln_pre.weight"], s["visual.ln_pre.bias"]),
        "visual.transformer.resblocks",
        causal=False,
    )
    img = f.layer_norm(x[:, 0], x.shape[-1:], s["visual.ln_post.weight"], s["visual.ln_post.bias"]) @ s["visual.proj"]
    t = blocks(s["token_embedding.weight"][ids] + s["positional_embedding"], "transformer.resblocks", causal=True)
    t = f.layer_norm(t, t.shape[-1:], s["ln_final.weight"], s["ln_final.bias"])
    txt = t[torch.arange(len(ids)), ids.argmax(-1)] @ s["text_projection"]
    return f.normalize(img, dim=-1), f.normalize(txt, dim=-1)


def test_hps_converter_matches_open_clip_semantics(tmp_path):
    tok = write_byte_tokenizer(tmp_path / "tok")
    state = _open_clip_state(len(tok))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "HPS_v2.1_compressed.pt")
    out = main(
        [
            "convert=hps",
            f"src={tmp_path / 'HPS_v2.1_compressed.pt'}",
            f"out={tmp_path / 'hps'}",
            f"tokenizer={tmp_path / 'tok'}",
        ]
    )
    scorer = hps_scorer(out)
    images = [Image.open(f).convert("RGB") for f in write_images(tmp_path / "img", 2, seed=5)]
    prompts = ["a koala in a tree", "a bowl of fruit"]
    ids = scorer.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        img, txt = _open_clip_forward(state, scorer.pixels(images), ids)
    assert scorer.scores(images, prompts) == pytest.approx((100 * (img * txt).sum(-1)).tolist(), rel=1e-4, abs=1e-4)


def test_missing_weights_name_the_files(tmp_path):
    with pytest.raises(MissingMetricWeights, match=r"model.safetensors.*vocab.json \+ merges.txt"):
        check_clip_folder(tmp_path / "clip-vit-large-patch14")


@pytest.mark.parametrize("case", ["prompts", "pickle", "no_weights", "no_clip", "hps_pickle"])
def test_bad_inputs_fail_before_any_model_loads(
    case, tiny_pipeline_dir, inception_file, tiny_clip, tmp_path, monkeypatch
):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(koala.evaluation.runner, "load_pipeline", refuse)
    (tmp_path / "prompts.txt").write_text("a koala\n")
    torch.save({"w": torch.zeros(1)}, tmp_path / "pt_inception.pth")
    write_images(tmp_path / "ref", 2, seed=0)
    args = {
        "prompts": f"protocol.prompts={tmp_path / 'prompts.txt'}",
        "ref": f"protocol.reference={tmp_path / 'ref'}",
        "inception": f"weights.inception={inception_file}",
        "clip": f"weights.clip={tiny_clip}",
    }
    expected = {
        "prompts": (
            dict(prompts=f"protocol.prompts={tmp_path / 'coco' / 'metadata.csv'}"),
            r"protocol.prompts=.*metadata.csv: no such",
        ),
        "pickle": (
            dict(inception=f"weights.inception={tmp_path / 'pt_inception.pth'}"),
            r"weights.inception=.*pt_inception.pth is a pickle.*python -m koala.evaluate convert=inception",
        ),
        "no_weights": (
            dict(inception=f"weights.inception={tmp_path / 'none.safetensors'}"),
            r"weights.inception=.*none.safetensors: no such file.*convert=inception",
        ),
        "no_clip": (
            dict(clip=f"weights.clip={tmp_path / 'clip-missing'}"),
            r"weights.clip=.*clip-missing.*config.json",
        ),
        "hps_pickle": (
            dict(metrics="protocol.metrics=[hps]", hps=f"weights.hps={tmp_path / 'pt_inception.pth'}"),
            r"weights.hps=.*pt_inception.pth is a pickle.*python -m koala.evaluate convert=hps src=",
        ),
    }
    change, message = expected[case]
    with pytest.raises((FileNotFoundError, MissingMetricWeights), match=message):
        main(
            ["protocol=coco30k-torchmetrics", f"models={{student: {tiny_pipeline_dir}}}", *{**args, **change}.values()]
        )


def test_hpsv2_preset_scores_per_style(tiny_pipeline_dir, tmp_path):
    tok = write_byte_tokenizer(tmp_path / "tok")
    torch.save({"state_dict": _open_clip_state(len(tok))}, tmp_path / "hps.pt")
    hps = main(
        ["convert=hps", f"src={tmp_path / 'hps.pt'}", f"out={tmp_path / 'hps'}", f"tokenizer={tmp_path / 'tok'}"]
    )
    bench = tmp_path / "benchmark"
    bench.mkdir()
    for style in ("anime", "photo"):
        (bench / f"{style}.json").write_text(json.dumps([f"{style} of a koala", f"{style} of a city"]))
    run = main(
        [
            "protocol=hpsv2",
            f"protocol.prompts={bench}",
            "limit=3",
            f"models={{teacher: {tiny_pipeline_dir}}}",
            f"weights.hps={hps}",
            "steps=2",
            "protocol.height=32",
            "protocol.width=32",
            "device=cpu",
            f"out={tmp_path / 'eval'}",
        ]
    )
    # limit keeps the first 3 prompts: anime's two, then photo's first
    row = run["results"]["teacher"]
    assert set(row) == {"hps", "hps/anime", "hps/photo"}
    assert row["hps"] == pytest.approx((2 * row["hps/anime"] + row["hps/photo"]) / 3)
    manifest = json.loads((tmp_path / "eval" / "teacher" / "manifest.json").read_text())
    assert [(m["style"], m["seed"]) for m in manifest] == [("anime", 0), ("anime", 1), ("photo", 2)]
    settings = json.loads(Image.open(tmp_path / "eval" / "teacher" / "images" / "00000.png").text["settings"])
    assert (settings["preset"], settings["sampler"], settings["timestep_spacing"]) == ("base", "euler", None)
    assert "| teacher |" in (tmp_path / "eval" / "results.md").read_text()


@pytest.mark.slow
def test_two_process_coco_run_splits_prompts_resumes_and_reports(
    tiny_pipeline_dir, inception_file, tiny_clip, tmp_path
):
    import subprocess
    from pathlib import Path

    student = write_tiny_pipeline(tmp_path / "student", seed=1)
    captions = ["a koala", "a red car", "a bowl of fruit", "two dogs on a beach", "a city at night", "unused"]
    (tmp_path / "metadata.csv").write_text(
        "file_name,text\n" + "".join(f"{i}.jpg,{c}\n" for i, c in enumerate(captions))
    )
    write_images(tmp_path / "val2014", 4, seed=7, size=(64, 48))
    args = [
        "protocol=coco30k-torchmetrics",
        f"protocol.prompts={tmp_path / 'metadata.csv'}",
        f"protocol.reference={tmp_path / 'val2014'}",
        "limit=5",
        f"models={{student: {student}, teacher: {tiny_pipeline_dir}}}",
        f"weights.inception={inception_file}",
        f"weights.clip={tiny_clip}",
        "steps=2",
        "protocol.height=32",
        "protocol.width=32",
        "device=cpu",
        "grid=4",
        f"out={tmp_path / 'eval'}",
    ]
    cmd = two_process_launch("koala.evaluate", *args)
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "eval"
    for model in ("student", "teacher"):
        shares = [json.loads((out / model / "shares" / f"rank{r}.json").read_text()) for r in (0, 1)]
        assert shares[0]["world_size"] == 2
        assert not set(shares[0]["assigned"]) & set(shares[1]["assigned"])  # disjoint
        assert sorted(shares[0]["assigned"] + shares[1]["assigned"]) == list(range(5))  # union: the whole list
        assert all(s["generated"] == s["assigned"] for s in shares)
    first = json.loads((out / "results.json").read_text())
    assert first["processes"] == 2 and first["prompts"] == 5
    for model in ("student", "teacher"):
        assert first["results"][model]["fid"] > 0 and 0 <= first["results"][model]["clip_score"] <= 100
    assert first["results"]["student"]["fid"] != first["results"]["teacher"]["fid"]
    assert "| student |" in res.stdout and "| teacher |" in res.stdout  # the table is printed
    assert {p.name for p in (out / "grids").iterdir()} == {"student.png", "teacher.png", "side_by_side.png"}
    with np.load(out / "reference-stats" / "fid.npz") as stats:  # reusable as protocol.reference
        assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "student" / "images").iterdir()}
    # a rerun (one process) finds every image: nothing is sampled again and the numbers are the same
    rerun = main(args)
    assert json.loads((out / "student" / "shares" / "rank0.json").read_text())["generated"] == []
    assert {p: p.stat().st_mtime_ns for p in (out / "student" / "images").iterdir()} == stamps
    assert rerun["results"].keys() == first["results"].keys()
    for model in ("student", "teacher"):
        for key, value in first["results"][model].items():
            assert rerun["results"][model][key] == pytest.approx(value, rel=1e-6)
    # an image made from other settings is never reused silently
    with pytest.raises(ValueError, match=r"00000.png was sampled from prompt='a koala' seed=0 settings=.*steps.: 2"):
        main([*args, "steps=3"])


def test_a_damaged_image_is_sampled_again_and_named(tiny_pipeline_dir, tiny_clip, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a koala\na red car\n")
    args = [
        "protocol=custom",
        f"protocol.prompts={tmp_path / 'p.txt'}",
        f"models={{teacher: {tiny_pipeline_dir}}}",
        f"weights.clip={tiny_clip}",
        "steps=1",
        "protocol.height=32",
        "protocol.width=32",
        "device=cpu",
        f"out={tmp_path / 'eval'}",
    ]
    first = main(args)
    images = tmp_path / "eval" / "teacher" / "images"
    intact = (images / "00001.png").read_bytes()
    (images / "00001.png").write_bytes(intact[: len(intact) // 2])  # cut short, as a full disk or a bad copy leaves it
    capsys.readouterr()
    again = main(args)
    assert "00001.png does not decode" in capsys.readouterr().err
    share = json.loads((tmp_path / "eval" / "teacher" / "shares" / "rank0.json").read_text())
    assert (share["generated"], share["skipped"], share["regenerated"]) == ([1], [0], [1])
    assert (images / "00001.png").read_bytes() == intact  # the same prompt and seed: the same image
    assert again["results"] == first["results"]


def test_pickscore_converter_reads_a_pickled_clip_folder(tiny_clip, tmp_path):
    model = CLIPModel.from_pretrained(tiny_clip)
    src = tmp_path / "PickScore_v1"
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    with pytest.raises(MissingMetricWeights, match=r"pytorch_model.bin.*convert=pickscore"):
        koala.evaluation.runner.check_metrics(["pickscore"], _ns(pickscore=str(src)), _ns(reference=None))
    out = main(["convert=pickscore", f"src={src}", f"out={tmp_path / 'pickscore'}", f"tokenizer={tiny_clip}"])
    images = [Image.open(f).convert("RGB") for f in write_images(tmp_path / "img", 2, seed=6)]
    prompts = ["a koala", "a red car"]
    assert pickscore_scorer(out).scores(images, prompts) == pytest.approx(
        pickscore_scorer(tiny_clip).scores(images, prompts)
    )


def test_prompt_files_of_every_protocol(tmp_path):
    from koala.evaluation.prompts import read_prompt_set

    (tmp_path / "p.txt").write_text("# comment\na koala\n\na red car\n")
    (tmp_path / "metadata.csv").write_text("file_name,text\n1.jpg,a koala\n2.jpg,a red car\n")  # BK-SDM COCO-30K
    (tmp_path / "meta_data.json").write_text(
        json.dumps(
            {"a1": {"category": "animals", "prompt": "a koala"}, "b2": {"category": "people", "prompt": "a red car"}}
        )
    )  # MJHQ
    assert read_prompt_set(tmp_path / "p.txt") == [("a koala", None), ("a red car", None)]
    assert read_prompt_set(tmp_path / "metadata.csv") == [("a koala", None), ("a red car", None)]
    assert read_prompt_set(tmp_path / "meta_data.json") == [("a koala", "animals"), ("a red car", "people")]
    styles = tmp_path / "bench"
    styles.mkdir()
    (styles / "photo.json").write_text(json.dumps(["a koala"]))  # HPSv2: one file per style
    (styles / "anime.json").write_text(json.dumps(["a red car"]))
    assert read_prompt_set(styles) == [("a red car", "anime"), ("a koala", "photo")]
    (tmp_path / "bad.csv").write_text("file,caption_en\n1.jpg,a koala\n")
    with pytest.raises(ValueError, match=r"bad.csv.*none of the fields prompt, caption, text.*caption_en"):
        read_prompt_set(tmp_path / "bad.csv")


def test_registry_metrics_score_image_files(tiny_clip, tmp_path):
    from koala.evaluation.registry import METRICS, MetricContext, build_metric, check_metrics

    files = write_images(tmp_path / "gen", 3, seed=8)
    write_images(tmp_path / "ref", 4, seed=9)
    samples = [Sample(f, p, s) for f, p, s in zip(files, ["a koala", "a red car", "a cat"], ["x", "x", "y"])]
    protocol = _ns(reference=str(tmp_path / "ref"))
    names = ["fd_clip", "clip_score", "hps", "pickscore"]
    weights = check_metrics(names, _ns(clip=str(tiny_clip), hps=str(tiny_clip), pickscore=str(tiny_clip)), protocol)
    ctx = MetricContext("cpu", protocol, tmp_path / "eval")
    row = {}
    for name in names:
        row.update(build_metric(name, weights[name], ctx)(samples))
    assert row["fd_clip"] > 0 and (tmp_path / "eval" / "reference-stats" / "fd_clip.npz").is_file()
    assert 0 <= row["clip_score"] <= 100
    assert row["hps"] == pytest.approx((2 * row["hps/x"] + row["hps/y"]) / 3)
    assert {"fid", "fd_clip", "clip_score", "hps", "pickscore"} <= set(METRICS)
    with pytest.raises(ValueError, match="'imagereward' is not a valid MetricName: expected one of fid, fd_clip"):
        check_metrics(["imagereward"], _ns(), protocol)
