"""A guard for refactors: the demo recipe's per-step loss terms against a stored reference curve.

The run is `experiment=demo` (the shipped shapes teacher -> its KOALA-700M-shaped student, KOALA objective, seed 0)
for 50 steps, every loss term logged every step. What is shrunk, none of which changes a step's arithmetic:
  - the data: 2 shards of 128 shapes-world pictures (the preset writes 4 shards of 2048), drawn by the same
    generator; at 16 pictures a step, 50 steps read 800 pictures from the resampled stream either way;
  - no trackers (`report_to=[]`), one checkpoint (at the last step).
The reference `tests/reference/demo_loss_curve.tsv` was written by the code of main at ba22d14, before the
refactor of issue 23, with `python tests/test_reference_curve.py` (which rewrites it: do that only on purpose).

Tolerance: relative 1e-5 on every term at every step. On one CPU with one thread the run is deterministic (two
reruns were bit-identical), but float sums on a CPU are not associative: another thread count or another vector
width (AVX2 vs AVX-512 kernels) reorders reductions and moves each result by about fp32's epsilon (1.2e-7).
Measured: the same run with 2 threads instead of 1 stayed within 2.4e-7 relative of the reference on every term of
its first 31 steps (the drift did not grow with the steps). 1e-5 is 40 times that, and far below what a change of
the objective does: a loss weight changed by 10% moves a term at step 1 by more than 1e-2 relative
(`test_changed_weight_leaves_the_reference`).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parent / "reference" / "demo_loss_curve.tsv"
STEPS = 50
RTOL = 1e-5


def demo_overrides(out: Path, steps: int = STEPS, extra: tuple[str, ...] = ()) -> list[str]:
    """The demo recipe, shrunk as the module docstring says, writing into `out`."""
    from koala.fixtures.shards import ensure_demo_shards

    pattern = str(out / "shards" / "shapes-{00000..00001}.tar")
    ensure_demo_shards(pattern, 256, 64, world="shapes")
    return [
        "experiment=demo",
        f"output_dir={out / 'run'}",
        f"data.path='{pattern}'",  # quoted: braces are override grammar
        f"max_steps={steps}",
        "log_every=1",
        f"checkpoint_every={steps}",
        "report_to=[]",
        *extra,
    ]


def run_curve(out: Path, steps: int = STEPS, extra: tuple[str, ...] = ()) -> list[dict[str, float]]:
    """Run the shrunk demo recipe; every step's `loss/...` terms from its metrics.jsonl."""
    from koala.config.compose import compose_config
    from koala.config.schema import TrainConfig
    from koala.train.loop import train

    run = train(compose_config("train", demo_overrides(out, steps, extra), schema=TrainConfig))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], **{k: v for k, v in r.items() if k.startswith("loss/")}} for r in rows]


def read_reference(path: Path = REFERENCE) -> list[dict[str, float]]:
    """The stored curve: a header line of column names, then one tab-separated line per step (# lines skipped)."""
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    names = lines[0].split("\t")
    return [dict(zip(names, map(float, line.split("\t")))) for line in lines[1:]]


def write_reference(rows: list[dict[str, float]], path: Path = REFERENCE) -> None:
    """Write a curve in the format `read_reference` reads."""
    names = list(rows[0])
    head = "# the demo recipe's loss terms per step (tests/test_reference_curve.py writes and reads this file)\n"
    body = "\n".join("\t".join(f"{r[n]:.9e}" if n != "step" else str(r[n]) for n in names) for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + "\t".join(names) + "\n" + body + "\n")


def differences(rows: list[dict[str, float]], reference: list[dict[str, float]], rtol: float = RTOL) -> list[str]:
    """Every (step, term) where `rows` leaves the reference by more than `rtol` relative, or a term is missing."""
    out = []
    if len(rows) != len(reference):
        out.append(f"{len(rows)} logged steps, the reference has {len(reference)}")
    for got, want in zip(rows, reference):
        if set(got) != set(want):
            out.append(f"step {want['step']:.0f}: terms {sorted(got)} != reference {sorted(want)}")
            continue
        for name, value in want.items():
            if not math.isclose(got[name], value, rel_tol=rtol, abs_tol=0.0):
                out.append(f"step {want['step']:.0f} {name}: {got[name]:.9e} vs reference {value:.9e}")
    return out


@pytest.mark.slow
def test_demo_recipe_follows_the_reference_curve(tmp_path):
    rows = run_curve(tmp_path)
    bad = differences(rows, read_reference())
    assert not bad, f"{len(bad)} loss terms left the reference curve:\n" + "\n".join(bad[:20])


@pytest.mark.slow
def test_changed_weight_leaves_the_reference(tmp_path):
    """The negative control: the same recipe with one loss weight changed by 10% fails the comparison."""
    reference = read_reference()[:2]
    for i, weight in enumerate(["distill.out_weight=1.1", "distill.kind_weights.sa=0.9"]):
        rows = run_curve(tmp_path / str(i), steps=2, extra=(weight,))
        assert differences(rows, reference), f"{weight} left every loss term within {RTOL} of the reference"


if __name__ == "__main__":  # rewrite the reference (only when the numbers are meant to change)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        curve = run_curve(Path(tmp))
    write_reference(curve, Path(sys.argv[1]) if len(sys.argv) > 1 else REFERENCE)
    print(f"wrote {len(curve)} steps to {sys.argv[1] if len(sys.argv) > 1 else REFERENCE}")
