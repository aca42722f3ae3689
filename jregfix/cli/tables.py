"""The one Table I printer, for `evaluate`, `run` and `demo`: views of the evaluate document.

Two layouts of the same numbers: ``long`` (`evaluate`: a row per method x regressor, each
difference to the first regressor with its bootstrap interval, flags, optional per-joint and
per-action tables) and ``wide`` (`run`, `demo`: a row per method, a column per regressor, then
the differences table).
"""

from __future__ import annotations

from collections.abc import Mapping

from rich.console import Console
from rich.table import Table

from jregfix.stages.report import FLAG, difference, format_difference, methods_and_regressors

LAYOUTS = ("long", "wide")


def print_table_i(
    doc: Mapping, layout: str = "long", per_action: bool = False, per_joint: bool = False
) -> None:
    """Print Table I of an evaluate document on stdout (``layout``: 'long' or 'wide', see the
    module docstring); ``per_joint`` / ``per_action`` add one breakdown table per method."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "wide":
        _wide(doc)
        print_differences(doc)
        return
    out = Console(width=max(120, Console().width))
    _long(out, doc)
    methods, regs = methods_and_regressors(doc)
    lookup = _lookup(doc)
    if per_joint:
        for m in methods:
            _breakdown(
                out,
                m,
                "joint",
                regs,
                {
                    reg: {
                        j: (
                            lookup[(m, reg)]["per_joint_mm"][j],
                            lookup[(m, reg)]["per_joint_pa_mm"][j],
                        )
                        for j in lookup[(m, reg)]["per_joint_mm"]
                    }
                    for reg in regs
                },
            )
    if per_action:
        for m in methods:
            _breakdown(
                out,
                m,
                "action",
                regs,
                {
                    reg: {
                        a: (v["mpjpe_mm"], v["pa_mpjpe_mm"])
                        for a, v in lookup[(m, reg)].get("per_action", {}).items()
                    }
                    for reg in regs
                },
            )


def print_differences(doc: Mapping) -> None:
    """Compact companion of the wide Table I: per method, each regressor minus the first,
    MPJPE and PA-MPJPE, with intervals."""
    if not doc.get("differences"):
        return
    methods, regs = methods_and_regressors(doc)
    b = doc["protocol"]["bootstrap"]
    table = Table(
        title=f"Δ vs {regs[0]} (mm): MPJPE / PA-MPJPE",
        caption=f"[{100 * b['level']:g}% paired bootstrap interval over sequences, "
        f"{b['resamples']} resamples, seed {b['seed']}]",
    )
    table.add_column("method")
    for reg in regs[1:]:
        table.add_column(reg, justify="right")
    table.add_column("sequences", justify="right")
    for m in methods:
        cells = []
        for reg in regs[1:]:
            d = difference(doc, m, reg, regs[0])
            cells.append(
                "n/a"
                if d is None
                else f"{format_difference(d['mpjpe_mm'])}\n{format_difference(d['pa_mpjpe_mm'])}"
            )
        seqs = {r.get("sequences") for r in doc["results"] if r["method"] == m}
        table.add_row(m, *cells, str(seqs.pop()), end_section=True)
    Console(width=max(100, 22 + 22 * len(regs))).print(table)


def _lookup(doc: Mapping) -> dict[tuple[str, str], Mapping]:
    return {(r["method"], r["regressor"]): r for r in doc["results"]}


def _wide(doc: Mapping) -> None:
    """Rows methods, columns regressors, cells 'MPJPE / PA-MPJPE' (mm)."""
    methods, regs = methods_and_regressors(doc)
    lookup = _lookup(doc)
    p = doc["protocol"]
    table = Table(
        title=f"Table I: MPJPE / PA-MPJPE (mm), {len(p['joints'])} joints, "
        f"subjects {','.join(p['subjects'])}"
    )
    table.add_column("method")
    for reg in regs:
        table.add_column(reg, justify="right")
    table.add_column("frames", justify="right")
    for m in methods:
        table.add_row(
            m,
            *[
                f"{lookup[(m, r)]['mpjpe_mm']:.1f} / {lookup[(m, r)]['pa_mpjpe_mm']:.1f}"
                for r in regs
            ],
            str(lookup[(m, regs[0])]["frames"]),
        )
    Console(width=max(100, 22 + 17 * len(regs))).print(table)


def _long(out: Console, doc: Mapping) -> None:
    """One row per method x regressor: MPJPE and PA-MPJPE with the paired difference to the
    first regressor and its bootstrap interval; flags below the table."""
    methods, regs = methods_and_regressors(doc)
    p = doc["protocol"]
    b = p["bootstrap"]
    pct = f"{100 * b['level']:g}%"
    table = Table(
        title=f"Human3.6M {p['protocol'].upper()}, {len(p['joints'])} joints, mm",
        caption=f"Δ = regressor - {regs[0]} [{pct} paired bootstrap interval over "
        f"sequences, {b['resamples']} resamples, seed {b['seed']}]",
    )
    for name in ("method", "regressor"):
        table.add_column(name)
    for name in (
        "MPJPE",
        f"Δ vs {regs[0]} [{pct}]",
        "PA-MPJPE",
        f"Δ vs {regs[0]} [{pct}]",
        "frames",
        "sequences",
    ):
        table.add_column(name, justify="right")
    info = p["regressors"]
    lookup = _lookup(doc)
    for m in methods:
        for k, reg in enumerate(regs):
            r = lookup[(m, reg)]
            mark = (" (!)" if info[reg].get("warnings") else "") + (
                " (†)" if info[reg].get("fitted_on_test_subjects") else ""
            )
            d = difference(doc, m, reg, regs[0])
            deltas = (
                ("baseline", "baseline")
                if d is None
                else (format_difference(d["mpjpe_mm"], 2), format_difference(d["pa_mpjpe_mm"], 2))
            )
            table.add_row(
                m if k == 0 else "",
                reg + mark,
                f"{r['mpjpe_mm']:.2f}",
                deltas[0],
                f"{r['pa_mpjpe_mm']:.2f}",
                deltas[1],
                str(r["frames"]),
                str(r.get("sequences", "")),
                end_section=k == len(regs) - 1,
            )
    out.print(table)
    for reg in regs:
        if info[reg].get("warnings"):
            out.print(f"(!) regressor '{reg}': {'; '.join(info[reg]['warnings'])}", style="yellow")
        if info[reg].get("fitted_on_test_subjects"):
            t = info[reg]["training"]
            out.print(
                f"(†) regressor '{reg}': {FLAG} "
                f"({', '.join(t['evaluated_subjects_in_training'])}; {t['source']}): "
                "its numbers on them are not held-out",
                style="yellow",
            )


def _breakdown(out: Console, method: str, what: str, regs: list, values: dict) -> None:
    """One table per method: rows ``what`` (joints or actions), columns regressors, cells
    'MPJPE / PA-MPJPE'; ``values[reg][row] = (mpjpe_mm, pa_mpjpe_mm)``."""
    t = Table(title=f"{method}: per {what} (MPJPE / PA-MPJPE, mm)")
    t.add_column(what)
    for reg in regs:
        t.add_column(reg, justify="right")
    for row in values[regs[0]]:
        t.add_row(row, *[f"{values[reg][row][0]:.1f} / {values[reg][row][1]:.1f}" for reg in regs])
    out.print(t)
