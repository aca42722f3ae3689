"""What `evaluate` writes besides its JSON: a CSV and a self-contained HTML report page.

Both are views of the evaluate document (the ``summary`` of
:func:`jregfix.stages.evaluate.evaluate`'s result), so they cannot disagree with it.

* CSV (``--csv``): one row per method x regressor x scope, where scope is ``all`` (Table I,
  with the paired difference to the first regressor and its interval), ``joint`` (one joint)
  or ``action`` (one action family, when computed).
* ``index.html`` (``--report DIR``): Table I with the intervals and training-data flags, every
  pairwise difference, a per-joint and a per-action bar chart per method (one bar per
  regressor), and where each regressor puts each joint on a mesh. The figures are PNGs drawn by
  matplotlib's Agg canvas (no GUI backend, no global state) and embedded as base64 data URIs:
  the page loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jregfix.io.atomic import write_bytes
from jregfix.io.h36m import H36M17_NAMES

COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
FLAG = "fitted on test subjects"
CSV_COLUMNS = (
    "method",
    "regressor",
    "scope",
    "name",
    "mpjpe_mm",
    "pa_mpjpe_mm",
    "frames",
    "sequences",
    "baseline",
    "delta_mpjpe_mm",
    "delta_mpjpe_lower",
    "delta_mpjpe_upper",
    "delta_pa_mpjpe_mm",
    "delta_pa_mpjpe_lower",
    "delta_pa_mpjpe_upper",
    "fitted_on_test_subjects",
)


# ----------------------------------------------------------------------------- views of the doc


def methods_and_regressors(doc: Mapping) -> tuple[list[str], list[str]]:
    """Methods and regressors in the order they were evaluated."""
    results = doc["results"]
    return (
        list(dict.fromkeys(r["method"] for r in results)),
        list(dict.fromkeys(r["regressor"] for r in results)),
    )


def difference(doc: Mapping, method: str, regressor: str, baseline: str) -> dict | None:
    """The ``differences`` entry regressor - baseline of a method (None if absent)."""
    for d in doc.get("differences", ()):
        if (d["method"], d["regressor"], d["baseline"]) == (method, regressor, baseline):
            return d
    return None


def format_difference(metric: Mapping, digits: int = 1) -> str:
    """{"difference", "interval"} -> ``-2.4 [-3.1, -1.8]`` (no interval: ``-2.4 [n/a]``)."""
    d = f"{metric['difference']:+.{digits}f}"
    if metric["interval"] is None:
        return f"{d} [n/a]"
    lo, hi = metric["interval"]
    return f"{d} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def level_percent(doc: Mapping) -> str:
    return f"{100 * doc['protocol']['bootstrap']['level']:g}%"


# ----------------------------------------------------------------------------- CSV


def csv_rows(doc: Mapping) -> list[dict]:
    """The rows of :func:`write_csv` (dicts keyed by :data:`CSV_COLUMNS`)."""
    _, regs = methods_and_regressors(doc)
    rows = []
    for r in doc["results"]:
        base = {
            "method": r["method"],
            "regressor": r["regressor"],
            "fitted_on_test_subjects": r.get("fitted_on_test_subjects", False),
        }
        row = {
            **base,
            "scope": "all",
            "name": "",
            "mpjpe_mm": r["mpjpe_mm"],
            "pa_mpjpe_mm": r["pa_mpjpe_mm"],
            "frames": r["frames"],
            "sequences": r.get("sequences", ""),
        }
        d = difference(doc, r["method"], r["regressor"], regs[0])
        if d is not None:
            row["baseline"] = regs[0]
            for metric, key in (("mpjpe_mm", "delta_mpjpe"), ("pa_mpjpe_mm", "delta_pa_mpjpe")):
                row[f"{key}_mm"] = d[metric]["difference"]
                lo_hi = d[metric]["interval"] or ("", "")
                row[f"{key}_lower"], row[f"{key}_upper"] = lo_hi
        rows.append(row)
        pa_joint = r.get("per_joint_pa_mm", {})
        for name, value in r["per_joint_mm"].items():
            rows.append(
                {
                    **base,
                    "scope": "joint",
                    "name": name,
                    "mpjpe_mm": value,
                    "pa_mpjpe_mm": pa_joint.get(name, ""),
                    "frames": r["frames"],
                }
            )
        for name, a in r.get("per_action", {}).items():
            rows.append(
                {
                    **base,
                    "scope": "action",
                    "name": name,
                    "mpjpe_mm": a["mpjpe_mm"],
                    "pa_mpjpe_mm": a["pa_mpjpe_mm"],
                    "frames": a["frames"],
                }
            )
    return rows


def write_csv(path: str | Path, doc: Mapping) -> None:
    """Write :func:`csv_rows` atomically (floats with 17 significant digits: exact)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(doc):
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    write_bytes(path, buf.getvalue().encode())


# ----------------------------------------------------------------------------- figures


def _png(fig) -> str:
    """A matplotlib Figure as a base64 PNG data URI (no version metadata: same bytes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _grouped_bars(
    title: str, categories: list[str], series: Mapping[str, list[float]], ylabel: str
) -> str:
    """Bars grouped by category, one colour per series (regressor)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.55 * len(categories) + 2), 3.6), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(categories))
    for k, (name, values) in enumerate(series.items()):
        ax.bar(
            x + (k - (len(series) - 1) / 2) * width,
            values,
            width,
            label=name,
            color=COLOURS[k % len(COLOURS)],
        )
    ax.set_xticks(x, categories, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", color="#dddddd")
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, ncols=min(len(series), 4))
    return _png(fig)


def joints_on_mesh_figure(
    mesh: np.ndarray, regressors: Mapping[str, np.ndarray], label: str
) -> str:
    """Front (x, y) and side (z, y) views of ``mesh`` (V, 3) with each regressor's (17, V)
    joints ``J @ mesh`` (H36M-17 rows) marked. The picture's vertical is the body's y axis,
    flipped when needed so that the head is at the top (SMPL is y-up, image-like data y-down)."""
    from matplotlib.figure import Figure

    mesh = np.asarray(mesh, dtype=np.float64)
    joints = {n: j @ mesh for n, j in regressors.items()}  # (17, 3) each
    first = next(iter(joints.values()))
    up = 1.0 if first[H36M17_NAMES.index("Head top"), 1] >= first[0, 1] else -1.0
    fig = Figure(figsize=(9, 6.5), layout="constrained")
    for i, (title, axis) in enumerate((("front (x, y)", 0), ("side (z, y)", 2))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.scatter(mesh[:, axis], up * mesh[:, 1], s=0.3, c="#c8c8c8", linewidths=0)
        for k, (name, j) in enumerate(joints.items()):
            ax.scatter(
                j[:, axis],
                up * j[:, 1],
                s=22,
                marker="osD^v<>p"[k % 8],
                facecolors="none" if k % 2 == 0 else COLOURS[k % len(COLOURS)],
                edgecolors=COLOURS[k % len(COLOURS)],
                linewidths=1.0,
                label=name if i == 0 else None,
            )
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=7)
    fig.legend(loc="outside lower center", ncols=min(len(joints), 4), fontsize=8)
    fig.suptitle(f"joints of each regressor on the {label}", fontsize=10)
    return _png(fig)


# ----------------------------------------------------------------------------- page


def _table_i(doc: Mapping) -> str:
    methods, regs = methods_and_regressors(doc)
    lookup = {(r["method"], r["regressor"]): r for r in doc["results"]}
    pct = level_percent(doc)
    head = (
        "<tr><th>method</th><th>regressor</th><th>MPJPE</th>"
        f"<th>&Delta; MPJPE vs {html.escape(regs[0])} [{pct} CI]</th><th>PA-MPJPE</th>"
        f"<th>&Delta; PA-MPJPE vs {html.escape(regs[0])} [{pct} CI]</th>"
        "<th>frames</th><th>sequences</th><th>training data</th></tr>"
    )
    body = []
    for m in methods:
        for reg in regs:
            r = lookup[(m, reg)]
            d = difference(doc, m, reg, regs[0])
            deltas = (
                ["baseline", "baseline"]
                if d is None
                else [format_difference(d["mpjpe_mm"]), format_difference(d["pa_mpjpe_mm"])]
            )
            flag = FLAG if r.get("fitted_on_test_subjects") else ""
            cells = [
                m,
                reg,
                f"{r['mpjpe_mm']:.1f}",
                deltas[0],
                f"{r['pa_mpjpe_mm']:.1f}",
                deltas[1],
                str(r["frames"]),
                str(r.get("sequences", "")),
                flag,
            ]
            cls = ' class="flag"' if flag else ""
            body.append(
                f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
            )
    return f"<table>\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table>"


def _notes(doc: Mapping) -> str:
    p = doc["protocol"]
    items = []
    for name, info in p["regressors"].items():
        training = info.get("training", {})
        subjects = training.get("subjects")
        text = (
            f"{name}: trained on {', '.join(subjects)}"
            if subjects
            else f"{name}: training subjects unknown"
        )
        text += f" ({training.get('source', 'no provenance')})"
        if info.get("fitted_on_test_subjects"):
            text += (
                f"; {FLAG}: {', '.join(training['evaluated_subjects_in_training'])} are "
                "scored here, so its numbers on them are not held-out"
            )
        if info.get("warnings"):
            text += "; warning: " + "; ".join(info["warnings"])
        items.append(text)
    return "<ul>\n" + "\n".join(f"<li>{html.escape(t)}</li>" for t in items) + "\n</ul>"


def _all_pairs(doc: Mapping) -> str:
    items = [
        f"{d['method']}: {d['regressor']} - {d['baseline']}: MPJPE "
        f"{format_difference(d['mpjpe_mm'], 2)}, PA-MPJPE "
        f"{format_difference(d['pa_mpjpe_mm'], 2)} mm ({d['sequences']} sequences, "
        f"{d['frames']} frames)"
        for d in doc.get("differences", ())
    ]
    return "<ul>\n" + "\n".join(f"<li>{html.escape(t)}</li>" for t in items) + "\n</ul>"


STYLE = """body{font-family:sans-serif;margin:24px;max-width:1150px;color:#222}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #bbb;padding:4px 8px}
td:nth-child(n+3){text-align:right;font-variant-numeric:tabular-nums}
tr.flag td{background:#fff1d6}img{max-width:100%;display:block;margin:8px 0 20px}
li{font-size:14px;margin:2px 0}"""


def render_html(
    doc: Mapping, regressors: Mapping[str, np.ndarray], mesh: np.ndarray, mesh_label: str
) -> str:
    """The report page (a str); see the module docstring."""
    p = doc["protocol"]
    methods, regs = methods_and_regressors(doc)
    b = p["bootstrap"]
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>jregfix evaluate report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Table I: MPJPE / PA-MPJPE (mm)</h1>",
        (
            f"<p>Human3.6M protocol {esc(p['protocol'].upper())}, {len(p['joints'])} joints, "
            f"subjects {esc(', '.join(p['subjects']))}. &Delta; = regressor &minus; "
            f"{esc(regs[0])} (negative: lower error). Intervals: paired bootstrap over sequences "
            f"(subject, action, camera videos), {b['resamples']} resamples, seed {b['seed']}, "
            f"{esc(level_percent(doc))} percentile interval.</p>"
        ),
        _table_i(doc),
        "<h2>Regressors</h2>",
        _notes(doc),
        "<h2>Every pair of regressors</h2>",
        _all_pairs(doc),
        "<h2>Per-joint error</h2>",
    ]
    lookup = {(r["method"], r["regressor"]): r for r in doc["results"]}
    for m in methods:
        names = list(lookup[(m, regs[0])]["per_joint_mm"])
        series = {reg: [lookup[(m, reg)]["per_joint_mm"][n] for n in names] for reg in regs}
        parts.append(
            f'<img alt="per-joint MPJPE of {esc(m)}" src="'
            + _grouped_bars(f"{m}: per-joint MPJPE (mm) by regressor", names, series, "MPJPE (mm)")
            + '">'
        )
    parts.append("<h2>Per-action error</h2>")
    for m in methods:
        actions = list(lookup[(m, regs[0])].get("per_action", {}))
        if not actions:
            continue
        series = {
            reg: [lookup[(m, reg)]["per_action"][a]["mpjpe_mm"] for a in actions] for reg in regs
        }
        parts.append(
            f'<img alt="per-action MPJPE of {esc(m)}" src="'
            + _grouped_bars(
                f"{m}: per-action MPJPE (mm) by regressor", actions, series, "MPJPE (mm)"
            )
            + '">'
        )
    parts += [
        "<h2>Where each regressor puts each joint</h2>",
        (
            f'<img alt="joints on the mesh" src="'
            f'{joints_on_mesh_figure(mesh, regressors, mesh_label)}">'
        ),
        "</body></html>",
        "",
    ]
    return "\n".join(parts)


def write_report(
    out_dir: str | Path,
    doc: Mapping,
    regressors: Mapping[str, np.ndarray],
    mesh: np.ndarray,
    mesh_label: str,
) -> Path:
    """Write ``out_dir/index.html`` atomically; returns its path. ``regressors`` (K, V) the
    matrices as applied, ``mesh`` (V, 3) where the joints are shown."""
    path = Path(out_dir) / "index.html"
    write_bytes(path, render_html(doc, regressors, mesh, mesh_label).encode())
    return path
