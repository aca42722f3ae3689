"""`jregfix evaluate`: the paper's Table I for your own method outputs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from jregfix.cli.app import app, console, parse_named_paths, progress_bar
from jregfix.errors import JregfixError
from jregfix.stages.evaluate import METHODS, evaluate


@app.command("evaluate")
def evaluate_command(
    method: list[str] = typer.Option(..., "--method", help=f"One of {', '.join(METHODS)}; "
                                     "repeat together with --predictions for several methods."),
    predictions: list[Path] = typer.Option(..., "--predictions", help="The method's output: SPIN "
                                           "eval npz, VIBE/MEVA output pickle, or a params npz."),
    gt: Path = typer.Option(..., "--gt", help="SPIN-format Human3.6M npz (imgname, S, ...)."),
    regressor: list[str] = typer.Option(..., "--regressor", help="NAME=PATH of a 17xV regressor "
                                        "(.npy/.npz/.pt); repeat to compare several."),
    smpl: Path = typer.Option(None, "--smpl", help="SMPL model file (.pkl/.npz); needed unless "
                              "every prediction ships vertices."),
    protocol: str = typer.Option("p1", "--protocol", help="p1: 4 cameras; p2: camera 60457274."),
    joints: int = typer.Option(14, "--joints", help="14 (SPIN/HMR) or 17 (Hedlin et al.)."),
    per_action: bool = typer.Option(False, "--per-action",
                                    help="Also break errors down by action."),
    allow_missing: bool = typer.Option(False, "--allow-missing",
                                       help="Score only the frames a prediction covers."),
    json_out: Path = typer.Option(None, "--json", help="Write the results document here."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    batch_size: int = typer.Option(256, "--batch-size", help="Frames per body-model batch."),
) -> None:
    """MPJPE / PA-MPJPE (mm) of each method under each regressor, SPIN's protocol recorded."""
    if len(method) != len(predictions):
        raise JregfixError("give one --method per --predictions file")
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
                       allow_missing=allow_missing, chunk_size=batch_size, device=device,
                       json_out=json_out, progress=advance)
    print_table(doc, per_action)
    if json_out is not None:
        console.print(f"results written to {json_out}")


def print_table(doc: dict, per_action: bool = False) -> None:
    """Rows: methods; columns: regressor x {MPJPE, PA-MPJPE} (Table I layout)."""
    from rich.console import Console

    out = Console()
    results = doc["results"]
    methods = list(dict.fromkeys(r["method"] for r in results))
    regs = list(dict.fromkeys(r["regressor"] for r in results))
    p = doc["protocol"]
    table = Table(title=f"Human3.6M {p['protocol'].upper()}, {len(p['joints'])} joints, mm")
    table.add_column("method")
    for reg in regs:
        table.add_column(f"{reg}\nMPJPE", justify="right")
        table.add_column(f"{reg}\nPA-MPJPE", justify="right")
    table.add_column("frames", justify="right")
    lookup = {(r["method"], r["regressor"]): r for r in results}
    for m in methods:
        cells = []
        for reg in regs:
            r = lookup[(m, reg)]
            cells += [f"{r['mpjpe_mm']:.2f}", f"{r['pa_mpjpe_mm']:.2f}"]
        table.add_row(m, *cells, str(lookup[(m, regs[0])]["frames"]))
    out.print(table)
    if per_action:
        for m in methods:
            t = Table(title=f"{m}: per action (MPJPE / PA-MPJPE, mm)")
            t.add_column("action")
            for reg in regs:
                t.add_column(reg, justify="right")
            actions = lookup[(m, regs[0])].get("per_action", {})
            for a in actions:
                t.add_row(a, *[f"{lookup[(m, reg)]['per_action'][a]['mpjpe_mm']:.1f} / "
                               f"{lookup[(m, reg)]['per_action'][a]['pa_mpjpe_mm']:.1f}"
                               for reg in regs])
            out.print(t)
