"""ComfyUI's compressed SDXL layouts: which one fits a budget, and every way to fill it from the teacher.

ComfyUI loads a compressed SDXL U-Net only if it detects its model type (`comfy/supported_models.py`, matched on the
input blocks' transformer depths at SDXL's widths; KOALA.md section 7). `search.comfyui=true` keeps the result to
the whole layout of one of those types; the search then chooses which teacher layers and blocks fill it.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

from koala.errors import ConfigError
from koala.models.specs import SPECS, LayerSelect, StudentSpec
from koala.models.unets import layout, resolve, student_config
from koala.pruning.greedy import Budget
from koala.pruning.moves import Costs, explicit_spec

# ComfyUI detects a compressed SDXL U-Net by its input blocks' transformer depths, at SDXL's widths only
# (comfy/supported_models.py; KOALA.md section 7): its model class -> our registered spec of the same layout.
COMFYUI_LAYOUTS = {"KOALA_700M": "koala-700m", "KOALA_1B": "koala-1b", "SSD1B": "ssd-1b", "Segmind_Vega": "vega"}
COMFYUI_WIDTHS = {"block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
                  "projection_class_embeddings_input_dim": 2816}  # fmt: skip


def structure(config: dict[str, Any]) -> tuple:
    """A U-Net's layout as ComfyUI builds it: layers and transformer depth per layer, per stage, and its mid block."""
    lay = layout(config)
    return lay.down_depth, lay.up_depth, lay.mid, lay.mid_depth


def comfyui_layout(costs: Costs, budget: Budget) -> tuple[str, StudentSpec]:
    """The ComfyUI layout within the budget's band (the nearest if several); raises saying none fits, and why."""
    widths = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in costs.config.items() if k in COMFYUI_WIDTHS}
    if widths != COMFYUI_WIDTHS:
        raise ConfigError(
            f"search.comfyui=true: no layout fits: ComfyUI detects compressed SDXL U-Nets only at SDXL's widths "
            f"{COMFYUI_WIDTHS}, and this teacher has {widths}"
        )
    fitting, listed = [], []
    for model, name in COMFYUI_LAYOUTS.items():
        value = budget.value(costs.cost(SPECS[name]))
        listed.append(f"{model} {value:,} ({value / budget.value((costs.teacher_params, costs.teacher_flops)):.3f})")
        if budget.within(value):
            fitting.append((abs(value - budget.target), model, SPECS[name]))
    if not fitting:
        raise ConfigError(
            f"search.comfyui=true: no ComfyUI layout has {budget.kind} within {budget.tolerance:.0%} of "
            f"{budget.target:,}; ComfyUI detects: {'; '.join(listed)}"
        )
    _, model, spec = min(fitting)
    return model, spec


def layout_variants(costs: Costs, spec: StudentSpec) -> list[StudentSpec]:
    """Every spec with the same U-Net layout as `spec` (which teacher layers each stage keeps, which blocks each
    transformer keeps) whose student inherits: what a search may choose inside a fixed layout."""
    plan = resolve(costs.config, spec)
    base, out = explicit_spec(plan, spec.name), []
    n_dec, target = [len(k) for k in plan.decoder_keep], structure(student_config(costs.config, spec))
    enc_choices = [
        list(itertools.combinations(range(len(d)), len(k))) for d, k in zip(plan.teacher.down_depth, plan.encoder_keep)
    ]
    dec_choices = [list(itertools.combinations(range(len(d)), n)) for d, n in zip(plan.teacher.up_depth, n_dec)]
    for ek in itertools.product(*enc_choices):
        for dk in itertools.product(*dec_choices):
            for rule in LayerSelect:
                candidate = replace(base, encoder_keep=ek, decoder_keep=dk, layer_select=rule)
                try:
                    same = structure(student_config(costs.config, candidate)) == target
                except ValueError:  # a kept teacher layer too shallow for the layout's depth
                    continue
                if same and costs.fits(candidate):
                    out.append(candidate)
    return out
