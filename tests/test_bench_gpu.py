"""`python -m koala.bench gpu` runs its GPU code at tiny size on a CPU: the grid, the trainer's step per configuration,
FLOP accounting, OOM rows and the report files (structure only: no timing assertions, the machine is shared)."""

import json

import pytest
import torch

from koala.bench import gpu
from koala.bench.__main__ import COMMANDS
from koala.bench.flops import train_step_flops
from koala.bench.gpu_report import device_peak
from koala.models.archs import TINY_UNET_CONFIG
from koala.models.specs import get_spec
from koala.models.unets import student_config

TINY = ["bench.threads=1", "bench.device=cpu"]


def test_the_default_grid_covers_students_recipes_checkpointing_and_compile(capsys):
    report = gpu.main([*TINY, "bench.dry_run=true"])
    rows = report["rows"]
    assert report["settings"]["size"] == "tiny" and report["settings"]["arch"] == "tiny"  # cpu -> tiny, automatically
    # 2 students x (plain: 2 checkpointing x 2 compile + 24gb: checkpointing on x 2 compile)
    assert len(rows) == 12 and all(r["status"] == "planned" for r in rows)
    assert {r["student"] for r in rows} == {"tiny-700m", "tiny-1b"}
    assert {(r["compile"], r["gradient_checkpointing"]) for r in rows if r["recipe"] == "plain"} == {
        ("eager", False),
        ("eager", True),
        ("aot_eager", False),
        ("aot_eager", True),
    }
    lean = [r for r in rows if r["recipe"] == "24gb"]  # the recipe's own settings, from its experiment config
    assert len(lean) == 4 and all(r["gradient_checkpointing"] and r["optimizer"] == "AdamW8bit" and not r["ema"]
                                  for r in lean)  # fmt: skip
    plain = [r for r in rows if r["recipe"] == "plain"]
    assert all(r["optimizer"] == "AdamW" and r["ema"] for r in plain)
    assert all(r["teacher_dtype"] == "bf16" and r["mixed_precision"] == "bf16" for r in rows)
    out = capsys.readouterr().out
    assert "**PLANNED**" in out and "experiment=koala-700m-24gb unet=tiny-1b" in out
    assert COMMANDS["gpu"] is gpu.main


@pytest.mark.slow
def test_tiny_run_times_the_trainers_step_and_writes_the_report(tmp_path, capsys):
    report = gpu.main([*TINY, "bench.students=[koala-700m]", "bench.compile=[false]", "bench.checkpointing=[true]",
                       "bench.strict=true", f"bench.out={tmp_path}"])  # fmt: skip
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved == json.loads(json.dumps(report))
    rows = saved["rows"]
    assert [(r["recipe"], r["optimizer"]) for r in rows] == [("plain", "AdamW"), ("24gb", "AdamW8bit")]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["step_s"] > 0 and r["samples_per_s"] == pytest.approx(r["batch"] / r["step_s"])
        f = r["flops"]
        assert f["recompute"] > 0 and f["hardware"] == f["model"] + f["recompute"]  # checkpointing reruns forwards
        assert f["model"] == f["teacher_forward"] + 3 * f["student_forward"]
        assert r["tflops"] == pytest.approx(f["model"] / r["step_s"] / 1e12)
        assert r["mfu"] is None and r["peak_allocated_gib"] is None  # no peak, no CUDA memory on a CPU
    md = (tmp_path / "gpu.md").read_text()
    assert "these are not GPU numbers" in md and "torch " in md and "diffusers " in md and "SDPA" in md
    assert "| tiny-700m | 24gb | eager | on | AdamW8bit | off | 1 |" in md and "Cached conditioning" in md
    assert md.strip() in capsys.readouterr().out


@pytest.mark.slow
def test_an_oom_configuration_is_reported_and_the_grid_goes_on(tmp_path, monkeypatch):
    real = gpu.time_case

    def oom_when_uncheckpointed(cfg, case, s, device):
        if not cfg.gradient_checkpointing:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(cfg, case, s, device)

    monkeypatch.setattr(gpu, "time_case", oom_when_uncheckpointed)
    report = gpu.main([*TINY, "bench.students=[koala-700m]", "bench.recipes=[plain]", "bench.compile=[false]",
                       "bench.strict=true", f"bench.out={tmp_path}"])  # fmt: skip
    assert [(r["gradient_checkpointing"], r["status"]) for r in report["rows"]] == [(False, "oom"), (True, "ok")]
    assert "OutOfMemoryError" in report["rows"][0]["message"]
    assert "| **OOM** |" in (tmp_path / "gpu.md").read_text()
    assert gpu.is_oom(RuntimeError("backend failed")) is False
    wrapped = RuntimeError("compile failed")
    wrapped.__cause__ = torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert gpu.is_oom(wrapped)


@pytest.mark.slow
def test_a_compiled_configuration_runs_the_same_step(tmp_path):
    report = gpu.main([*TINY, "bench.students=[koala-1b]", "bench.recipes=[plain]", "bench.checkpointing=[false]",
                       "bench.strict=true", f"bench.out={tmp_path}"])  # fmt: skip
    assert [(r["compile"], r["status"]) for r in report["rows"]] == [("eager", "ok"), ("aot_eager", "ok")]
    assert report["rows"][0]["flops"] == report["rows"][1]["flops"]  # same work, other execution


def test_peaks_by_device_name_and_the_flop_split():
    assert device_peak("NVIDIA H100 80GB HBM3", None)[0] == 989.0
    assert device_peak("NVIDIA H100 PCIe", None)[0] == 756.0
    assert device_peak("NVIDIA H200", None)[0] == 989.0
    assert device_peak("NVIDIA A100-SXM4-80GB", None)[0] == 312.0
    assert device_peak("NVIDIA L40S", None)[0] == 362.0 and device_peak("NVIDIA L4", None)[0] == 121.0
    assert device_peak("NVIDIA GeForce RTX 4090", None)[0] == 165.0
    peak, why = device_peak("NVIDIA A10G", None)  # not the A10: unknown, so MFU is omitted
    assert peak is None and "bench.peak_tflops" in why
    assert device_peak("NVIDIA A10G", 70.0) == (70.0, "bench.peak_tflops")
    s = student_config(TINY_UNET_CONFIG, get_spec("tiny-700m"))
    plain = train_step_flops(TINY_UNET_CONFIG, s, 64, batch=2, checkpointing=False)
    assert plain.recompute == 0 and plain.teacher_forward > plain.student_forward > 0
    assert 1.5 * plain.student_forward < plain.student_backward <= 2 * plain.student_forward  # no grad for the input
