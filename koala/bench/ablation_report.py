"""The ablation's report: `ablation.md` (per table and protocol: mean and 95 % interval of every figure, the paired
differences with the rows a table compares with, grad - none per variant), `ablation.png` (the figures with their
intervals) and `loss_curve.png` (one run's loss terms against the step).

Every interval is `koala.evaluation.intervals.crossed_interval` over (training seeds x pictures or latents); a
difference is paired by training seed and picture. **Bold**: the 95 % interval excludes 0; a dagger: the difference
also survives Holm's correction over every difference of its section (family-wise 5 %).
"""

from __future__ import annotations

import json
from pathlib import Path

from koala.evaluation.intervals import Interval, holm
from koala.shapes.paired import METRICS, compare_metric, summarise_metric

# (metric, split) columns of every table
COLUMNS = [("caption_accuracy", "seen"), ("caption_accuracy", "held_out"), ("psnr", "all"), ("mae", "all"),
           ("eps_rel_error", "all"), ("eps_rel_error", "held_out")]  # fmt: skip
SPLIT_NAMES = {"all": "", "seen": ", seen", "held_out": ", held-out"}
PLOTTED = [("caption_accuracy", "seen"), ("caption_accuracy", "held_out"), ("eps_rel_error", "all")]


def header(col: tuple[str, str]) -> str:
    """Column title: the metric's label and the captions it covers."""
    metric, split = col
    return METRICS[metric].label + SPLIT_NAMES[split]


def cell(ci: Interval, digits: int) -> str:
    """`mean [low, high]`."""
    return f"{ci.mean:.{digits}f} [{ci.low:.{digits}f}, {ci.high:.{digits}f}]"


def diff_cell(ci: Interval, digits: int, holm_ok: bool) -> str:
    """A signed difference with its interval; bold when it excludes 0, a dagger when it survives Holm."""
    text = f"{ci.mean:+.{digits}f} [{ci.low:+.{digits}f}, {ci.high:+.{digits}f}]"
    return (f"**{text}**" + (" †" if holm_ok else "")) if ci.excludes_zero else text


def figures_table(rows: dict[str, list[dict]], teacher: dict | None) -> list[str]:
    """One row per variant (and the teacher's caption accuracy): mean [95 % interval] of every column."""
    lines = ["| variant | " + " | ".join(header(c) for c in COLUMNS) + " | seeds |", "|---" * (len(COLUMNS) + 2) + "|"]
    if teacher is not None:
        acc = [cell(summarise_metric([teacher], m, s), 1) if m == "caption_accuracy" else "-" for m, s in COLUMNS]
        lines.append("| teacher | " + " | ".join(acc) + " | - |")
    for name, runs in rows.items():
        cells = [cell(summarise_metric(runs, m, s), METRICS[m].digits) for m, s in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(runs)} |")
    return lines


def difference_table(rows: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> tuple[list[str], list[dict]]:
    """Paired differences `a - b` for every (a, b) pair and column, marked by significance; and the findings."""
    found = [(a, b, col, compare_metric(rows[a], rows[b], *col)) for a, b in pairs for col in COLUMNS]
    keep = holm([ci.p_value for *_, ci in found])
    lines = ["| difference | " + " | ".join(header(c) for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    findings = []
    for i, (a, b) in enumerate(pairs):
        row = found[i * len(COLUMNS) : (i + 1) * len(COLUMNS)]
        ok = keep[i * len(COLUMNS) : (i + 1) * len(COLUMNS)]
        cells = [diff_cell(ci, METRICS[col[0]].digits, h) for (*_, col, ci), h in zip(row, ok)]
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
        findings += [{"a": a, "b": b, "metric": col[0], "split": col[1], "mean": ci.mean, "low": ci.low,
                      "high": ci.high, "p": ci.p_value, "holm": h}
                     for (*_, col, ci), h in zip(row, ok) if ci.excludes_zero]  # fmt: skip
    return lines, findings


def section(table, protocol: str, records: dict, teacher: dict) -> tuple[list[str], list[dict]]:
    """The figures and differences of one table under one protocol."""
    rows = {n: records[(table.name, protocol, n)] for n in table.variants if (table.name, protocol, n) in records}
    lines = [f"### {table.title} (`bench.tables=[{table.name}]`), `distill.balance={protocol}`", ""]
    if not rows:
        return lines + ["(no finished runs yet)", ""], []
    lines += figures_table(rows, teacher) + [""]
    pairs = [(n, ref) for ref in table.compare_to if ref in rows for n in rows if n != ref]
    if not pairs:
        return lines, []
    diff, findings = difference_table(rows, pairs)
    for f in findings:
        f.update(table=table.name, protocol=protocol)
    return lines + diff + [""], findings


def protocol_section(table, protocols: list[str], records: dict) -> tuple[list[str], list[dict]]:
    """Per variant with feature pairs, the paired difference between the last and first protocol (grad - none)."""
    if len(protocols) < 2:
        return [], []
    a, b = protocols[-1], protocols[0]
    rows = {}
    for n in table.variants:
        ra, rb = records.get((table.name, a, n)), records.get((table.name, b, n))
        if (
            ra and rb and [r["key"] for r in ra] != [r["key"] for r in rb]
        ):  # the same runs: the protocol changes nothing
            rows[f"{n}@{a}"], rows[f"{n}@{b}"] = ra, rb
    if not rows:
        return [], []
    pairs = [(f"{n}@{a}", f"{n}@{b}") for n in table.variants if f"{n}@{a}" in rows]
    lines, findings = difference_table(rows, pairs)
    for f in findings:
        f.update(table=table.name, protocol=f"{a}-{b}")
    return [f"### {table.title}: `balance={a}` - `balance={b}`, paired by seed and picture", "", *lines, ""], findings


def write_report(out: Path, tables: list, bench, records: dict, teacher: dict, minutes: float) -> dict:
    """Write ablation.md, ablation.png and loss_curve.png; return the markdown and the significant findings."""
    runs = {r["key"]: r for cell_runs in records.values() for r in cell_runs}
    cpu = sum(r["cpu_minutes"] for r in runs.values())
    lines = [f"# KOALA ablation on the shapes world ({bench.steps} steps, seeds 0-{bench.seeds - 1}, "
             f"{90 * bench.reps} pictures and {90 * bench.latent_reps} held-out latents per run)", "",
             f"{len(runs)} runs recorded; their training, export and scoring took {cpu:.0f} CPU-min in all "
             f"(this invocation: {minutes:.1f} min wall). Mean [95 % interval] over training seeds x pictures "
             "(koala.evaluation.intervals.crossed_interval); differences paired by seed and picture; **bold**: the "
             "interval excludes 0; †: also significant after Holm's correction within its table.", ""]  # fmt: skip
    findings = []
    for table in tables:
        protocols = table.protocols or bench.protocols
        for protocol in protocols:
            text, found = section(table, protocol, records, teacher)
            lines += text
            findings += found
        text, found = protocol_section(table, protocols, records)
        lines += text
        findings += found
    md = "\n".join(lines)
    write_text(out / "ablation.md", md + "\n")
    write_text(out / "findings.json", json.dumps(findings, indent=1))
    plot = ablation_plot(out / "ablation.png", tables, bench, records, teacher) if records else None
    curve = loss_curve(out / "loss_curve.png", runs)
    return {"markdown": md, "findings": findings, "plot": plot, "loss_curve": curve}


def write_text(path: Path, text: str) -> None:
    """Write a report file under a temporary name, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def ablation_plot(path: Path, tables: list, bench, records: dict, teacher: dict) -> Path:
    """Rows: caption accuracy (seen, held-out) and eps error; columns: tables; a marker per protocol with its 95 %
    interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(4.2 * len(tables), 7.0)
    fig, axes = plt.subplots(len(PLOTTED), len(tables), figsize=(width, 2.8 * len(PLOTTED)), squeeze=False)
    colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for j, table in enumerate(tables):
        protocols = table.protocols or bench.protocols
        names = list(table.variants)
        for i, (metric, split) in enumerate(PLOTTED):
            ax = axes[i][j]
            for k, protocol in enumerate(protocols):
                xs, ys, errs = [], [], [[], []]
                for x, n in enumerate(names):
                    if (table.name, protocol, n) in records:
                        ci = summarise_metric(records[(table.name, protocol, n)], metric, split)
                        xs.append(x + (k - (len(protocols) - 1) / 2) * 0.25)
                        ys.append(ci.mean)
                        errs[0].append(ci.mean - ci.low)
                        errs[1].append(ci.high - ci.mean)
                ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=3, color=colours[k % 4], label=f"balance={protocol}")
            if metric == "caption_accuracy":
                ax.axhline(summarise_metric([teacher], metric, split).mean, color="k", ls="--", lw=1, label="teacher")
            ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
            ax.set_title(f"{table.title}: {header((metric, split))}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()  # one legend, below the panels: none hides a point
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    # two lines: one table's width is narrower than the title on one line
    fig.suptitle(f"KOALA ablation, shapes world ({bench.steps} steps)\nmean and 95 % interval over {bench.seeds} "
                 "training seeds x pictures", fontsize=10)  # fmt: skip
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def loss_curve(path: Path, runs: dict) -> Path | None:
    """The loss terms of the first recorded `koala` run against the step (log scale), raw and smoothed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = sorted((r for r in runs.values() if r["label"].startswith("koala-")), key=lambda r: r["label"])
    metrics = Path(chosen[0]["run_dir"]) / "metrics.jsonl" if chosen else None
    if metrics is None or not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, colour in (("loss/total", "k"), ("loss/task", "tab:blue"), ("loss/out", "tab:orange"),
                        ("loss/feat", "tab:green")):  # fmt: skip
        if key in rows[0]:
            steps, values = [r["step"] for r in rows], [r[key] for r in rows]
            ax.plot(steps, values, color=colour, alpha=0.25, lw=0.8)
            w = max(1, len(values) // 20)
            smooth = [
                sum(values[max(0, i - w) : i + 1]) / len(values[max(0, i - w) : i + 1]) for i in range(len(values))
            ]
            ax.plot(steps, smooth, color=colour, label=key.split("/")[1])
    ax.set(xlabel="step", ylabel="loss (log)", yscale="log", title=f"loss terms of {chosen[0]['label']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
