"""`python -m koala.bench unet [bench.resolution=1024] [bench.specs=[...]] [bench.latency=true bench.device=cuda]`.

For the teacher and each student spec: parameters, checkpoint size at the dtype, FLOPs of one U-Net forward (meta
device, no weights), and optionally latency and peak memory of a U-Net-only denoising loop with random weights
(`steps` forwards at batch 2 when guidance > 1, i.e. classifier-free guidance; text encoders and VAE excluded).
Ratios to the teacher sit beside the paper's published latency ratios (KOALA.md section 5).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from koala.bench.flops import forward_flops
from koala.config.compose import run_command
from koala.devices import DTYPES, DType, parse_dtype, pick_device
from koala.models.archs import ARCHS, Arch
from koala.models.forward import random_inputs, unet_forward
from koala.models.specs import get_spec
from koala.models.unets import build_unet, count_parameters, student_config

# Published latency (s/image) and peak memory (GB), RTX 4090, 1024 px, fp16 (KOALA.md section 5).
PAPER = {
    "v1 (25 steps)": {"sdxl": (3.30, 13.0), "koala-1b": (1.77, 10.2), "koala-700m": (1.42, 9.5)},
    "lightning (10 steps)": {"sdxl": (3.23, 11.9), "koala-1b": (0.79, 9.1), "koala-700m": (0.66, 8.3)},
}


@dataclass
class BenchUNetConfig:
    """Settings of `python -m koala.bench unet` (`bench.<key>=...`)."""

    arch: Arch = Arch.sdxl  # teacher U-Net config (koala.models.archs.ARCHS): sdxl | tiny
    specs: list[str] = field(default_factory=lambda: ["sdxl", "koala-1b", "koala-700m", "ssd-1b", "vega"])
    resolution: int = 1024  # image px; latents are resolution / vae_scale
    vae_scale: int = 8
    dtype: DType = DType.fp16  # checkpoint size and latency dtype: fp32 | fp16 | bf16
    latency: bool = False
    device: Optional[str] = None  # latency device; default cuda when available
    steps: int = 25
    guidance: float = 7.5  # > 1 doubles the batch (classifier-free guidance)
    runs: int = 3  # timed loops; the median is reported
    warmup: int = 1
    out: Optional[str] = None  # default outputs/bench/unet-<arch>-<resolution>


@dataclass
class BenchUNetJob:
    """The schema of configs/bench_unet.yaml."""

    bench: BenchUNetConfig = field(default_factory=BenchUNetConfig)


def unet_latency(config: dict[str, Any], cfg: BenchUNetConfig, device: torch.device) -> tuple[float, Optional[float]]:
    """Median seconds per image of `steps` U-Net forwards (random weights) and peak GPU memory in GB."""
    dtype = parse_dtype(cfg.dtype)
    unet = build_unet(config, device=device).to(dtype).eval()
    batch = 2 if cfg.guidance > 1 else 1
    x = random_inputs(config, cfg.resolution, batch, cfg.vae_scale, device=device, dtype=dtype)
    cuda = device.type == "cuda"

    def loop() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(cfg.steps):
                unet_forward(unet, x["noisy"], x["t"], x)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(cfg.warmup):
        loop()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = statistics.median(loop() for _ in range(cfg.runs))
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    return seconds, peak


def bench_rows(cfg: BenchUNetConfig) -> list[dict[str, Any]]:
    """One row per spec: size, FLOPs and (optionally) latency, with ratios to the first row (the teacher)."""
    teacher_config = ARCHS[Arch(cfg.arch)]
    names = ["sdxl"] + [s for s in cfg.specs if s != "sdxl"]  # the teacher (identity spec) comes first
    specs = {name: get_spec(name) for name in names}  # unknown names fail before any work
    device = pick_device(cfg.device)
    rows = []
    for name in names:
        config = student_config(teacher_config, specs[name])
        meta_unet = build_unet(config, device="meta")
        params = count_parameters(meta_unet)
        row: dict[str, Any] = {
            "unet": "teacher" if name == "sdxl" else name,
            "spec": name,
            "params": params,
            "bytes": params * DTYPES[DType(cfg.dtype)].itemsize,
            "flops": forward_flops(config, cfg.resolution, vae_scale=cfg.vae_scale, unet=meta_unet).total,
        }
        if cfg.latency:
            row["latency_s"], row["peak_gb"] = unet_latency(config, cfg, device)
        rows.append(row)
    for row in rows:
        for key in ("params", "flops", "latency_s"):
            if key in row:
                row[f"{key}_ratio"] = row[key] / rows[0][key]
        for table, published in PAPER.items():
            if row["spec"] in published:
                row[f"paper {table} latency_ratio"] = published[row["spec"]][0] / published["sdxl"][0]
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers rounded, missing values as a dash."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_markdown(rows: list[dict[str, Any]], cfg: BenchUNetConfig) -> str:
    """The table in the paper's shape: size, compute and speed per U-Net, ratios to the teacher."""
    lat = cfg.latency
    head = ["U-Net", "params", f"ckpt {cfg.dtype} GB", f"TFLOPs/fwd @{cfg.resolution}px", "params ratio", "FLOPs ratio"]
    head += ["latency s/img", "latency ratio", "peak GB"] if lat else []
    head += [f"paper {t} s (ratio)" for t in PAPER]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["unet"] if r["unet"] == "teacher" else f"`{r['unet']}`",
            f"{r['params']:,}",
            _fmt(r["bytes"] / 1e9, 2),
            _fmt(r["flops"] / 1e12, 2 if r["flops"] >= 1e11 else 5),
            _fmt(r["params_ratio"]),
            _fmt(r["flops_ratio"]),
        ]
        if lat:
            cells += [_fmt(r["latency_s"]), _fmt(r["latency_s_ratio"]), _fmt(r["peak_gb"], 2)]
        for published in PAPER.values():
            s = published.get(r["spec"])
            cells.append(f"{s[0]:.2f} ({s[0] / published['sdxl'][0]:.3f})" if s else "-")
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"\nFLOPs: one U-Net forward at batch 1, counted on the meta device (2 per multiply-add, attention "
        f"included). Teacher: SDXL-shaped `{cfg.arch}` config."
    )
    if lat:
        note += (
            f" Latency: U-Net only, random weights, {cfg.steps} steps at batch {2 if cfg.guidance > 1 else 1}, "
            f"{cfg.dtype}, median of {cfg.runs} after {cfg.warmup} warm-up; peak memory is the U-Net's alone."
        )
    note += " Paper: full pipeline on an RTX 4090, 1024 px, fp16 (KOALA.md section 5)."
    return "\n".join(lines) + "\n" + note + "\n"


def bench_unet(job: DictConfig) -> list[dict[str, Any]]:
    """Print the table of a composed `bench_unet` config, write markdown and JSON."""
    cfg: BenchUNetConfig = OmegaConf.to_object(job.bench)
    rows = bench_rows(cfg)
    table = format_markdown(rows, cfg)
    out = Path(cfg.out or f"outputs/bench/unet-{cfg.arch}-{cfg.resolution}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "unet.md").write_text(table)
    (out / "unet.json").write_text(
        json.dumps(
            {"config": OmegaConf.to_container(OmegaConf.structured(cfg)), "rows": rows, "paper": PAPER}, indent=1
        )
    )
    print(table + f"\nwrote {out / 'unet.md'} and {out / 'unet.json'}")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """CLI: compose `configs/bench_unet.yaml` with the overrides and run the benchmark."""
    return run_command("bench_unet", bench_unet, argv, schema=BenchUNetJob)
