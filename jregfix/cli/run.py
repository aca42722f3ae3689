"""`jregfix run CONFIG`: every stage in order into a run directory, skipping current ones."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from jregfix.cli.app import app, console
from jregfix.device import DEVICE_HELP


def run_with_progress(config, body=None, device: str | None = None) -> dict:
    """:func:`jregfix.stages.run.run` with stage messages and a refine progress bar;
    ``device`` (when given) replaces the config's."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from jregfix.stages.run import load_config, run

    cfg = load_config(config)
    if device is not None:
        cfg["device"] = device
    total = None
    from jregfix.io.h36m import load_h36m

    total = len(load_h36m(cfg["gt"]["train"]))
    console.print("resolved config:")
    console.print_json(json.dumps(cfg))
    columns = [TextColumn("refine"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TextColumn("{task.fields[live]}")]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("refine", total=total, live="")

        def progress(done, live):
            text = " ".join(f"{k}={v:.3g}" if k != "iter" else f"it={v}" for k, v in live.items())
            bar.update(task, completed=done, live=text)

        return run(cfg, say=lambda m: console.print(m, highlight=False),
                   refine_progress=progress, body=body)


def print_result(result: dict) -> None:
    from jregfix.stages.run import relabel

    for name, status in result["stages"].items():
        console.print(f"  {name}: {status}")
    ref = result["summaries"].get("refine", {})
    if ref:
        console.print(f"refine: silhouette IoU {ref['iou_before']:.3f} -> {ref['iou_after']:.3f}, "
                      f"joint error (J_spin) {ref['joint_err_before_mm']:.1f} -> "
                      f"{ref['joint_err_after_mm']:.1f} mm over {ref['frames']} frames")
    print_table_i(relabel(result["evaluate"], result["labels"]))
    console.print(f"run directory: {result['run_dir']}")


@app.command("run")
def run_command(
    config: Path = typer.Argument(..., help="Run config (.json or .toml): gt, init, "
                                  "silhouettes, fit_regressor, refine, evaluate sections."),
    device: str = typer.Option(None, "--device", help="Every stage's device, instead of the "
                               "config's `device` (default auto): " + DEVICE_HELP),
) -> None:
    """Run the pipeline (init -> masks -> J_spin -> refine -> J_opt -> evaluate -> figures)."""
    print_result(run_with_progress(config, device=device))


def print_table_i(doc: dict) -> None:
    """Table I, compact: rows methods, columns regressors, cells 'MPJPE / PA-MPJPE' (mm)."""
    from rich.console import Console
    from rich.table import Table

    results = doc["results"]
    methods = list(dict.fromkeys(r["method"] for r in results))
    regs = list(dict.fromkeys(r["regressor"] for r in results))
    lookup = {(r["method"], r["regressor"]): r for r in results}
    p = doc["protocol"]
    table = Table(title=f"Table I: MPJPE / PA-MPJPE (mm), {len(p['joints'])} joints, "
                  f"subjects {','.join(p['subjects'])}")
    table.add_column("method")
    for reg in regs:
        table.add_column(reg, justify="right")
    table.add_column("frames", justify="right")
    for m in methods:
        table.add_row(m, *[f"{lookup[(m, r)]['mpjpe_mm']:.1f} / {lookup[(m, r)]['pa_mpjpe_mm']:.1f}"
                           for r in regs], str(lookup[(m, regs[0])]["frames"]))
    Console(width=max(100, 22 + 17 * len(regs))).print(table)
    from jregfix.cli.evaluate import print_differences

    print_differences(doc)
