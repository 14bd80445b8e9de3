"""Tap pairing: counts and shapes for full-size SDXL students (meta device), presets, rules and errors."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from koala.config.compose import CONFIG_DIR, compose_config
from koala.config.schema import TrainConfig
from koala.distill.pairing import TapPair, check_pair_shapes, pair_counts, pair_taps
from koala.distill.taps import list_tap_points
from koala.models.archs import SDXL_UNET_CONFIG, TINY_UNET_CONFIG
from koala.models.specs import get_spec, spec_from_fields
from koala.models.unets import build_student, build_unet, resolve

ALL_STAGES = ["encoder", "mid", "decoder"]


def distill(**kw):
    base = {
        "kinds": ["sa"],
        "stages": ALL_STAGES,
        "kind_weights": {},
        "stage_weights": {},
        "blocks": None,
        "kind_blocks": {},
        "reduction": "sum",
        "sa_point": "attn1",
        "pairing": "first",
    }
    return SimpleNamespace(**{**base, **kw})


def models(spec, config=TINY_UNET_CONFIG, device=None):
    """(plan, student, teacher) for a registered or custom spec."""
    spec = get_spec(spec) if isinstance(spec, str) else spec
    return resolve(config, spec), build_student(config, spec, device=device), build_unet(config, device=device)


@pytest.mark.parametrize(
    "name,total,counts",
    [
        ("koala-700m", 21, {("encoder", "sa"): 7, ("decoder", "sa"): 14}),
        ("koala-1b", 30, {("encoder", "sa"): 8, ("mid", "sa"): 6, ("decoder", "sa"): 16}),
    ],
)
def test_full_size_sdxl_pairs_and_shapes_on_meta(name, total, counts):
    plan, student, teacher = models(name, SDXL_UNET_CONFIG, device="meta")
    pairs = pair_taps(plan, distill(), student, teacher)
    assert len(pairs) == total and pair_counts(pairs) == counts
    shapes = check_pair_shapes(pairs, student, teacher, sample_size=1024 // 8, batch_size=2)
    for p in pairs:
        stage_640 = p.student.block in ("down_blocks.1", "up_blocks.1")
        assert shapes[p.student.name] == ((2, 4096, 640) if stage_640 else (2, 1024, 1280)), p.student.name
    # the documented decoder mapping: student layer 1 pairs with teacher layer 2
    by_name = {p.student.name: p.teacher.name for p in pairs}
    key = "up_blocks.0.attentions.1.transformer_blocks.4.attn1"
    assert by_name[key] == "up_blocks.0.attentions.2.transformer_blocks.4.attn1"


@pytest.mark.parametrize(
    "preset,kinds,suffix", [("ca", {"ca"}, "attn2"), ("ffn", {"ffn"}, "ff"), ("sa", {"sa"}, "attn1")]
)
def test_presets_choose_the_tapped_modules(preset, kinds, suffix):
    cfg = compose_config("train", [f"distill={preset}"], schema=TrainConfig)
    assert set(cfg.distill.kinds) == kinds
    plan, student, teacher = models("tiny-700m")
    points = list_tap_points(student, cfg.distill.kinds, cfg.distill.stages)
    assert points and all(p.name.endswith(f".{suffix}") and p.kind in kinds for p in points)
    pairs = pair_taps(plan, cfg.distill, student, teacher)
    assert len(pairs) == len(points) and all(p.teacher.name.endswith(f".{suffix}") for p in pairs)
    check_pair_shapes(pairs, student, teacher, sample_size=8)


def test_lf_and_combined_presets():
    plan, student, teacher = models("tiny-1b")
    lf = pair_taps(plan, compose_config("train", ["distill=lf"], schema=TrainConfig).distill, student, teacher)
    assert [p.student.name for p in lf] == [
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
        "up_blocks.2",
    ]
    assert all(p.student.name == p.teacher.name for p in lf)
    check_pair_shapes(lf, student, teacher, sample_size=8)
    both = pair_taps(plan, compose_config("train", ["distill=sa+lf"], schema=TrainConfig).distill, student, teacher)
    assert {p.student.kind for p in both} == {"sa", "lf"}
    for preset in ("out", "task"):
        cfg = compose_config("train", [f"distill={preset}"], schema=TrainConfig).distill
        assert pair_taps(plan, cfg, student, teacher) == [] and cfg.feat_weight == 0.0
    default = compose_config("train", schema=TrainConfig).distill
    assert list(default.kinds) == ["sa"]


@pytest.mark.parametrize("rule,teacher_layers", [("first", (0, 1)), ("uniform", (0, 3)), ("last", (2, 3))])
def test_pairing_rule_is_independent_of_init(rule, teacher_layers):
    plan, student, teacher = models("tiny-700m")  # init rule: first
    pairs = pair_taps(plan, distill(pairing=rule, blocks=["up_blocks.0"]), student, teacher)
    got = {p.student.name: p.teacher.name for p in pairs}
    for a, b in enumerate(teacher_layers):
        s = f"up_blocks.0.attentions.1.transformer_blocks.{a}.attn1"
        assert got[s] == f"up_blocks.0.attentions.2.transformer_blocks.{b}.attn1"
    with pytest.raises(ValueError, match="first, uniform, last"):
        pair_taps(plan, distill(pairing="middle"), student, teacher)


def test_weights_are_kind_times_stage_and_zero_drops():
    plan, student, teacher = models("tiny-1b")
    cfg = distill(kinds=["sa", "rb"], kind_weights={"sa": 2.0, "rb": 0.5}, stage_weights={"encoder": 0.5, "mid": 0.0})
    pairs = pair_taps(plan, cfg, student, teacher)
    assert {(p.student.kind, p.student.stage, p.weight) for p in pairs} == {
        ("sa", "encoder", 1.0),
        ("sa", "decoder", 2.0),
        ("rb", "encoder", 0.25),
        ("rb", "decoder", 0.5),
    }


def test_unmatched_taps_and_shape_mismatch_are_errors():
    plan, student, _ = models("tiny-1b")
    no_mid_teacher = build_student(TINY_UNET_CONFIG, spec_from_fields("sdxl", mid="none"))
    with pytest.raises(ValueError, match=r"no teacher partner:\n  mid_block.attentions.0.transformer_blocks.0.attn1"):
        pair_taps(plan, distill(stages=["mid"]), student, no_mid_teacher)
    teacher = build_unet(TINY_UNET_CONFIG)
    s = list_tap_points(student, ["sa"], blocks=["down_blocks.1"])[0]
    t = list_tap_points(teacher, ["sa"], blocks=["down_blocks.2"])[0]
    with pytest.raises(ValueError, match=r"1 tap pairs differ in shape:\n  down_blocks.1.*\(1, 16, 64\) vs teacher"):
        check_pair_shapes([TapPair(s, t, 1.0)], student, teacher, sample_size=8)


@pytest.mark.slow
def test_inspect_lists_pairs_and_taps():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "koala.inspect",
            "teacher=tiny",
            "unet=tiny-1b",
            "distill=ca",
            "list_taps=true",
            "data.resolution=64",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "teacher: 126 tap points" in out and "rb   decoder  up_blocks.2.resnets.2" in out
    assert "distill: ca" in out and "18 pairs at 64 px (latent 8)" in out and ".attn2" in out and ".attn1 " not in out


# Hydra merges a dict given on the command line into the preset's dict, so a dict could never lose an entry by an
# override. What is distilled is therefore chosen by lists (replaced), and every dict-valued option holds all its
# keys from the start (an override changes values, never the key set).
def dict_fields(node, prefix=""):
    """Dotted names of every dict-valued field of the train schema."""
    out = []
    for key in node:
        value = node[key]
        if OmegaConf.is_dict(value):
            typed = OmegaConf.get_type(value) is dict
            out += [f"{prefix}{key}"] if typed else dict_fields(value, f"{prefix}{key}.")
    return out


def test_every_dict_option_holds_all_its_keys_in_every_preset():
    from koala.config.schema import TrainConfig
    from koala.distill.taps import Stage, TapKind

    fields = dict_fields(OmegaConf.structured(TrainConfig))
    assert fields == ["distill.kind_weights", "distill.stage_weights", "distill.kind_blocks"]
    for yaml in (CONFIG_DIR / "distill").glob("*.yaml"):
        cfg = compose_config("train", [f"distill={yaml.stem}"], schema=TrainConfig)
        assert set(cfg.distill.kind_weights) == set(TapKind) and set(cfg.distill.stage_weights) == set(Stage), yaml
        assert set(cfg.distill.kind_blocks) == set(TapKind), yaml
    with pytest.raises(Exception, match="decodr"):
        compose_config("train", ["distill.stage_weights={decodr: 2.0}"], schema=TrainConfig)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["distill.stages=[decoder]"], {("decoder", "sa")}),
        (["distill=sa+lf", "distill.kinds=[ca]"], {("encoder", "ca"), ("mid", "ca"), ("decoder", "ca")}),
        (["distill=sa+lf", "distill.stages=[encoder]"], {("encoder", "sa"), ("encoder", "lf")}),
    ],
)
def test_list_overrides_replace_the_preset(overrides, expected):
    cfg = compose_config("train", ["unet=tiny-1b", *overrides], schema=TrainConfig)
    plan, student, teacher = models("tiny-1b")
    assert set(pair_counts(pair_taps(plan, cfg.distill, student, teacher))) == expected


def test_weight_overrides_change_only_the_named_weight():
    cfg = compose_config(
        "train",
        ["unet=tiny-1b", "distill=sa+lf", "distill.stage_weights={decoder: 2.0}", "distill.kind_weights={lf: 0.5}"],
        schema=TrainConfig,
    )
    plan, student, teacher = models("tiny-1b")
    weights = {(p.student.stage, p.student.kind): p.weight for p in pair_taps(plan, cfg.distill, student, teacher)}
    assert weights == {
        ("encoder", "sa"): 1.0,
        ("mid", "sa"): 1.0,
        ("decoder", "sa"): 2.0,
        ("encoder", "lf"): 0.5,
        ("mid", "lf"): 0.5,
        ("decoder", "lf"): 1.0,
    }


@pytest.mark.slow
def test_inspect_honours_a_stage_override():
    out = subprocess.run(
        [sys.executable, "-m", "koala.inspect", "unet=koala-700m", "distill.stages=[decoder]"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    summary = out.split("distill:")[1]
    assert "stages ['decoder']" in summary and "14 pairs" in summary
    assert "encoder" not in summary.split("pairs at")[1] and "down_blocks" not in summary


def test_kind_blocks_put_one_kind_in_its_own_blocks():
    """SA everywhere + LF only at the last decoder block, as one override."""
    plan, student, teacher = models("tiny-1b")
    cfg = compose_config(
        "train", ["distill=sa+lf", "distill.kind_blocks={lf: [up_blocks.2]}"], schema=TrainConfig
    ).distill
    pairs = pair_taps(plan, cfg, student, teacher)
    sa = pair_taps(plan, compose_config("train", ["distill=sa"], schema=TrainConfig).distill, student, teacher)
    assert [p for p in pairs if p.student.kind == "sa"] == sa  # every SA pair, in the same order
    assert [p.student.name for p in pairs if p.student.kind == "lf"] == ["up_blocks.2"]
    assert pairs[-1].student.name == "up_blocks.2"  # forward order kept
    check_pair_shapes(pairs, student, teacher, sample_size=8)
    # `blocks` still restricts every kind without an entry
    both = compose_config("train", ["distill=sa+lf", "distill.blocks=[up_blocks.0]",
                                    "distill.kind_blocks={lf: [down_blocks.0, up_blocks.2]}"], schema=TrainConfig).distill  # fmt: skip
    got = {(p.student.kind, p.student.block) for p in pair_taps(plan, both, student, teacher)}
    assert got == {("sa", "up_blocks.0"), ("lf", "down_blocks.0"), ("lf", "up_blocks.2")}
    with pytest.raises(ValueError, match=r"distill.kind_blocks.lf: unknown blocks \['up_blocks.9'\]"):
        pair_taps(plan, distill(kinds=["sa", "lf"], kind_blocks={"lf": ["up_blocks.9"]}), student, teacher)


def test_kind_blocks_for_a_kind_not_distilled_are_refused():
    from koala.config.checks import ConfigError, check_distill

    cfg = compose_config("train", ["distill=koala", "distill.kind_blocks={lf: [up_blocks.2]}"], schema=TrainConfig)
    with pytest.raises(ConfigError, match=r"distill.kind_blocks names \['lf'\], which distill.kinds=\['sa'\]"):
        check_distill(cfg.distill)


@pytest.mark.parametrize("name,n", [("koala-700m", 21), ("koala-1b", 30)])
def test_mean_reduction_gives_every_student_the_same_total_feature_weight(name, n):
    plan, student, teacher = models(name, SDXL_UNET_CONFIG, device="meta")
    summed = pair_taps(plan, distill(), student, teacher)
    assert len(summed) == n and sum(p.weight for p in summed) == n  # the default: the sum over pairs
    mean = pair_taps(plan, distill(reduction="mean"), student, teacher)
    assert [p.weight for p in mean] == [1 / n] * n
    zero = pair_taps(plan, distill(reduction="mean", stage_weights={"encoder": 0.0}), student, teacher)
    assert {p.weight for p in zero} == {1 / len(zero)} and len(zero) < n  # n counts the pairs that weigh


def test_mean_reduction_makes_the_feature_term_the_mean_over_pairs(tiny_teacher):
    import torch

    from koala.distill.task import DistillationTask, LossWeights

    plan, student, _ = models("tiny-700m")
    g = torch.Generator().manual_seed(0)
    x = {
        "prompt_embeds": torch.randn(2, 77, 64, generator=g), "pooled_prompt_embeds": torch.randn(2, 32, generator=g),
        "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2),
    }  # fmt: skip
    noisy, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    out = {}
    for reduction in ("sum", "mean"):
        pairs = pair_taps(plan, distill(reduction=reduction), student, tiny_teacher)
        with torch.no_grad(), DistillationTask(student, tiny_teacher, pairs, LossWeights(feat=3.0)) as task:
            out[reduction] = task(noisy, torch.tensor([10, 700]), x, target)
    n = len(pairs)
    torch.testing.assert_close(out["mean"]["feat"], out["sum"]["feat"] / n)
    torch.testing.assert_close(
        out["mean"]["loss"] - out["sum"]["loss"], 3.0 * (out["mean"]["feat"] - out["sum"]["feat"])
    )
    assert torch.equal(out["mean"]["feat/sa"], out["sum"]["feat/sa"])  # logged per kind: unweighted, as before


def test_inspect_prints_each_pairs_effective_weight():
    from koala.inspect import InspectConfig, inspect_config

    cfg = compose_config("inspect", ["teacher=tiny", "unet=tiny-700m", "distill.feat_weight=2",
                                     "distill.reduction=mean", "distill.kind_weights={sa: 3.0}"],
                         schema=InspectConfig)  # fmt: skip
    text = inspect_config(cfg)
    n = int(text.split(" pairs at ")[0].rsplit(" ", 1)[1])
    assert f"w = feat_weight 2 x kind weight x stage weight / {n} pairs (distill.reduction=mean" in text
    weights = [line.split(" w=")[1].split()[0] for line in text.splitlines() if " <- " in line]
    assert len(weights) == n and set(weights) == {f"{2 * 3 / n:.4g}"}
