"""The report of `python -m koala.bench gpu`: device peaks, the software it ran on, and the Markdown table."""

from __future__ import annotations

import importlib.metadata
import platform
import re
from typing import Any

import torch

# Dense (no sparsity) bf16 tensor-core peak TFLOP/s per GPU, from the vendors' datasheets; the first key found as a
# word in torch.cuda.get_device_name wins, so specific names come before general ones. Override: bench.peak_tflops.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),  # fp32 accumulate, as torch's bf16 matmuls
)


def device_peak(name: str, override: float | None) -> tuple[float | None, str]:
    """Peak bf16 dense TFLOP/s of the device named `name` and where the figure comes from."""
    if override:
        return float(override), "bench.peak_tflops"
    for key, peak in PEAK_BF16_TFLOPS:
        if re.search(rf"\b{re.escape(key)}\b", name):
            return peak, f"datasheet ({key}, bf16 dense)"
    return None, "unknown device: MFU omitted (give bench.peak_tflops=<bf16 dense TFLOP/s>)"


def _version(package: str) -> str:
    """An installed package's version, or `not installed`."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device) -> dict[str, Any]:
    """The device and the software versions the numbers depend on."""
    env: dict[str, Any] = {
        "device_type": device.type,
        "python": platform.python_version(),
        **{p: _version(p) for p in ("torch", "diffusers", "accelerate", "bitsandbytes")},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=torch.cuda.get_device_name(device),
            device_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            sdpa_backends=[
                n
                for n, on in (
                    ("flash", torch.backends.cuda.flash_sdp_enabled()),
                    ("mem_efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                    ("cudnn", torch.backends.cuda.cudnn_sdp_enabled()),
                    ("math", torch.backends.cuda.math_sdp_enabled()),
                )
                if on
            ],
        )
    else:
        env.update(device=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


def _num(value: float | None, fmt: str) -> str:
    """A table cell: a formatted number, or a dash when there is none."""
    return "-" if value is None else format(value, fmt)


def _percent(fraction: float | None) -> str:
    """A utilisation as a percentage, or a dash when the device's peak is unknown."""
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def _tflops(value: float) -> str:
    """TFLOP/s with one decimal, or three significant digits when small (tiny models on a CPU)."""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per configuration: its settings, then its numbers (or why there are none)."""
    lines = [
        "| student | recipe | compile | grad ckpt | optimizer | EMA | batch | samples/s | step s | TFLOP/s | MFU "
        "| TFLOP/s incl. recompute | HFU | peak alloc GiB | peak reserved GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        settings = (
            f"| {r['student']} | {r['recipe']} | {r['compile']} | {'on' if r['gradient_checkpointing'] else 'off'} "
            f"| {r['optimizer']} | {'on' if r['ema'] else 'off'} | {r['batch']} "
        )
        if r["status"] != "ok":
            lines.append(settings + f"| **{r['status'].upper()}** | {r.get('message', '')[:80]} |" + " |" * 6)
            continue
        lines.append(
            settings
            + f"| {r['samples_per_s']:.3f} | {r['step_s']:.4f} | {_tflops(r['tflops'])} | {_percent(r['mfu'])} "
            f"| {_tflops(r['tflops_incl_recompute'])} | {_percent(r['hfu'])} | {_num(r['peak_allocated_gib'], '.2f')} "
            f"| {_num(r['peak_reserved_gib'], '.2f')} |"
        )
    return lines


def to_markdown(report: dict[str, Any]) -> str:
    """The whole report, ready to paste into the README."""
    e, s = report["environment"], report["settings"]
    lines = []
    if e["device_type"] != "cuda":
        lines += [
            f"> **CPU run at tiny size ({s['arch']} teacher, {s['resolution']} px): these are not GPU numbers.** "
            "It runs the GPU mode's code so CI tests it; on a CUDA machine the same command measures SDXL -> "
            "KOALA-700M / 1B at 1024 px.",
            "",
        ]
    peak = report["peak_tflops"]
    lines += [
        f"Training step, {s['arch']} teacher (random weights, bf16) -> students, {s['resolution']} px, "
        f"distill={s['distill']}, mixed precision bf16, attention {report['attention']}, "
        f"median of {s['steps']} timed step(s) after {s['warmup']} warm-up, one {e['device_type']} device.",
        "",
        f"Device: {e['device']}"
        + (f" ({e['device_memory_gib']} GiB, CUDA {e['cuda']}, cuDNN {e['cudnn']}, SDPA backends "
           f"{'/'.join(e['sdpa_backends'])})" if e["device_type"] == "cuda" else f" ({e['threads']} threads)")
        + f"; peak bf16 dense: {_num(peak, '.0f')} TFLOP/s ({report['peak_source']}).",
        f"Software: torch {e['torch']}, diffusers {e['diffusers']}, accelerate {e['accelerate']}, "
        f"bitsandbytes {e['bitsandbytes']}, Python {e['python']}.",
        "",
        *table(report["rows"]),
        "",
        *NOTES,
    ]  # fmt: skip
    if "online_conditioning_gib" in report:
        lines.append(
            f"- Online conditioning (the plain recipe with `data=webdataset`) adds "
            f"{report['online_conditioning_gib']:.2f} GiB of VAE + text-encoder weights to each peak."
        )
    return "\n".join(lines)


NOTES = [
    "- Each row is the trainer's own step (`koala.train.step.train_step`, built by `koala.train.build`): noise, "
    "teacher forward, tapped student forward, every loss, backward, clipping, optimizer + LR schedule, EMA, logged "
    "terms; grad_accum=1, so every step runs the optimizer (a recipe that accumulates steps it 1 in N).",
    "- Cached conditioning: the step gets latents + text embeddings (what `python -m koala.cache` stores), so no VAE "
    "or text encoder runs or sits on the device; the data loader is not timed (`python -m koala.bench data`).",
    "- recipe plain = `experiment=koala-700m` / `koala-1b` settings (AdamW fp32, EMA fp32 on the device); 24gb = "
    "`experiment=koala-700m-24gb` settings (gradient checkpointing, bitsandbytes AdamW8bit, EMA off), for KOALA-1B "
    "with `unet=koala-1b`. Both with teacher.dtype=bf16, mixed_precision=bf16; compile inductor = the trainer's "
    "`compile=true` (the student is compiled, the teacher runs eager).",
    "- TFLOP/s and MFU count, on the meta device, the teacher forward + the student forward + 2x the student forward "
    "for its backward (matmuls, linears, convolutions, attention; not norms, activations or the losses); "
    "'incl. recompute' and HFU add the forwards gradient checkpointing reruns (counted on meta too).",
    "- peak alloc = `torch.cuda.max_memory_allocated` over the warm-up and timed steps of that row (teacher, student, "
    "gradients, optimizer state, EMA, activations); peak reserved adds the caching allocator's slack (last step). "
    "Online conditioning would add the VAE (fp32) and text encoders (bf16) on top (not measured). OOM = "
    "torch.cuda.OutOfMemoryError at that batch. samples/s is per device.",
]
