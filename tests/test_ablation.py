"""`python -m koala.bench ablation`: tables as data, runs shared by identity, records reused, a report with CIs."""

import json

import pytest

from koala.bench.sweep import BenchAblation, load_table, plan_jobs, run_identity
from koala.config.compose import compose_config
from koala.config.schema import TrainConfig

SHARDS = "data.path='{}/shards/shapes-{{00000..00003}}.tar'"


def test_the_paper_tables_share_runs_by_identity(tmp_path):
    bench = BenchAblation(seeds=1, out=str(tmp_path))
    tables = [load_table(t) for t in bench.tables]
    jobs, cells = plan_jobs(bench, ["experiment=demo", "max_steps=10"], tables, tmp_path / "teacher")
    # kind: 5 feature variants x 2 protocols + out + task; stage: encoder, decoder x 2; sa_point: residual x 2
    assert len(jobs) == 18 and len({j.run_dir for j in jobs}) == 18
    koala = cells[("kind", "none", "koala")]
    assert cells[("stage", "none", "koala")] == koala == cells[("sa_point", "none", "koala")]
    assert cells[("kind", "grad", "koala")] != koala
    assert cells[("kind", "grad", "out")] == cells[("kind", "none", "out")]  # nothing to balance: one run
    grad_koala = next(j for j in jobs if j.key == cells[("kind", "grad", "koala")][0])
    assert "distill.balance=grad" in grad_koala.overrides and "seed=0" in grad_koala.overrides
    # what a run learns decides its identity; settings at their defaults and where it writes do not
    base = compose_config("train", ["experiment=demo", "max_steps=10", "distill=koala", "seed=0"], schema=TrainConfig)
    same = compose_config("train", ["experiment=demo", "max_steps=10", "distill=koala", "seed=0",
                                    "distill.balance=none", "output_dir=elsewhere", "log_every=1"],
                          schema=TrainConfig)  # fmt: skip
    other = compose_config("train", ["experiment=demo", "max_steps=11", "distill=koala", "seed=0"], schema=TrainConfig)
    assert run_identity(base, bench) == run_identity(same, bench) == koala[0] != run_identity(other, bench)


def test_a_table_names_its_variants_and_comparisons(tmp_path):
    from koala.errors import ConfigError

    with pytest.raises(ConfigError, match="no table 'kinds'.*tables: kind, kind-core, quick, sa_point, "):
        load_table("kinds")
    bad = tmp_path / "t.yaml"
    bad.write_text("title: t\nvariants:\n  a: [distill=koala]\ncompare_to: [b]\n")
    with pytest.raises(ConfigError, match=r"compare_to names \['b'\]"):
        load_table(str(bad))


@pytest.mark.slow
def test_quick_sweep_reports_intervals_and_continues_where_it_stopped(tmp_path, capsys):
    from koala.bench.ablation import main

    args = [f"bench.out={tmp_path / 'abl'}", "bench.quick=true", "bench.steps=2", "bench.sample_steps=2",
            "bench.samples=64", "bench.jobs=1", "batch_size=2", SHARDS.format(tmp_path)]  # fmt: skip
    first = main([*args, "bench.seeds=1"])  # a sweep stopped after seed 0 ...
    assert len(first["jobs"]) == 5  # koala, lf under two protocols; out once
    result = main([*args, "bench.jobs=2"])  # ... continues with seed 1 only, two runs at a time
    assert "5 of 10 runs recorded; 5 to run, 2 at a time" in capsys.readouterr().out
    records = result["records"]
    assert len(records) == 6 and all(len(runs) == 2 for runs in records.values())
    assert [r["seed"] for r in records[("quick", "grad", "koala")]] == [0, 1]
    pictures = records[("quick", "none", "koala")][0]["records"]["pictures"]
    assert len(pictures) == 90 and sum(p["held_out"] for p in pictures) == 18
    md = (tmp_path / "abl" / "ablation.md").read_text()
    for text in (
        "`distill.balance=none`",
        "`distill.balance=grad`",
        "| lf - koala |",
        "`balance=grad` - `balance=none`",
    ):
        assert text in md, text
    assert "| out - koala |" in md and "teacher |" in md
    for name in ("ablation.png", "loss_curve.png", "findings.json"):
        assert (tmp_path / "abl" / name).is_file(), name
    lf_grad = records[("quick", "grad", "lf")][0]
    assert list(json.loads((tmp_path / lf_grad["run_dir"] / "balance.json").read_text())["weights"]) == ["lf"]
    again = main(args)  # everything recorded: nothing is trained again
    assert "10 of 10 runs recorded; 0 to run" in capsys.readouterr().out
    assert again["findings"] == result["findings"]
