"""`jregfix evaluate`: the paper's Table I for your own method outputs."""

from __future__ import annotations

from pathlib import Path

import typer

from jregfix.cli.app import app, console, parse_named_paths
from jregfix.cli.options import device_option, gt_option, progress_bar, seed_option
from jregfix.cli.tables import print_table_i
from jregfix.device import resolve_device
from jregfix.errors import JregfixError
from jregfix.stages.evaluate import METHODS, evaluate


@app.command("evaluate")
def evaluate_command(
    method: list[str] = typer.Option(
        ...,
        "--method",
        help=f"One of {', '.join(METHODS)}; "
        "repeat together with --predictions for several methods.",
    ),
    predictions: list[Path] = typer.Option(
        ...,
        "--predictions",
        help="The method's output: SPIN "
        "eval npz, a params npz, or for vibe/meva one "
        "vibe_output.pkl/meva_output.pkl or a folder holding "
        "<video>/vibe_output.pkl (any depth).",
    ),
    gt: Path = gt_option(),
    regressor: list[str] = typer.Option(
        ...,
        "--regressor",
        help="NAME=PATH of a 17xV regressor (.npy/.npz/.pt); repeat to compare several.",
    ),
    smpl: Path = typer.Option(
        None,
        "--smpl",
        help="SMPL model file (.pkl/.npz); needed unless every prediction ships vertices.",
    ),
    protocol: str = typer.Option("p1", "--protocol", help="p1: 4 cameras; p2: camera 60457274."),
    joints: int = typer.Option(14, "--joints", help="14 (SPIN/HMR) or 17 (Hedlin et al.)."),
    per_action: bool = typer.Option(
        False, "--per-action", help="Also break errors down by action."
    ),
    per_joint: bool = typer.Option(
        False, "--per-joint", help="Also print the per-joint errors (always in the JSON and CSV)."
    ),
    allow_missing: bool = typer.Option(
        False,
        "--allow-missing",
        help="Score only the frames a prediction covers (the "
        "number of missing GT rows is recorded).",
    ),
    frame_ids: str = typer.Option(
        "video",
        "--frame-ids",
        help="vibe/meva: 'video' (the demos' "
        "0-based video frames; frame f is scored on GT image number f "
        "of the video named by its folder) or 'rows' (frame_ids are "
        "GT row numbers).",
    ),
    subject: str = typer.Option(
        None,
        "--subject",
        help="vibe/meva: Human3.6M subject (e.g. S9) "
        "of video folders whose path has no S9/S11 folder above them.",
    ),
    json_out: Path = typer.Option(None, "--json", help="Write the results document here."),
    csv_out: Path = typer.Option(
        None,
        "--csv",
        help="Write the results as CSV here (Table I "
        "rows with intervals, plus per-joint and per-action rows).",
    ),
    report: Path = typer.Option(
        None,
        "--report",
        help="Write a self-contained report page, "
        "DIR/index.html (Table I with intervals, per-joint and "
        "per-action charts, joints on the mesh).",
    ),
    bootstrap: int = typer.Option(
        2000,
        "--bootstrap",
        help="Resamples of the paired bootstrap "
        "over sequences (95% intervals of regressor differences).",
    ),
    seed: int = seed_option("the bootstrap draws"),
    device: str = device_option(),
    batch_size: int = typer.Option(256, "--batch-size", help="Frames per body-model batch."),
) -> None:
    """MPJPE / PA-MPJPE (mm) of each method under each regressor, SPIN's protocol recorded."""
    if len(method) != len(predictions):
        raise JregfixError("give one --method per --predictions file")
    if batch_size < 1:
        raise JregfixError(f"--batch-size must be at least 1, got {batch_size}")
    where = resolve_device(device)
    body = None
    if smpl is not None:
        from jregfix.body.smpl import SMPLBody

        body = SMPLBody(smpl).to(where)
    regs = parse_named_paths(regressor, "--regressor")
    with progress_bar("evaluating") as progress:
        result = evaluate(
            list(zip(method, predictions, strict=True)),
            gt,
            regs,
            body=body,
            protocol=protocol,
            joints=joints,
            per_action=per_action,
            allow_missing=allow_missing,
            frame_ids=frame_ids,
            subject=subject,
            chunk_size=batch_size,
            device=str(where),
            json_out=json_out,
            progress=progress,
            bootstrap=bootstrap,
            seed=seed,
            csv_out=csv_out,
            report_dir=report,
        )
    print_table_i(result.summary, "long", per_action, per_joint)
    for what, key in (("results", "json"), ("CSV", "csv"), ("report", "report")):
        if key in result.outputs:
            console.print(f"{what} written to {result.outputs[key]}")
