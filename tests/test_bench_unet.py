"""Size, FLOPs and latency table (KOALA.md sections 1 and 5)."""

import json

import pytest

from koala.bench.flops import forward_flops
from koala.bench.unet import BenchUNetConfig, bench_rows, main
from koala.models.archs import TINY_UNET_CONFIG


def test_sdxl_params_and_flops_ordering(tmp_path, capsys):
    rows = main(["bench.specs=[koala-1b,koala-700m]", "bench.resolution=256", f"bench.out={tmp_path}"])
    by = {r["spec"]: r for r in rows}
    assert [r["spec"] for r in rows] == ["sdxl", "koala-1b", "koala-700m"]
    assert by["sdxl"]["params"] == 2_567_463_684
    assert by["koala-1b"]["params"] == 1_161_184_324
    assert by["koala-700m"]["params"] == 782_822_724
    assert by["koala-1b"]["bytes"] == 2 * 1_161_184_324  # fp16
    assert by["sdxl"]["flops"] > by["koala-1b"]["flops"] > by["koala-700m"]["flops"] > 0
    assert by["koala-700m"]["paper v1 (25 steps) latency_ratio"] == pytest.approx(1.42 / 3.30)
    table = capsys.readouterr().out
    assert "1.42 (0.430)" in table and "0.79 (0.245)" in table and "TFLOPs/fwd @256px" in table
    saved = json.loads((tmp_path / "unet.json").read_text())
    assert saved["rows"][2]["flops_ratio"] == pytest.approx(by["koala-700m"]["flops"] / by["sdxl"]["flops"])


def test_attention_flops_are_counted():
    count = forward_flops(TINY_UNET_CONFIG, resolution=64)
    assert count.by_op.get("aten.bmm", 0) > 0  # QK^T and AV of SDPA
    assert count.total == sum(count.by_op.values())


def test_tiny_cpu_latency():
    cfg = BenchUNetConfig(
        arch="tiny",
        specs=["tiny-700m"],
        resolution=64,
        dtype="fp32",
        latency=True,
        device="cpu",
        steps=2,
        runs=2,
        warmup=1,
    )
    rows = bench_rows(cfg)
    assert all(r["latency_s"] > 0 and r["peak_gb"] is None for r in rows)
    assert rows[0]["latency_s_ratio"] == 1.0


def test_unknown_names_list_choices():
    with pytest.raises(KeyError, match="valid choices"):
        bench_rows(BenchUNetConfig(specs=["koala-2b"]))
    with pytest.raises(ValueError, match="expected one of sdxl, tiny"):
        bench_rows(BenchUNetConfig(arch="sd15"))
