"""Carry an SDXL LoRA over to a student through the weight-inheritance map (the library behind `koala.lora`).

Every student layer inherited from a teacher layer (koala.models.inherit.module_map) gets that layer's adapter;
adapters on teacher layers the student dropped are reported with the share of the LoRA's weight-delta norm they
held. Text-encoder adapters are kept as they are (students share SDXL's text encoders). The output is a diffusers /
PEFT LoRA file that the exported student pipeline loads with stock `pipe.load_lora_weights(...)`; alpha is folded
into the up weights, so the file needs no metadata. Input layouts: koala.ship.lora_format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from koala.models.inherit import map_name, module_map
from koala.models.unets import Plan, build_student, build_unet
from koala.ship.lora_format import Adapter, parse_lora, read_safetensors, teacher_module_tables


@dataclass
class RemapReport:
    """What a remap kept and dropped, with the LoRA's weight-delta norm on each side."""

    kept: dict[str, str]  # student module -> teacher module
    dropped: list[str]  # teacher modules the student has no layer for
    norm_kept: float
    norm_total: float
    text_modules: int

    @property
    def fraction_kept(self) -> float:
        """||ΔW over the kept layers||_F / ||ΔW over all U-Net layers||_F."""
        return self.norm_kept / self.norm_total if self.norm_total else 1.0

    def summary(self) -> str:
        """Kept / dropped counts, the norm fraction, and each dropped resnet, transformer or transformer layer."""
        n = len(self.kept) + len(self.dropped)
        lines = [
            f"U-Net: {len(self.kept)} of {n} LoRA layers kept, {self.fraction_kept:.1%} of the LoRA's weight-delta "
            f"norm; text encoders: {self.text_modules} layers kept as they are"
        ]
        kept = set(self.kept.values())
        units: dict[str, int] = {}
        for t in self.dropped:
            unit = _unit(t, kept)
            units[unit] = units.get(unit, 0) + 1
        lines += [f"  dropped {u} ({k} LoRA layers)" for u, k in sorted(units.items())]
        return "\n".join(lines)


def _unit(module: str, kept: set[str]) -> str:
    """What a dropped module belongs to: a whole resnet / transformer when none of it was kept, else its layer."""
    parts = module.split(".")
    for key in ("resnets", "attentions"):
        if key in parts:
            whole = ".".join(parts[: parts.index(key) + 2])
            if not any(k.startswith(whole + ".") for k in kept):
                return whole
    if "transformer_blocks" in parts:
        return ".".join(parts[: parts.index("transformer_blocks") + 2])
    return module


def student_modules(plan: Plan, teacher_config: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Teacher Linear/Conv module -> (student module inherited from it, its weight shape); random layers excluded."""
    student = build_student(teacher_config, plan, device="meta")
    mapping = module_map(plan)
    out = {}
    for name, m in student.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if any(name == p or name.startswith(p + ".") for p in plan.spec.random_init):
            continue
        out[map_name(name, mapping)] = (name, tuple(m.weight.shape))
    return out


def remap_lora(
    adapters: dict[tuple[str, str], Adapter], inverse: dict[str, tuple[str, tuple[int, ...]]]
) -> tuple[dict[tuple[str, str], Adapter], RemapReport]:
    """Rename U-Net adapters from teacher to student modules; drop those on layers the student lacks."""
    out, kept, dropped = {}, {}, []
    norm_kept = norm_total = 0.0
    for (component, module), a in adapters.items():
        if component != "unet":
            out[(component, module)] = a
            continue
        sq = a.norm_sq()
        norm_total += sq
        if module not in inverse:
            dropped.append(module)
            continue
        target, shape = inverse[module]
        if (shape[0], shape[1], *shape[2:]) != (a.up.shape[0], a.down.shape[1], *a.down.shape[2:]):
            raise ValueError(
                f"LoRA layer {module} (down {tuple(a.down.shape)}) does not fit student layer {target} {shape}"
            )
        out[("unet", target)] = a
        kept[target] = module
        norm_kept += sq
    text = sum(1 for c, _ in adapters if c != "unet")
    return out, RemapReport(kept, sorted(dropped), math.sqrt(norm_kept), math.sqrt(norm_total), text)


def peft_state_dict(adapters: dict[tuple[str, str], Adapter]) -> dict[str, torch.Tensor]:
    """The keys stock `load_lora_weights` reads, each adapter's scale folded into its up weight.

    U-Net: PEFT's `unet.<module>.lora_A/B.weight`. Text encoders: diffusers' `lora_linear_layer.down/up`, the one
    form diffusers converts for every CLIP projection (its PEFT-key conversion covers attention projections only,
    so an MLP-only text-encoder LoRA in PEFT keys fails to load).
    """
    out = {}
    for (component, module), a in adapters.items():
        down, up = ("lora_A", "lora_B") if component == "unet" else ("lora_linear_layer.down", "lora_linear_layer.up")
        out[f"{component}.{module}.{down}.weight"] = a.down.contiguous()
        out[f"{component}.{module}.{up}.weight"] = (a.up.float() * a.scale).to(a.up.dtype).contiguous()
    return out


def remap_file(lora: str | Path, out: str | Path, teacher_config: dict, plan: Plan) -> RemapReport:
    """Read an SDXL LoRA, remap it onto the student `plan` describes and write it to `out` (nothing on error)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"out={str(out)!r}: the student LoRA is written as safetensors, name it *.safetensors")
    if out.resolve() == Path(lora).resolve():
        raise ValueError(f"out={str(out)!r} is the input LoRA; choose another file")
    state, metadata = read_safetensors(lora)
    shapes, kohya = teacher_module_tables(build_unet(teacher_config, device="meta"))
    adapters = parse_lora(state, metadata, shapes, kohya, source=str(lora))
    remapped, report = remap_lora(adapters, student_modules(plan, teacher_config))
    if not remapped:
        raise ValueError(f"{lora}: no LoRA layer falls on a layer the student kept; nothing to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(peft_state_dict(remapped), str(tmp), metadata={"format": "pt"})
    tmp.replace(out)  # the file appears only once complete
    return report
