"""`run_search(cfg)`: the whole search a composed `koala.search` config asks for, top to bottom.

Plan (costs and expected compute, printed before any weight is loaded), calibration set, sensitivity table and heat
map, then, with a budget, the spec: greedy removal (or the best-filled ComfyUI layout), written as a unet config
with its exact parameter count and FLOPs from the bench counters.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf

from koala.bench.flops import forward_flops
from koala.config.compose import CONFIG_DIR
from koala.data import build_dataloader
from koala.data.conditioning import SDXLConditioner
from koala.devices import DTYPES, pick_device
from koala.errors import ConfigError
from koala.fixtures import ensure_fixtures
from koala.models.forward import pooled_dim
from koala.models.pipeline_parts import PipelineSource
from koala.models.plans import teacher_unet_config
from koala.models.specs import SPECS
from koala.models.teacher import load_teacher
from koala.models.unets import build_student, count_parameters, resolve, student_config
from koala.pruning.comfyui import comfyui_layout, layout_variants
from koala.pruning.greedy import Budget, Result, additive_errors, greedy
from koala.pruning.moves import Costs, moves, teacher_spec
from koala.pruning.report import atomic_write, heat_map, table_markdown, table_rows, write_spec
from koala.pruning.sensitivity import calibration_inputs, measure
from koala.pruning.surgery import plan_selection
from koala.pruning.units import Unit, table_units
from koala.train.build import make_noising
from koala.train.diffusion import build_noise_scheduler

if TYPE_CHECKING:
    from koala.config.schema import TeacherConfig
    from koala.search import SearchConfig

GiB = 2**30


def vae_scale(teacher_cfg: TeacherConfig) -> int:
    """Image pixels per latent pixel: from the pipeline's VAE config (a folder's, or a single-file teacher's config
    folder) when it is on disk, else SDXL's 8."""
    path = (PipelineSource.of(teacher_cfg).config_dir if teacher_cfg.pipeline else Path()) / "vae" / "config.json"
    return 2 ** (len(json.loads(path.read_text())["block_out_channels"]) - 1) if path.is_file() else 8


def check_budget(s: Any) -> tuple[str, float] | None:
    """The budget asked for ((kind, value) or None), refusing two budgets or a ComfyUI restriction without one."""
    given = [(k, getattr(s, k)) for k in ("params", "flops") if getattr(s, k) is not None]
    if len(given) > 1:
        raise ConfigError("give one budget: search.params=... or search.flops=..., not both")
    if not given and s.comfyui:
        raise ConfigError("search.comfyui=true needs a budget: search.params=... or search.flops=...")
    if given and not s.name:
        raise ConfigError("a budget writes configs/unet/<search.name>.yaml: set search.name=<name>")
    if s.name in SPECS:
        raise ConfigError(f"search.name={s.name!r} is a registered spec; choose another name")
    return given[0] if given else None


def expected(costs: Costs, units: list[Unit], s: Any, dtype: torch.dtype, latent: int, budget) -> dict[str, float]:
    """What the table pass (and a re-measuring greedy, at most) will compute and hold, from the FLOP and parameter
    counters, before any weight is loaded."""
    flops = s.samples * (costs.teacher_flops + sum(costs.teacher_flops - u.flops for u in units))
    per_sample = (4 * latent * latent + 77 * costs.config["cross_attention_dim"] + pooled_dim(costs.config)) * 4
    plan = {
        "forwards": s.samples * (1 + len(units)),
        "tflops": flops / 1e12,
        "weights_gib": costs.teacher_params * dtype.itemsize / GiB,
        "calibration_gib": s.samples * per_sample / GiB,
    }
    if budget is not None and s.remeasure and not s.comfyui:
        # Removals: the cost to remove over the median block unit's saving; candidates: the moves from the teacher.
        savings = sorted(budget.value((u.params, u.flops)) for u in units if u.kind == "block") or [1]
        saving = savings[len(savings) // 2]
        total = budget.value((costs.teacher_params, costs.teacher_flops))
        removals = max(1, round((total - budget.target) / max(saving, 1)))
        candidates = len(moves(costs, teacher_spec(costs.config, s.layer_select)))
        plan["greedy_tflops"] = removals * candidates * (s.greedy_samples or s.samples) * costs.teacher_flops / 1e12
        plan["greedy_removals"], plan["greedy_candidates"] = removals, candidates
    return plan


def calibration(cfg: SearchConfig, device: torch.device, latent_size: int) -> list[dict]:
    """The fixed calibration set: `search.samples` noisy latents of the data source at the training timesteps."""
    s = cfg.search
    t = cfg.teacher  # a diffusers folder, or a full single-file checkpoint converted onto t.config
    conditioner = SDXLConditioner.from_pretrained(t.pipeline, vae=t.vae, device=device, config=t.config)
    noising = make_noising(cfg, build_noise_scheduler(t.pipeline, t.config))
    loader = build_dataloader(cfg.data, batch_size=s.batch_size, seed=s.seed)
    inputs = calibration_inputs(loader, conditioner, noising, s.samples, s.seed, device)
    del conditioner  # the text encoders and VAE are not needed again
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if inputs[0]["noisy"].shape[-1] != latent_size:
        raise ConfigError(f"the data gives {inputs[0]['noisy'].shape[-1]}px latents, expected {latent_size}")
    return inputs


def throughput(teacher: torch.nn.Module, inputs: list[dict], flops_per_sample: int) -> float:
    """Measured FLOP/s of the teacher on one calibration batch (after one warm-up forward)."""
    x = inputs[0]
    measure(teacher, [x], {})
    if x["noisy"].is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    measure(teacher, [x], {})
    if x["noisy"].is_cuda:
        torch.cuda.synchronize()
    return flops_per_sample * x["noisy"].shape[0] / (time.perf_counter() - t0)


def progress_printer(label: str, every: int = 10):
    """A `progress(done, total)` callback printing about `every` lines with elapsed time and an ETA."""
    t0 = time.perf_counter()

    def show(done: int, total: int) -> None:
        if done == total or done % max(1, total // every) == 0:
            el = time.perf_counter() - t0
            print(f"  {label}: {done}/{total} batches, {el:.0f} s, eta {el / done * (total - done):.0f} s", flush=True)

    return show


def choose(cfg: SearchConfig, costs: Costs, budget: Budget, teacher, inputs, table: dict[str, float]) -> Result:
    """The spec at the budget: greedy (re-measured or additive), or the best variant of the fitting ComfyUI layout."""
    s = cfg.search

    subset = _first_samples(inputs, s.greedy_samples or s.samples)

    def measured(specs: list) -> list[float]:
        sels = {str(i): plan_selection(resolve(costs.config, spec)) for i, spec in enumerate(specs)}
        errs = measure(teacher, subset, sels).out
        return [errs[str(i)] for i in range(len(specs))]

    if s.comfyui:
        model, layout_spec = comfyui_layout(costs, budget)
        variants = layout_variants(costs, layout_spec)
        print(
            f"ComfyUI layout {model} ({layout_spec.name}): measuring {len(variants)} ways to fill it from the teacher"
        )
        errors = measured(variants)
        best = min(range(len(variants)), key=errors.__getitem__)
        params, flops = costs.cost(variants[best])
        note = f"ComfyUI {model} layout; the best of {len(variants)} ways to fill it (kept layers, layer_select)"
        return Result(variants[best], params, flops, errors[best], note=note)
    evaluate = measured if s.remeasure else additive_errors(table, costs)
    print(f"greedy to {budget.kind} {budget.target:,} (+-{budget.tolerance:.0%}), "
          f"{'re-measuring every candidate' if s.remeasure else 'summing the table errors'}:")  # fmt: skip
    label = "eps rel. err" if s.remeasure else "summed table eps err"
    return greedy(costs, teacher_spec(costs.config, s.layer_select), budget, evaluate, label=label)


def _first_samples(inputs: list[dict], n: int) -> list[dict]:
    """The first `n` calibration latents (whole batches, the last one cut)."""
    out, have = [], 0
    for x in inputs:
        if have >= n:
            break
        out.append({k: v[: n - have] for k, v in x.items()})
        have += out[-1]["noisy"].shape[0]
    return out


def exact_counts(config: dict[str, Any], spec, resolution: int, scale: int, costs: Costs) -> tuple[int, int]:
    """The spec's parameters and FLOPs from the bench counters (koala.bench.unet / flops), checked against Costs."""
    params = count_parameters(build_student(config, spec, device="meta"))
    flops = forward_flops(student_config(config, spec), resolution, vae_scale=scale).total
    if (params, flops) != costs.cost(spec):
        raise RuntimeError(f"cost model {costs.cost(spec)} disagrees with the counters {(params, flops)}")
    return params, flops


def spec_comments(
    cfg: SearchConfig, result: Result, params: int, flops: int, costs: Costs, budget: Budget, resolution
) -> list:
    """The YAML's comment lines: how it was searched, its exact size and FLOPs, its error, the path to it."""
    s = cfg.search
    how = "the best-filled ComfyUI layout" if s.comfyui else (
        "greedy on eps error per " + ("M parameters" if budget.kind == "params" else "GFLOP") + " removed, "
        + ("re-measured after each removal" if s.remeasure else "table errors summed"))  # fmt: skip
    return [
        "python -m koala.search " + " ".join(sys.argv[1:]),
        f"teacher {cfg.teacher.name} ({costs.teacher_params:,} parameters); {how}; "
        f"calibration: {s.samples} noisy latents of data={cfg.data.name} at the training timesteps, seed {s.seed}",
        f"parameters {params:,} ({params / costs.teacher_params:.4f} of the teacher; count_parameters), "
        f"FLOPs/forward at {resolution} px {flops / 1e9:,.3f} G ({flops / costs.teacher_flops:.4f}; forward_flops)",
        f"budget {budget.kind} {budget.target:,}" + (f": {result.note}" if result.note else ""),
        f"eps relative error of the inherited student on the calibration set: {result.error:.5f}",
        "removed: " + ("; ".join(st.move for st in result.steps) or "-"),
    ]


def run_search(cfg: SearchConfig) -> dict[str, Any]:
    """Plan, measure, write the table and picture, and with a budget choose and write the spec."""
    s = cfg.search
    asked = check_budget(s)
    config, scale = teacher_unet_config(cfg.teacher), vae_scale(cfg.teacher)
    resolution, latent = cfg.data.resolution, cfg.data.resolution // scale
    costs = Costs(config, resolution, scale)
    budget = Budget.of(asked[0], asked[1], costs.teacher_params if asked[0] == "params" else costs.teacher_flops,
                       s.tolerance) if asked else None  # fmt: skip
    units = table_units(costs, s.layer_select)
    dtype = DTYPES[cfg.teacher.dtype]
    plan = expected(costs, units, s, dtype, latent, budget)
    print(f"teacher {cfg.teacher.name}: {costs.teacher_params:,} parameters, {costs.teacher_flops / 1e12:.4g} TFLOPs "
          f"per forward at {resolution} px; {len(units)} units to measure on {s.samples} calibration latents\n"
          f"expected: {plan['forwards']:,} U-Net forwards, {plan['tflops']:,.1f} TFLOPs in all; memory: teacher "
          f"{plan['weights_gib']:.2f} GiB ({cfg.teacher.dtype}), calibration set {plan['calibration_gib']:.2f} GiB, "
          f"plus one batch of {s.batch_size} activations and the text encoders + VAE while encoding")  # fmt: skip
    if "greedy_tflops" in plan:
        print(f"greedy: about {plan['greedy_removals']} removals x <= {plan['greedy_candidates']} candidates x "
              f"{s.greedy_samples or s.samples} latents: <= {plan['greedy_tflops']:,.1f} TFLOPs")  # fmt: skip
    if budget is not None and s.comfyui:
        comfyui_layout(costs, budget)  # says now, before any weight is loaded, when no layout fits
    for name in s.compare:
        try:
            resolve(config, SPECS[name]) if name in SPECS else None
        except ValueError as e:
            raise ConfigError(f"search.compare: {name} does not fit this teacher: {e}") from e
        if name not in SPECS:
            raise ConfigError(f"search.compare: unknown spec {name!r}; valid choices: {', '.join(SPECS)}")
    if s.dry_run:
        return {"plan": plan, "units": len(units)}
    return measure_and_choose(cfg, costs, units, budget, plan, (config, scale, resolution, latent))


def table_settings(cfg: SearchConfig) -> dict[str, Any]:
    """Everything the table's numbers depend on: a saved table with the same settings is reused."""
    keys = ("samples", "seed", "layer_select")
    return {
        "teacher": OmegaConf.to_container(cfg.teacher, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "noise": [str(cfg.timesteps), cfg.timestep_jitter, cfg.noise_offset],
        **{k: str(cfg.search[k]) if k == "layer_select" else cfg.search[k] for k in keys},
    }


def sensitivity_table(cfg: SearchConfig, costs: Costs, units: list[Unit], teacher, inputs: list[dict]) -> list[dict]:
    """Measure every unit (or reuse `sensitivity.json` measured with the same settings); write the table and map."""
    out, settings = Path(cfg.search.out), table_settings(cfg)
    saved = json.loads((out / "sensitivity.json").read_text()) if (out / "sensitivity.json").is_file() else {}
    if saved.get("settings") == settings and [r["unit"] for r in saved["rows"]] == [u.name for u in units]:
        print(f"reusing the table in {out / 'sensitivity.json'} (same settings; delete it to measure again)")
        return saved["rows"]
    sens = measure(teacher, inputs, {u.name: u.selection for u in units}, {u.name: u.block for u in units},
                   progress=progress_printer("sensitivity"))  # fmt: skip
    rows = table_rows(units, sens.out, sens.feat, sens.point)
    s = cfg.search
    header = (f"# Sensitivity of {cfg.teacher.name} ({costs.teacher_params:,} parameters): {s.samples} noisy latents "
              f"of data={cfg.data.name}, seed {s.seed}, layer_select={s.layer_select}; {sens.seconds:.0f} s")  # fmt: skip
    atomic_write(out / "sensitivity.md", table_markdown(rows, header))
    heat_map(rows, out / "sensitivity.png", f"{cfg.teacher.name}: sensitivity to removing each unit")
    record = {"settings": settings, "rows": rows, "seconds": sens.seconds}
    atomic_write(out / "sensitivity.json", json.dumps(record, indent=1))  # last: it marks the table complete
    print(f"wrote {out / 'sensitivity.md'}, sensitivity.json and sensitivity.png ({sens.seconds:.0f} s)")
    return rows


def measure_and_choose(
    cfg: SearchConfig, costs: Costs, units: list[Unit], budget: Budget | None, plan, geometry
) -> dict[str, Any]:
    """The part that needs weights: calibration, the table, the picture, and the spec at the budget."""
    s = cfg.search
    config, scale, resolution, latent = geometry
    out = Path(s.out)
    device = pick_device(s.device)
    ensure_fixtures(cfg)  # the tiny teacher and the generated data sets, when a preset names them and they are missing
    teacher = load_teacher(cfg.teacher).to(device).eval()
    inputs = calibration(cfg, device, latent)
    rate = throughput(teacher, inputs, costs.teacher_flops)
    greedy_s = (
        f", the greedy at most about {plan['greedy_tflops'] * 1e12 / rate:.0f} s" if "greedy_tflops" in plan else ""
    )
    print(f"measured {rate / 1e12:.3g} TFLOP/s on {device}: the table takes about "
          f"{plan['tflops'] * 1e12 / rate:.0f} s{greedy_s}")  # fmt: skip
    rows = sensitivity_table(cfg, costs, units, teacher, inputs)
    if device.type == "cuda":
        print(f"peak GPU memory so far: {torch.cuda.max_memory_allocated() / GiB:.2f} GiB")
    summary: dict[str, Any] = {"table": str(out / "sensitivity.md"), "rows": rows}
    if budget is None:
        return summary
    result = choose(cfg, costs, budget, teacher, inputs, {r["unit"]: r["out_rel_err"] for r in rows})
    spec = replace(result.spec, name=s.name)
    params, flops = exact_counts(config, spec, resolution, scale, costs)
    path = Path(s.spec_dir or CONFIG_DIR / "unet") / f"{s.name}.yaml"
    # The chosen student and the specs to compare with, measured on the whole calibration set in one pass.
    specs = {s.name: spec, **{n: SPECS[n] for n in s.compare}}
    final = measure(teacher, inputs, {n: plan_selection(resolve(config, sp)) for n, sp in specs.items()}).out
    result.error, compare = final[s.name], {n: final[n] for n in s.compare}
    write_spec(path, spec, spec_comments(cfg, result, params, flops, costs, budget, resolution))
    record = {"spec": str(path), "teacher": [costs.teacher_params, costs.teacher_flops], "params": params, "flops": flops, "error": result.error, "note": result.note,
              "steps": [asdict(st) for st in result.steps], "compare": compare}  # fmt: skip
    atomic_write(out / "search.json", json.dumps(record, indent=1))
    print(
        f"wrote {path}: {params:,} parameters ({params / costs.teacher_params:.4f}), {flops / 1e9:,.3f} GFLOPs, "
        f"eps rel. err {result.error:.5f}" + (f"; {result.note}" if result.note else "")
    )
    for n, e in compare.items():
        print(f"  for comparison, {n}: {costs.cost(SPECS[n])[0]:,} parameters, eps rel. err {e:.5f}")
    return {**summary, **record}
