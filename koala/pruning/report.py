"""What a search writes: the sensitivity table (Markdown + JSON), its heat map, and the chosen spec as a unet config.

Every file is written atomically (a temporary name, flushed, then renamed), so an interrupted search never leaves a
file that looks complete.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from koala.models.specs import MidMode, StudentSpec
from koala.pruning.units import Unit

SPEC_MARK = "# koala.search:"  # the first line of a spec this command wrote (and may overwrite)


def atomic_write(path: Path, data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder, flushed to disk, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def table_rows(units: list[Unit], out: dict[str, float], feat: dict[str, float], point: dict[str, str]) -> list[dict]:
    """One JSON-ready row per unit, in forward order."""
    return [
        {
            "unit": u.name, "kind": u.kind, "stage": u.block, "layer": u.layer, "index": u.index,
            "params_removed": u.params, "flops_removed": u.flops, "out_rel_err": out[u.name],
            "feat_rel_err": feat.get(u.name), "feat_at": point.get(u.name), "move": u.move,
        }
        for u in units
    ]  # fmt: skip


def table_markdown(rows: list[dict], header: str) -> str:
    """The table: one row per unit with its saving, errors and error per million parameters removed."""
    lines = [header, "",
             "| unit | kind | params removed | GFLOPs removed | eps rel. err | next-stage feature rel. err (at) | "
             "eps err per M params | removed alone by the spec move |",
             "|---|---|---:|---:|---:|---|---:|---|"]  # fmt: skip
    for r in rows:
        per = r["out_rel_err"] / (r["params_removed"] / 1e6) if r["params_removed"] else math.inf
        feat = f"{r['feat_rel_err']:.4g} ({r['feat_at']})" if r["feat_rel_err"] is not None else "-"
        lines.append(
            f"| `{r['unit']}` | {r['kind']} | {r['params_removed']:,} | {r['flops_removed'] / 1e9:.3f} | "
            f"{r['out_rel_err']:.4g} | {feat} | {per:.4g} | {r['move'] or '-'} |"
        )
    return "\n".join(lines) + "\n"


def heat_map(rows: list[dict], path: Path, title: str) -> Path:
    """The U-Net as a picture: one row per transformer (stages in forward order) x its blocks, coloured by the eps
    error of bypassing each block, beside bars for the layer and mid moves on the same colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    blocks = [r for r in rows if r["kind"] == "block"]
    others = [r for r in rows if r["kind"] != "block"]
    layers = list(dict.fromkeys(r["layer"] for r in blocks))
    width = max([r["index"] for r in blocks], default=0) + 1
    values = [r["out_rel_err"] for r in rows if r["out_rel_err"] > 0]
    norm = LogNorm(vmin=min(values, default=1e-6), vmax=max(values, default=1.0))
    cmap = plt.get_cmap("magma_r")
    fig, (ax, bx) = plt.subplots(
        1, 2, figsize=(6 + 0.75 * width, 1.2 + 0.36 * max(len(layers), len(others))),
        gridspec_kw={"width_ratios": [max(width, 2), 4]},
    )  # fmt: skip
    for r in blocks:
        y, x, v = layers.index(r["layer"]), r["index"], r["out_rel_err"]
        ax.add_patch(Rectangle((x, y), 1, 1, color=cmap(norm(max(v, norm.vmin)))))
        dark = norm(max(v, norm.vmin)) > 0.55
        ax.text(x + 0.5, y + 0.5, f"{v:.2g}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
        if r["move"]:  # the block the spec language's depth move removes
            ax.add_patch(Rectangle((x + 0.04, y + 0.04), 0.92, 0.92, fill=False, ec="#1f77b4", lw=1.6))
    ax.set_xlim(0, width)
    ax.set_ylim(len(layers), 0)
    ax.set_xticks([i + 0.5 for i in range(width)], [str(i) for i in range(width)])
    ax.set_yticks([i + 0.5 for i in range(len(layers))], layers, fontsize=8)
    ax.set_xlabel("transformer block (blue frame: removed by the spec's depth move)")
    ax.set_title("eps rel. error, one block bypassed", fontsize=9)
    names = [r["unit"] for r in others]
    bx.barh(range(len(others)), [r["out_rel_err"] for r in others],
            color=[cmap(norm(max(r["out_rel_err"], norm.vmin))) for r in others])  # fmt: skip
    bx.set_xscale("log")
    bx.set_yticks(range(len(others)), names, fontsize=7)
    bx.invert_yaxis()
    bx.yaxis.tick_right()
    bx.set_title("layer pairs and mid block removed", fontsize=9)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=[ax, bx], location="bottom", shrink=0.6,
                 label="E[(eps_removed - eps)^2] / Var(eps)")  # fmt: skip
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png")
    plt.close(fig)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def spec_yaml(spec: StudentSpec, comments: list[str]) -> str:
    """A `configs/unet/<name>.yaml` that `koala.train unet=<name>` composes onto its `unet` schema."""

    def flow(v: Any) -> str:
        return json.dumps(v) if v is not None else "null"

    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    fields = {
        "name": spec.name,
        "encoder_keep": plain(spec.encoder_keep),
        "decoder_keep": plain(spec.decoder_keep),
        "encoder_depth": plain(spec.encoder_depth),
        "decoder_depth": plain(spec.decoder_depth),
        "mid": str(MidMode(spec.mid)),
        "mid_depth": spec.mid_depth,
        "layer_select": str(spec.layer_select),
    }
    body = [f"{k}: {flow(v) if not isinstance(v, str) else v}" for k, v in fields.items()]
    return "\n".join([f"{SPEC_MARK} {comments[0]}", *[f"# {c}" for c in comments[1:]], *body]) + "\n"


def write_spec(path: Path, spec: StudentSpec, comments: list[str]) -> Path:
    """Write the spec config; refuses to replace a config koala.search did not write."""
    if path.exists() and not path.read_text().startswith(SPEC_MARK):
        raise FileExistsError(f"{path} exists and was not written by koala.search: choose another search.name")
    return atomic_write(path, spec_yaml(spec, comments))
