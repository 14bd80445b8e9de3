"""The published protocols exactly: BK-SDM's COCO protocol against pytorch-fid's and open_clip's own code, the
extractor record of reference statistics, torchmetrics' CLIP score.

pytorch-fid and open_clip run from `.venv/parity` (tests/reference_code.py says why); their networks get the same
random weights as koala's (nothing can be downloaded), through their own loading code.
"""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from reference_code import reference_code_importable, write_open_clip_tokenizer
from safetensors.torch import load_file, save_file

import koala.evaluation.runner
from koala.config.compose import compose_config
from koala.evaluate import EvaluateConfig, main
from koala.evaluation.extractor import Extractor, stats_extractor
from koala.evaluation.images import ImagePrep
from koala.evaluation.inception import random_fid_inception_state
from koala.evaluation.registry import MetricContext, Sample, build_metric, check_metrics

BKSDM = "inception-2015-12-05/pytorch-fid/256/jpeg75"


@pytest.fixture(scope="module")
def reference_code():
    with reference_code_importable():
        yield


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.safetensors"
    save_file(random_fid_inception_state(), str(path))
    return path


def _smooth(rng, size, mode="RGB"):
    """A smooth random image (bicubic upsampling of 6 x 5 noise)."""
    small = Image.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    return small.convert(mode)


def write_samples(folder, n, seed, size=(96, 80)):
    """koala.evaluate's side: generated images as PNG files."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        _smooth(rng, size).save(folder / f"{i:05d}.png")
    return sorted(folder.iterdir())


def write_val2014(folder, n, seed):
    """Real images as COCO ships them: JPEGs of different sizes, one grayscale."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        _smooth(rng, (72 + 8 * i, 60), "L" if i == 1 else "RGB").save(folder / f"COCO_val2014_{i:012d}.jpg", quality=90)
    return sorted(folder.iterdir())


def bksdm_files(samples, val2014, root):
    """The files BK-SDM's scripts write: generate.py saves each sample as .jpg (im512) and change_img_size opens,
    resizes with PIL's default filter and saves .jpg (im256); get_stat_mscoco_val2014.py does the last step to val2014.
    """
    for name in ("im512", "im256", "val2014_im256"):
        (root / name).mkdir(parents=True)
    for f in samples:
        Image.open(f).save(root / "im512" / f"{f.stem}.jpg")
    for src, dst in [(root / "im512", root / "im256"), (val2014[0].parent, root / "val2014_im256")]:
        for f in sorted(src.glob("*.jpg")):
            Image.open(f).resize((256, 256)).save(dst / f.name)
    return sorted((root / "im256").iterdir()), sorted((root / "val2014_im256").iterdir())


def bksdm_protocol(reference, **overrides):
    """The coco30k-bksdm preset as koala.evaluate composes it."""
    args = [f"protocol.{k}={v}" for k, v in {"reference": reference, **overrides}.items()]
    return compose_config("evaluate", ["protocol=coco30k-bksdm", *args], schema=EvaluateConfig).protocol


def test_bksdm_preset_is_bksdms_protocol():
    p = compose_config("evaluate", ["protocol=coco30k-bksdm"], schema=EvaluateConfig).protocol
    assert (p.height, p.width, p.image_size, p.jpeg, str(p.fid_input)) == (512, 512, 256, 75, "pytorch-fid")
    assert list(p.metrics) == ["fid", "clip_cosine"]


def test_image_prep_gives_the_pixels_of_bksdms_files(tmp_path):
    samples = write_samples(tmp_path / "gen", 2, seed=0)
    val = write_val2014(tmp_path / "val2014", 2, seed=1)
    im256, real256 = bksdm_files(samples, val, tmp_path / "bksdm")
    prep = ImagePrep(size=256, jpeg=75)
    for ours, theirs, how in [*zip(samples, im256, ["generated"] * 2), *zip(val, real256, ["reference"] * 2)]:
        with Image.open(ours) as img:
            mine = np.asarray(getattr(prep, how)(img))
        assert np.array_equal(mine, np.asarray(Image.open(theirs).convert("RGB"))), (ours, theirs)
    # the squash alone, with no JPEG round trip, is another image: the round trips are part of the protocol
    with Image.open(samples[0]) as img:
        assert not np.array_equal(np.asarray(ImagePrep(size=256).generated(img)), np.asarray(Image.open(im256[0])))


def _pytorch_fid(inception_file, monkeypatch):
    """pytorch-fid's InceptionV3 holding the given weights, loaded by its own code (its download replaced)."""
    from pytorch_fid import inception

    state = load_file(str(inception_file))
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: dict(state))
    return inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()


def test_fid_features_equal_pytorch_fids(reference_code, inception_file, tmp_path, monkeypatch):
    from pytorch_fid.fid_score import get_activations

    samples = write_samples(tmp_path / "gen", 2, seed=2)
    im256, _ = bksdm_files(samples, write_val2014(tmp_path / "val2014", 1, seed=3), tmp_path / "bksdm")
    theirs = get_activations(im256, _pytorch_fid(inception_file, monkeypatch), 50, 2048, "cpu", 0)
    metric = build_metric("fid", inception_file, MetricContext("cpu", bksdm_protocol(tmp_path), tmp_path / "eval"))
    ours = metric.features_of(samples, metric.prep.generated)
    assert torch.equal(ours, torch.from_numpy(theirs).float())
    # torch-fidelity's input (the TF1 grid and (x - 128) / 128) gives other features from the same pixels
    other = build_metric(
        "fid", inception_file, MetricContext("cpu", bksdm_protocol(tmp_path, fid_input="torch-fidelity"), tmp_path)
    )
    assert (other.features_of(samples, other.prep.generated) - ours).abs().max() > 1e-2


@pytest.mark.slow  # pytorch-fid's scipy sqrtm of two 2048 x 2048 matrices
def test_bksdm_fid_equals_pytorch_fids_on_bksdms_files(reference_code, inception_file, tmp_path, monkeypatch):
    from pytorch_fid.fid_score import calculate_activation_statistics, calculate_frechet_distance

    samples = write_samples(tmp_path / "gen", 5, seed=4)
    val = write_val2014(tmp_path / "val2014", 4, seed=5)
    im256, real256 = bksdm_files(samples, val, tmp_path / "bksdm")
    net = _pytorch_fid(inception_file, monkeypatch)
    mu_g, sigma_g = calculate_activation_statistics(im256, net, 50, 2048, "cpu", 0)
    mu_r, sigma_r = calculate_activation_statistics(real256, net, 50, 2048, "cpu", 0)
    expected = calculate_frechet_distance(mu_g, sigma_g, mu_r, sigma_r)
    ctx = MetricContext("cpu", bksdm_protocol(tmp_path / "val2014"), tmp_path / "eval")
    fid = build_metric("fid", inception_file, ctx)([Sample(f, "") for f in samples])["fid"]
    # scipy's sqrtm of these rank-deficient (5 and 4 images) products is off by ~6e-4 absolute (3.6e-7 relative);
    # at full rank it agrees with koala's eigh form to 1e-4 and better (test_frechet_distance_equals_pytorch_fids)
    assert fid > 0 and fid == pytest.approx(expected, rel=1e-6)
    stats = tmp_path / "eval" / "reference-stats" / "fid.npz"
    assert stats_extractor(stats) == BKSDM
    with np.load(stats) as z:  # pytorch-fid reads the same file (its --save-stats layout): the same statistics
        assert np.allclose(z["mu"], mu_r, rtol=1e-5, atol=1e-6) and np.allclose(
            z["sigma"], sigma_r, rtol=1e-5, atol=1e-5
        )
    # BK-SDM's real_im256.npz has pytorch-fid's layout and no record: accepted once declared, with the same FID
    np.savez(tmp_path / "real_im256.npz", mu=mu_r, sigma=sigma_r)
    declared = bksdm_protocol(tmp_path / "real_im256.npz", reference_extractor=BKSDM)
    ctx = MetricContext("cpu", declared, tmp_path / "eval2")
    from_npz = build_metric("fid", inception_file, ctx)([Sample(f, "") for f in samples])["fid"]
    assert from_npz == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow  # scipy's sqrtm of a 2048 x 2048 product
def test_frechet_distance_equals_pytorch_fids_at_full_rank(reference_code):
    """pytorch-fid's calculate_frechet_distance (scipy sqrtm) and koala's (eigh of S1^1/2 S2 S1^1/2) on full-rank
    2048-d statistics, as 30K images give: the same FID within 1e-4."""
    from pytorch_fid.fid_score import calculate_frechet_distance

    from koala.evaluation.metrics import feature_stats, frechet_distance

    rng = np.random.default_rng(0)
    scales = rng.uniform(0.1, 3.0, 2048)
    a = torch.from_numpy(rng.normal(size=(2600, 2048)) * scales)
    b = torch.from_numpy(rng.normal(size=(2500, 2048)) * scales[::-1] + 0.05)
    stats = (*feature_stats(a), *feature_stats(b))
    assert frechet_distance(*stats) == pytest.approx(calculate_frechet_distance(*stats), abs=1e-4)


def _tiny_open_clip(tmp_path):
    """A tiny open_clip CLIP (ViT-g-14's layout at width 32: 16 heads in each tower, open_clip's full vocabulary),
    created by open_clip from a model config, with its tokenizer and its eval transform."""
    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 2, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 16, "layers": 2},
    }
    (tmp_path / "koala-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "koala-tiny-clip.json")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("koala-tiny-clip")
    return model.eval(), preprocess, open_clip.get_tokenizer("koala-tiny-clip")


def test_clip_cosine_equals_open_clips_own(reference_code, tmp_path):
    """BK-SDM's CLIP score (src/eval_clip_score.py: open_clip's encode_image / encode_text, normalised, dot) on the
    256 px JPEGs, against koala's clip_cosine from the converted checkpoint (convert=open_clip)."""
    model, preprocess, tokenizer = _tiny_open_clip(tmp_path)
    torch.save(model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")  # the checkpoint's format: a pickle
    converted = main(
        [
            "convert=open_clip",
            f"src={tmp_path / 'open_clip_pytorch_model.bin'}",
            f"out={tmp_path / 'clip-vit-g-14'}",
            f"tokenizer={write_open_clip_tokenizer(tmp_path / 'tok')}",
        ]
    )
    # the same checkpoint as open_clip_model.safetensors (the other file its hub repos hold) converts to the same model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    again = main(["convert=open_clip", f"src={tmp_path / 'open_clip_model.safetensors'}", f"out={tmp_path / 'again'}"])
    first, second = load_file(str(converted / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    samples = write_samples(tmp_path / "gen", 3, seed=6)
    im256, _ = bksdm_files(samples, write_val2014(tmp_path / "val2014", 1, seed=7), tmp_path / "bksdm")
    prompts = ["a koala in a eucalyptus tree", "Two dogs, on a beach!", "a bowl of fruit"]
    expected = []
    with torch.no_grad():
        for f, prompt in zip(im256, prompts):
            img = model.encode_image(preprocess(Image.open(f)).unsqueeze(0))
            txt = model.encode_text(tokenizer([prompt]))
            expected.append(float((img / img.norm(dim=-1, keepdim=True) * txt / txt.norm(dim=-1, keepdim=True)).sum()))
    metric = build_metric("clip_cosine", converted, MetricContext("cpu", bksdm_protocol(tmp_path), tmp_path))
    row = metric([Sample(f, p) for f, p in zip(samples, prompts)])
    assert row["clip_cosine"] == pytest.approx(np.mean(expected), abs=1e-5)
    assert all(-1 < c < 1 for c in expected) and len(set(np.round(expected, 4))) == 3  # raw cosines, no x 100


def test_open_clip_vit_g_14_converts_to_its_transformers_shape(reference_code):
    """ViT-g-14 (open_clip's own config, built on the meta device: no memory) maps key for key onto a transformers
    CLIPModel with laion/CLIP-ViT-g-14-laion2B-s34B-b88K's sizes."""
    import open_clip
    from transformers import CLIPModel

    from koala.evaluation.open_clip_keys import open_clip_to_hf_clip
    from koala.evaluation.weights import open_clip_config

    with torch.device("meta"):
        state = open_clip.model.CLIP(**open_clip.get_model_config("ViT-g-14")).state_dict()
    config = open_clip_config(state)
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size) == (
        1408, 6144, 40, 16, 14,
    )  # fmt: skip
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) == (1024, 4096, 24, 16)
    assert (v.image_size, config.projection_dim) == (224, 1024)
    with torch.device("meta"):
        model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(open_clip_to_hf_clip(state), strict=False, assign=True)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)


def test_clip_score_is_torchmetrics_clip_score(tmp_path):
    """torchmetrics' CLIPScore (its own code; the model and processor handed to it) clamps the mean, not each image."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    from koala.evaluation.metrics import ClipScorer, _embedding

    clip = tmp_path / "clip"
    _tiny_transformers_clip(clip)
    scorer = ClipScorer(clip)
    files = write_samples(tmp_path / "gen", 6, seed=8, size=(48, 40))
    prompts = ["a koala", "a red car", "two dogs", "a bowl of fruit", "a city at night", "a cat"]
    cos = torch.nn.functional.cosine_similarity(
        scorer.image_features([Image.open(f).convert("RGB") for f in files]), scorer.text_features(prompts), dim=-1
    )
    assert (cos < 0).any() and cos.mean() > 0  # where clamping each image and clamping the mean differ

    class Processor:
        """koala's preprocessing as a processor torchmetrics can call."""

        def __call__(self, images=None, text=None, **kwargs):
            if images is not None:
                return {"pixel_values": scorer.pixels([Image.fromarray(i.permute(1, 2, 0).numpy()) for i in images])}
            return scorer.tokenizer(text, padding="max_length", truncation=True, return_tensors="pt")

    class Model(torch.nn.Module):
        """The CLIPModel, its features as tensors (transformers 5 returns model outputs, torchmetrics 1.9 expects
        tensors)."""

        def __init__(self):
            super().__init__()
            self.clip, self.config = scorer.model, scorer.model.config

        def get_image_features(self, pixel_values):
            return _embedding(self.clip.get_image_features(pixel_values=pixel_values))

        def get_text_features(self, input_ids, attention_mask=None):
            return _embedding(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    reference = CLIPScore(model_name_or_path=lambda: (Model(), Processor()))
    reference.update(
        [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files], prompts
    )
    ctx = MetricContext(
        "cpu", compose_config("evaluate", ["protocol=custom"], schema=EvaluateConfig).protocol, tmp_path
    )
    ours = build_metric("clip_score", clip, ctx)([Sample(f, p) for f, p in zip(files, prompts)])["clip_score"]
    assert ours == pytest.approx(float(reference.compute()), rel=1e-5)
    assert ours < float((100 * cos.clamp(min=0)).mean())  # what the per-image clamp gave


def _tiny_transformers_clip(path):
    """A tiny transformers CLIPModel folder (byte-level tokenizer) whose random projections give mixed-sign cosines."""
    from transformers import CLIPConfig, CLIPModel

    from koala.fixtures.tiny import write_byte_tokenizer

    tok = write_byte_tokenizer(path)
    torch.manual_seed(2)  # cosines of both signs on the test's images, mean above 0
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, pad_token_id=tok.pad_token_id, bos_token_id=len(tok) - 2,
                eos_token_id=len(tok) - 1)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)


# --- the extractor record of reference statistics --------------------------------------------------------------


def _refuse_models(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(koala.evaluation.runner, "load_pipeline", refuse)


def _evaluate_args(tiny_pipeline_dir, tmp_path, inception_file, protocol, reference, *extra):
    (tmp_path / "metadata.csv").write_text("file_name,text\n1.jpg,a koala\n")
    return [
        f"protocol={protocol}",
        "protocol.metrics=[fid]",
        f"protocol.prompts={tmp_path / 'metadata.csv'}",
        f"protocol.reference={reference}",
        f"models={{student: {tiny_pipeline_dir}}}",
        f"weights.inception={inception_file}",
        *extra,
    ]


@pytest.mark.parametrize(
    "case",
    ["no_record", "recorded_other", "declared_other", "declared_conflict", "declared_bad"],
)
def test_statistics_of_another_or_unknown_extractor_are_refused_before_loading(
    case, tiny_pipeline_dir, inception_file, tmp_path, monkeypatch, capsys
):
    _refuse_models(monkeypatch)
    mu, sigma = np.zeros(2048), np.eye(2048)
    np.savez(tmp_path / "plain.npz", mu=mu, sigma=sigma)  # pytorch-fid's --save-stats layout: no record
    from koala.evaluation.extractor import write_stats

    tf = Extractor("inception-2015-12-05", "torch-fidelity", 256, None)
    write_stats(tmp_path / "tf.npz", mu, sigma, tf)
    cases = {
        "no_record": ("plain.npz", [], r"records no extractor.*protocol.reference_extractor=" + BKSDM),
        "recorded_other": ("tf.npz", [], r"records statistics of .*torch-fidelity/256/nojpeg.*extracts " + BKSDM),
        "declared_other": (
            "plain.npz",
            ["protocol.reference_extractor=inception-2015-12-05/pytorch-fid/full/nojpeg"],
            r"declared .*as statistics of .*pytorch-fid/full/nojpeg.*cannot mix two extractors",
        ),
        "declared_conflict": (
            "tf.npz",
            [f"protocol.reference_extractor={BKSDM}"],
            r"records extractor .*torch-fidelity",
        ),
        "declared_bad": ("plain.npz", ["protocol.reference_extractor=pytorch-fid"], r"is not an extractor: expected"),
    }
    name, extra, message = cases[case]
    args = _evaluate_args(tiny_pipeline_dir, tmp_path, inception_file, "coco30k-bksdm", tmp_path / name, *extra)
    with pytest.raises(SystemExit) as exit:  # a setting that cannot work: one `error:` line, status 2
        main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: protocol.") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_declared_statistics_are_accepted_and_recorded_ones_reused(inception_file, tmp_path):
    samples = write_samples(tmp_path / "gen", 2, seed=9, size=(40, 40))
    write_val2014(tmp_path / "val2014", 2, seed=10)
    protocol = bksdm_protocol(tmp_path / "val2014")
    first = build_metric("fid", inception_file, MetricContext("cpu", protocol, tmp_path / "eval"))
    value = first([Sample(f, "") for f in samples])["fid"]
    stats = tmp_path / "eval" / "reference-stats" / "fid.npz"
    assert stats_extractor(stats) == BKSDM  # every .npz koala writes records its extractor
    # koala's own statistics need no declaration; the same statistics without the record need one
    reused = bksdm_protocol(stats)
    assert check_metrics(["fid"], _Weights(inception_file), reused)
    with np.load(stats) as z:
        np.savez(tmp_path / "bare.npz", mu=z["mu"], sigma=z["sigma"])
    for reference, extra in [(stats, {}), (tmp_path / "bare.npz", {"reference_extractor": BKSDM})]:
        ctx = MetricContext("cpu", bksdm_protocol(reference, **extra), tmp_path / "eval2")
        assert build_metric("fid", inception_file, ctx)([Sample(f, "") for f in samples])["fid"] == pytest.approx(value)
    # a torch-fidelity protocol refuses them: another extractor
    with pytest.raises(ValueError, match="cannot mix two extractors"):
        check_metrics(
            ["fid"],
            _Weights(inception_file),
            compose_config(
                "evaluate", ["protocol=coco30k-torchmetrics", f"protocol.reference={stats}"], schema=EvaluateConfig
            ).protocol,
        )


class _Weights:
    """weights.* of a config."""

    def __init__(self, inception):
        self.inception = str(inception)


def test_extractor_round_trips_through_its_string():
    e = Extractor("inception-2015-12-05", "pytorch-fid", 256, 75)
    assert str(e) == BKSDM and Extractor.parse(str(e)) == e
    assert str(Extractor("clip-vit", "clip")) == "clip-vit/clip/full/nojpeg"
    assert Extractor.parse("clip-vit/clip/full/nojpeg") == Extractor("clip-vit", "clip")


def test_reference_images_that_do_not_decode_are_named(inception_file, tmp_path):
    write_val2014(tmp_path / "val2014", 2, seed=11)
    bad = tmp_path / "val2014" / "COCO_val2014_000000000001.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    metric = build_metric("fid", inception_file, MetricContext("cpu", bksdm_protocol(tmp_path / "val2014"), tmp_path))
    with pytest.raises(OSError, match=r"COCO_val2014_000000000001.jpg does not decode"):
        metric.reference_features()
