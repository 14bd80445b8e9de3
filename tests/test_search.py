"""koala.search: removal equivalence, exact costs, the budget, the ComfyUI restriction, the whole search at tiny size
and a searched spec at SDXL size on the meta device."""

import copy
import re
from dataclasses import replace

import pytest
import torch

from koala.bench.flops import forward_flops
from koala.config.checks import ConfigError
from koala.config.compose import compose_config
from koala.config.schema import TrainConfig
from koala.models.archs import SDXL_UNET_CONFIG, TINY_UNET_CONFIG
from koala.models.forward import random_inputs, unet_forward
from koala.models.inherit import inherit_weights
from koala.models.specs import SPECS, LayerSelect, StudentSpec
from koala.models.unets import build_student, build_unet, count_parameters, resolve, student_config
from koala.pruning.comfyui import comfyui_layout, layout_variants, structure
from koala.pruning.greedy import Budget, additive_errors, greedy
from koala.pruning.moves import Costs, MoveKind, moves, teacher_spec
from koala.pruning.sensitivity import measure
from koala.pruning.surgery import bypassed, plan_selection, without_block
from koala.pruning.units import table_units


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_unet(TINY_UNET_CONFIG).eval()


@pytest.fixture(scope="module")
def tiny_costs():
    return Costs(TINY_UNET_CONFIG, 64, vae_scale=4)


def inputs(batch=2, seed=0) -> dict:
    return random_inputs(
        TINY_UNET_CONFIG, 16, batch, vae_scale=1, device="cpu", generator=torch.Generator().manual_seed(seed)
    )


@torch.no_grad()
def eps(unet, x) -> torch.Tensor:
    return unet_forward(unet, x["noisy"], x["t"], x)


@torch.no_grad()
def inherited(teacher, spec) -> torch.nn.Module:
    """The real student: built from its config and initialised by inherit_weights."""
    student = build_student(TINY_UNET_CONFIG, spec).eval()
    inherit_weights(student, teacher, resolve(TINY_UNET_CONFIG, spec))
    return student


def test_bypassing_units_in_the_teacher_is_the_inherited_student(teacher, tiny_costs):
    """Every move from the teacher (each depth, layer-pair and mid move) and the registered tiny specs under each
    layer_select: the teacher with the units bypassed computes exactly what the inherited student computes."""
    x, before = inputs(), eps(teacher, inputs())
    specs = [m.spec for m in moves(tiny_costs, teacher_spec(TINY_UNET_CONFIG))]
    specs += [replace(SPECS[n], layer_select=r) for n in ("tiny-700m", "tiny-1b", "vega") for r in LayerSelect]
    assert {m.kind for m in moves(tiny_costs, teacher_spec(TINY_UNET_CONFIG))} == set(MoveKind)
    for spec in specs:
        with bypassed(teacher, plan_selection(resolve(TINY_UNET_CONFIG, spec))):
            removed = eps(teacher, x)
        assert torch.equal(removed, eps(inherited(teacher, spec), x)), spec
        assert not torch.equal(removed, before)
    assert torch.equal(eps(teacher, x), before)  # every list is back in place


def test_a_bypassed_block_is_the_block_deleted(teacher):
    """One transformer block bypassed = a copy of the teacher with that block deleted; the last block = the spec's
    depth move under `first`, the first block = under `last`."""
    x, path = inputs(), "up_blocks.0.attentions.1"
    for b in range(4):
        deleted = copy.deepcopy(teacher)
        del deleted.get_submodule(path).transformer_blocks[b]
        with bypassed(teacher, without_block(path, 4, b)):
            assert torch.equal(eps(teacher, x), eps(deleted, x))
    shallower = ((4, 3, 4), (2, 2, 2), (0, 0, 0))
    for rule, b in ((LayerSelect.first, 3), (LayerSelect.last, 0)):
        student = inherited(teacher, StudentSpec("one-block", decoder_depth=shallower, layer_select=rule))
        with bypassed(teacher, without_block(path, 4, b)):
            assert torch.equal(eps(teacher, x), eps(student, x))


def test_costs_are_the_bench_counters(tiny_costs):
    """Parameters and FLOPs from the per-module table equal count_parameters and forward_flops of the built student."""
    by_kind = {m.kind: m.spec for m in moves(tiny_costs, teacher_spec(TINY_UNET_CONFIG))}  # one move of each kind
    for spec in [SPECS["tiny-700m"], SPECS["vega"], *by_kind.values()]:
        config = student_config(TINY_UNET_CONFIG, spec)
        exact = (count_parameters(build_unet(config, device="meta")), forward_flops(config, 64, vae_scale=4).total)
        assert tiny_costs.cost(spec) == exact, spec


def test_budget_lands_within_one_percent_or_on_the_nearest(teacher, tiny_costs):
    """Greedy on the measured table's errors lands within 1% of a parameter or FLOP target; an unreachable target
    ends on the smallest student the moves allow, and says so."""
    units = table_units(tiny_costs, "first")
    sens = measure(teacher, [inputs(2)], {u.name: u.selection for u in units})
    evaluate = additive_errors(sens.out, tiny_costs)
    start = teacher_spec(TINY_UNET_CONFIG)
    for kind, ratio in (("params", 0.45), ("flops", 0.7)):
        budget = Budget.of(kind, ratio, tiny_costs.teacher_params if kind == "params" else tiny_costs.teacher_flops)
        result = greedy(tiny_costs, start, budget, evaluate, log=lambda *a: None)
        value = result.params if kind == "params" else result.flops
        assert abs(value - budget.target) <= 0.01 * budget.target and not result.note, (kind, value, budget)
        assert (result.params, result.flops) == tiny_costs.cost(result.spec) and result.steps
        assert result.steps[-1].error == result.error == evaluate([result.spec])[0] > 0
    tiny = greedy(tiny_costs, start, Budget.of("params", 1000, 1), evaluate, log=lambda *a: None)
    assert "the smallest student the spec language allows" in tiny.note and not moves(tiny_costs, tiny.spec)


@pytest.fixture(scope="module")
def sdxl_costs():
    return Costs(SDXL_UNET_CONFIG, 1024)


def test_comfyui_restricts_to_the_layouts_it_detects(sdxl_costs, tiny_costs):
    """Only KOALA_700M / KOALA_1B / SSD1B / Segmind_Vega layouts, each filled only in ways with the same layout; a
    budget none is near, or a teacher at other widths, is refused naming why."""
    at = lambda name: Budget.of("params", sdxl_costs.cost(SPECS[name])[0], 1)  # noqa: E731
    assert comfyui_layout(sdxl_costs, at("koala-700m")) == ("KOALA_700M", SPECS["koala-700m"])
    assert comfyui_layout(sdxl_costs, at("koala-1b"))[0] == "KOALA_1B"
    assert comfyui_layout(sdxl_costs, Budget.of("params", 0.29, sdxl_costs.teacher_params))[0] == "Segmind_Vega"
    with pytest.raises(ConfigError, match=r"no ComfyUI layout has params within 1% of 1,283,731,842; .*KOALA_700M "
                                          r"782,822,724 \(0.305\)"):  # fmt: skip
        comfyui_layout(sdxl_costs, Budget.of("params", 0.5, sdxl_costs.teacher_params))
    with pytest.raises(ConfigError, match="only at SDXL's widths"):
        comfyui_layout(tiny_costs, Budget.of("params", 0.5, tiny_costs.teacher_params))
    variants = layout_variants(sdxl_costs, SPECS["koala-700m"])
    target = structure(student_config(SDXL_UNET_CONFIG, SPECS["koala-700m"]))
    assert len(variants) == 24  # 8 feasible choices of kept layers x 3 layer_select rules
    assert all(structure(student_config(SDXL_UNET_CONFIG, v)) == target and sdxl_costs.fits(v) for v in variants)
    assert {v.decoder_keep[0] for v in variants} == {(0, 2), (1, 2)}  # up_blocks.0's first layer may be either


@pytest.mark.slow
def test_search_at_tiny_size_writes_a_spec_that_trains(shared, tmp_path, capsys):
    """`python -m koala.search` end to end on the tiny teacher and data: the table, the picture, a spec at the
    budget with its exact counts, which koala.train composes and trains; refusals exit 2 before any weight loads."""
    from koala.search import main
    from koala.train.loop import train

    base = ["teacher=tiny", f"teacher.pipeline={shared / 'tiny-sdxl'}", "data=demo", "data.resolution=32",
            f"data.path='{shared / 'demo-shards' / 'demo-{00000..00003}.tar'}'", "search.samples=8",
            "search.batch_size=4", "search.greedy_samples=4", f"search.out={tmp_path / 'out'}", f"search.spec_dir={tmp_path / 'unet'}"]  # fmt: skip
    out = main([*base, "search.params=0.5", "search.name=tiny-searched", "search.compare=[tiny-700m]"])
    for name in ("sensitivity.md", "sensitivity.json", "sensitivity.png", "search.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert len(out["rows"]) == 43 and all(r["out_rel_err"] >= 0 for r in out["rows"])
    assert sum(r["kind"] == "layers" for r in out["rows"]) == 7 and out["compare"]["tiny-700m"] > 0
    text = (tmp_path / "unet" / "tiny-searched.yaml").read_text()
    assert text.startswith("# koala.search:") and f"parameters {out['params']:,} (" in text
    cfg = compose_config("train", [f"hydra.searchpath=[file://{tmp_path}]", "unet=tiny-searched",
                                   *[b for b in base if not b.startswith("search.")], "max_steps=2", "batch_size=2",
                                   f"output_dir={tmp_path / 'run'}", "sample_every=0", "report_to=[]"], schema=TrainConfig)  # fmt: skip
    assert abs(out["params"] - 0.5 * out["teacher"][0]) <= 0.01 * 0.5 * out["teacher"][0]
    assert (train(cfg) / "checkpoints").is_dir()
    again = main([*base, "search.flops=0.6", "search.remeasure=false", "search.name=tiny-flops"])  # summed table
    assert "reusing the table" in capsys.readouterr().out and again["rows"] == out["rows"]
    off = again["flops"] / (0.6 * again["teacher"][1]) - 1  # within 1%, or the nearest the moves reach, said so
    assert again["error"] > 0 and (abs(off) <= 0.01 or f"{off:+.2%} from the target" in again["note"]), again["note"]
    for bad, message in (
        (["search.params=0.5", "search.name=tiny-searched", "search.comfyui=true"], "only at SDXL's widths"),
        (["search.params=0.5", "search.flops=0.5", "search.name=x"], "give one budget"),
        (["search.params=0.5", "search.name=tiny-700m"], "is a registered spec"),
    ):
        with pytest.raises(SystemExit) as e:
            main([*base, *bad])
        assert e.value.code == 2, message


@pytest.mark.slow
def test_searched_spec_at_sdxl_size_builds_inherits_and_pairs(sdxl_costs, tmp_path, capsys):
    """At SDXL-Base-1.0's size on the meta device: a greedy search to KOALA-700M's parameter count (the GPU's
    measured errors replaced by a fixed table that prefers late blocks and deep stages) writes a spec that
    koala.inspect builds and pairs for distillation and inherit_weights fills; the dry run prints the plan."""
    from koala.inspect import InspectConfig, inspect_config
    from koala.pruning.report import write_spec
    from koala.search import main

    units = table_units(sdxl_costs, "first")
    table = {u.name: (1 + (u.index if u.index >= 0 else 20)) ** -1 * (4 if u.block.endswith(("0", "1")) else 1)
             for u in units}  # fmt: skip
    budget = Budget.of("params", SPECS["koala-700m"] and 782_822_724, 1)
    result = greedy(sdxl_costs, teacher_spec(SDXL_UNET_CONFIG), budget, additive_errors(table, sdxl_costs), log=print)
    assert abs(result.params - budget.target) <= 0.01 * budget.target
    assert {s.move.split()[0] for s in result.steps} >= {"depth", "mid:"}
    write_spec(tmp_path / "unet" / "sdxl-searched.yaml", replace(result.spec, name="sdxl-searched"), ["test"])
    cfg = compose_config(
        "inspect", [f"hydra.searchpath=[file://{tmp_path}]", "unet=sdxl-searched"], schema=InspectConfig
    )
    text = inspect_config(cfg)
    assert f"student {result.params:,}" in text and re.search(r"\d+ pairs at 1024 px", text)
    plan = resolve(SDXL_UNET_CONFIG, result.spec)
    report = inherit_weights(
        build_student(SDXL_UNET_CONFIG, result.spec, device="meta"), build_unet(SDXL_UNET_CONFIG, device="meta"), plan
    )
    assert report.copied and not report.random_init
    main(["teacher=sdxl-base", "data.resolution=1024", "search.dry_run=true", "search.params=0.305", "search.name=x"])
    assert "79 units to measure on 256 calibration latents" in capsys.readouterr().out
