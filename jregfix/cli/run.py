"""`jregfix run CONFIG`: every stage in order into a run directory, skipping current ones."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from jregfix.cli.app import app, console
from jregfix.cli.options import progress_bar
from jregfix.cli.tables import print_table_i
from jregfix.device import DEVICE_HELP
from jregfix.stages.result import StageResult


def run_with_progress(config, body=None, device: str | None = None) -> StageResult:
    """:func:`jregfix.stages.run.run` with one line per stage and a progress bar;
    ``device`` (when given) replaces the config's."""
    from jregfix.stages.run import load_config, run

    cfg = load_config(config)
    if device is not None:
        cfg["device"] = device
    console.print("resolved config:")
    console.print_json(json.dumps(cfg))
    with progress_bar("run") as progress:
        return run(
            cfg, say=lambda m: console.print(m, highlight=False), progress=progress, body=body
        )


def print_result(result: StageResult) -> None:
    from jregfix.stages.run import relabel

    s = result.summary
    for name, status in s["stages"].items():
        console.print(f"  {name}: {status}")
    ref = s["summaries"].get("refine", {})
    if ref:
        console.print(
            f"refine: silhouette IoU {ref['iou_before']:.3f} -> {ref['iou_after']:.3f}, "
            f"joint error (J_spin) {ref['joint_err_before_mm']:.1f} -> "
            f"{ref['joint_err_after_mm']:.1f} mm over {ref['frames']} frames"
        )
    print_table_i(relabel(s["evaluate"], s["labels"]), "wide")
    console.print(f"run directory: {s['run_dir']}")


@app.command("run")
def run_command(
    config: Path = typer.Argument(
        ...,
        help="Run config (.json or .toml): gt, init, "
        "silhouettes, fit_regressor, refine, evaluate sections.",
    ),
    device: str = typer.Option(
        None,
        "--device",
        help="Every stage's device, instead of the "
        "config's `device` (default auto): " + DEVICE_HELP,
    ),
) -> None:
    """Run the pipeline (init -> masks -> J_spin -> refine -> J_opt -> evaluate -> figures)."""
    print_result(run_with_progress(config, device=device))
