"""The step-time benchmark runs end to end on the tiny config (no timing assertions: the machine is shared)."""

import json

from koala.bench.train import main


def test_tiny_benchmark_writes_ratios(tmp_path, capsys):
    result = main(["bench.arch=tiny", "bench.resolution=64", "bench.steps=1", "bench.warmup=1", "bench.threads=1",
                   f"bench.out={tmp_path}"])
    saved = json.loads((tmp_path / "train.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved["median_s"]) == {"teacher", "student", "step/koala", "step/lf", "step/out"}
    assert set(saved["overhead"]) == {"koala", "lf", "out"}
    assert all(isinstance(r, float) and r > 0 for r in saved["overhead"].values())
    assert saved["pairs"]["out"] == 0 and saved["pairs"]["koala"] > 0
    assert saved["data"]["median_s"] is None and "synthetic" in saved["data"]["source"]
    assert "| full step, distill=koala |" in (tmp_path / "train.md").read_text()
    assert "overhead ratio" in capsys.readouterr().out
