"""`jregfix evaluate`: the paper's Table I for your own method outputs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from jregfix.cli.app import app, console, parse_named_paths, progress_bar
from jregfix.device import DEFAULT_DEVICE, DEVICE_HELP, resolve_device
from jregfix.errors import JregfixError
from jregfix.stages.evaluate import METHODS, evaluate
from jregfix.stages.report import FLAG, difference, format_difference, methods_and_regressors


@app.command("evaluate")
def evaluate_command(
    method: list[str] = typer.Option(..., "--method", help=f"One of {', '.join(METHODS)}; "
                                     "repeat together with --predictions for several methods."),
    predictions: list[Path] = typer.Option(..., "--predictions", help="The method's output: SPIN "
                                           "eval npz, a params npz, or for vibe/meva one "
                                           "vibe_output.pkl/meva_output.pkl or a folder holding "
                                           "<video>/vibe_output.pkl (any depth)."),
    gt: Path = typer.Option(..., "--gt", help="SPIN-format Human3.6M npz (imgname, S, ...)."),
    regressor: list[str] = typer.Option(..., "--regressor", help="NAME=PATH of a 17xV regressor "
                                        "(.npy/.npz/.pt); repeat to compare several."),
    smpl: Path = typer.Option(None, "--smpl", help="SMPL model file (.pkl/.npz); needed unless "
                              "every prediction ships vertices."),
    protocol: str = typer.Option("p1", "--protocol", help="p1: 4 cameras; p2: camera 60457274."),
    joints: int = typer.Option(14, "--joints", help="14 (SPIN/HMR) or 17 (Hedlin et al.)."),
    per_action: bool = typer.Option(False, "--per-action",
                                    help="Also break errors down by action."),
    per_joint: bool = typer.Option(False, "--per-joint", help="Also print the per-joint "
                                   "errors (always in the JSON and CSV)."),
    allow_missing: bool = typer.Option(False, "--allow-missing",
                                       help="Score only the frames a prediction covers (the "
                                       "number of missing GT rows is recorded)."),
    frame_ids: str = typer.Option("video", "--frame-ids", help="vibe/meva: 'video' (the demos' "
                                  "0-based video frames; frame f is scored on GT image number f "
                                  "of the video named by its folder) or 'rows' (frame_ids are "
                                  "GT row numbers)."),
    subject: str = typer.Option(None, "--subject", help="vibe/meva: Human3.6M subject (e.g. S9) "
                                "of video folders whose path has no S9/S11 folder above them."),
    json_out: Path = typer.Option(None, "--json", help="Write the results document here."),
    csv_out: Path = typer.Option(None, "--csv", help="Write the results as CSV here (Table I "
                                 "rows with intervals, plus per-joint and per-action rows)."),
    report: Path = typer.Option(None, "--report", help="Write a self-contained report page, "
                                "DIR/index.html (Table I with intervals, per-joint and "
                                "per-action charts, joints on the mesh)."),
    bootstrap: int = typer.Option(2000, "--bootstrap", help="Resamples of the paired bootstrap "
                                  "over sequences (95% intervals of regressor differences)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap draws: same seed, same "
                             "intervals."),
    device: str = typer.Option(DEFAULT_DEVICE, "--device", help=DEVICE_HELP),
    batch_size: int = typer.Option(256, "--batch-size", help="Frames per body-model batch."),
) -> None:
    """MPJPE / PA-MPJPE (mm) of each method under each regressor, SPIN's protocol recorded."""
    if len(method) != len(predictions):
        raise JregfixError("give one --method per --predictions file")
    if batch_size < 1:
        raise JregfixError(f"--batch-size must be at least 1, got {batch_size}")
    device = resolve_device(device)
    body = None
    if smpl is not None:
        from jregfix.body.smpl import SMPLBody

        body = SMPLBody(smpl).to(device)
    regs = parse_named_paths(regressor, "--regressor")
    total = 0
    if body is not None:
        from jregfix.io.h36m import load_h36m, protocol_mask

        total = int(protocol_mask(load_h36m(gt), protocol).sum()) * len(method)
    with progress_bar("evaluating", total or None) as advance:
        doc = evaluate(list(zip(method, predictions, strict=True)), gt, regs, body=body,
                       protocol=protocol, joints=joints, per_action=per_action,
                       allow_missing=allow_missing, frame_ids=frame_ids, subject=subject,
                       chunk_size=batch_size, device=device,
                       json_out=json_out, progress=advance, bootstrap=bootstrap, seed=seed,
                       csv_out=csv_out, report_dir=report)
    print_table(doc, per_action, per_joint)
    for what, path in (("results", json_out), ("CSV", csv_out),
                       ("report", None if report is None else report / "index.html")):
        if path is not None:
            console.print(f"{what} written to {path}")


def print_table(doc: dict, per_action: bool = False, per_joint: bool = False) -> None:
    """Table I, one row per method x regressor: MPJPE and PA-MPJPE with the paired difference
    to the first regressor and its bootstrap interval; flags below the table."""
    from rich.console import Console

    out = Console(width=max(120, Console().width))
    results = doc["results"]
    methods, regs = methods_and_regressors(doc)
    p = doc["protocol"]
    b = p["bootstrap"]
    pct = f"{100 * b['level']:g}%"
    table = Table(title=f"Human3.6M {p['protocol'].upper()}, {len(p['joints'])} joints, mm",
                  caption=f"Δ = regressor - {regs[0]} [{pct} paired bootstrap interval over "
                  f"sequences, {b['resamples']} resamples, seed {b['seed']}]")
    for name, justify in (("method", "left"), ("regressor", "left"), ("MPJPE", "right"),
                          (f"Δ vs {regs[0]} [{pct}]", "right"), ("PA-MPJPE", "right"),
                          (f"Δ vs {regs[0]} [{pct}]", "right"), ("frames", "right"),
                          ("sequences", "right")):
        table.add_column(name, justify=justify)
    info = p["regressors"]
    lookup = {(r["method"], r["regressor"]): r for r in results}
    for m in methods:
        for k, reg in enumerate(regs):
            r = lookup[(m, reg)]
            mark = (" (!)" if info[reg].get("warnings") else "") + \
                (" (†)" if info[reg].get("fitted_on_test_subjects") else "")
            d = difference(doc, m, reg, regs[0])
            deltas = ("baseline", "baseline") if d is None else (
                format_difference(d["mpjpe_mm"], 2), format_difference(d["pa_mpjpe_mm"], 2))
            table.add_row(m if k == 0 else "", reg + mark, f"{r['mpjpe_mm']:.2f}", deltas[0],
                          f"{r['pa_mpjpe_mm']:.2f}", deltas[1], str(r["frames"]),
                          str(r.get("sequences", "")), end_section=k == len(regs) - 1)
    out.print(table)
    for reg in regs:
        if info[reg].get("warnings"):
            out.print(f"(!) regressor '{reg}': {'; '.join(info[reg]['warnings'])}",
                      style="yellow")
        if info[reg].get("fitted_on_test_subjects"):
            t = info[reg]["training"]
            out.print(f"(†) regressor '{reg}': {FLAG} "
                      f"({', '.join(t['evaluated_subjects_in_training'])}; {t['source']}): "
                      "its numbers on them are not held-out", style="yellow")
    if per_joint:
        for m in methods:
            _breakdown(out, m, "joint", regs, {reg: {
                j: (lookup[(m, reg)]["per_joint_mm"][j], lookup[(m, reg)]["per_joint_pa_mm"][j])
                for j in lookup[(m, reg)]["per_joint_mm"]} for reg in regs})
    if per_action:
        for m in methods:
            _breakdown(out, m, "action", regs, {reg: {
                a: (v["mpjpe_mm"], v["pa_mpjpe_mm"])
                for a, v in lookup[(m, reg)].get("per_action", {}).items()} for reg in regs})


def _breakdown(out, method: str, what: str, regs: list, values: dict) -> None:
    """One table per method: rows ``what`` (joints or actions), columns regressors, cells
    'MPJPE / PA-MPJPE'; ``values[reg][row] = (mpjpe_mm, pa_mpjpe_mm)``."""
    t = Table(title=f"{method}: per {what} (MPJPE / PA-MPJPE, mm)")
    t.add_column(what)
    for reg in regs:
        t.add_column(reg, justify="right")
    for row in values[regs[0]]:
        t.add_row(row, *[f"{values[reg][row][0]:.1f} / {values[reg][row][1]:.1f}"
                         for reg in regs])
    out.print(t)

def print_differences(doc: dict, console=None) -> None:
    """Compact companion of a methods x regressors Table I (the `run`/`demo` summary): per
    method, each regressor minus the first, MPJPE and PA-MPJPE, with intervals."""
    from rich.console import Console

    if not doc.get("differences"):
        return
    methods, regs = methods_and_regressors(doc)
    b = doc["protocol"]["bootstrap"]
    table = Table(title=f"Δ vs {regs[0]} (mm): MPJPE / PA-MPJPE",
                  caption=f"[{100 * b['level']:g}% paired bootstrap interval over sequences, "
                  f"{b['resamples']} resamples, seed {b['seed']}]")
    table.add_column("method")
    for reg in regs[1:]:
        table.add_column(reg, justify="right")
    table.add_column("sequences", justify="right")
    for m in methods:
        cells = []
        for reg in regs[1:]:
            d = difference(doc, m, reg, regs[0])
            cells.append("n/a" if d is None else f"{format_difference(d['mpjpe_mm'])}\n"
                         f"{format_difference(d['pa_mpjpe_mm'])}")
        seqs = {r.get("sequences") for r in doc["results"] if r["method"] == m}
        table.add_row(m, *cells, str(seqs.pop()), end_section=True)
    (console or Console(width=max(100, 22 + 22 * len(regs)))).print(table)
