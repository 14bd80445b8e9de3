"""The step-time benchmark runs the trainer's own step end to end on the tiny config and splits it by part (no
timing assertions: the machine is shared)."""

import json

import pytest

from koala.bench.step_timing import PARTS
from koala.bench.train import main


@pytest.mark.slow
def test_tiny_benchmark_writes_ratios_and_the_split_of_the_step(tmp_path, capsys):
    result = main(
        [
            "bench.arch=tiny",
            "bench.resolution=64",
            "bench.steps=1",
            "bench.warmup=1",
            "bench.threads=1",
            f"bench.out={tmp_path}",
        ]
    )
    saved = json.loads((tmp_path / "train.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(saved["median_s"]) == {"teacher", "student", "step/koala", "step/lf", "step/out"}
    assert set(saved["overhead"]) == {"koala", "lf", "out"}
    assert all(isinstance(r, float) and r > 0 for r in saved["overhead"].values())
    assert saved["pairs"]["out"] == 0 and saved["pairs"]["koala"] > 0
    # every part of the trainer's step ran (EMA and clipping are on in the default config; the teacher runs for KD)
    for preset in ("koala", "lf", "out"):
        split = saved["parts_s"][f"step/{preset}"]
        assert set(split) == set(PARTS) and all(split[p] > 0 for p in PARTS), (preset, split)
    assert saved["data"]["median_s"] is None and "synthetic" in saved["data"]["source"]
    md = (tmp_path / "train.md").read_text()
    assert "| full step, distill=koala |" in md and "| teacher forward | " in md and "| ema | " in md
    assert "overhead ratio" in capsys.readouterr().out


def test_the_benchmark_times_the_trainers_step_not_a_copy():
    import koala.bench.step_timing as bench
    import koala.train.loop as loop
    from koala.train import build, step

    assert bench.train_step is step.train_step is loop.train_step
    assert bench.build_trainable is build.build_trainable is loop.build_trainable
