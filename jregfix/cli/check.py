"""`jregfix check`: preflight of the real files before a long job (reads only; writes --json)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from jregfix.cli.app import app, console
from jregfix.cli.options import device_option, gt_option, progress_bar
from jregfix.errors import JregfixError
from jregfix.stages.check import CheckInputs, run_check

_STATUS = {"ok": "[green]ok[/]", "failed": "[red]failed[/]", "skipped": "[yellow]skipped[/]"}


@app.command("check")
def check_command(
    smpl: list[Path] = typer.Option(
        [],
        "--smpl",
        help="SMPL model (.pkl as released, or smplx .npz); repeat for neutral/female/male.",
    ),
    gt: list[Path] = gt_option(
        required=False,
        help="SPIN-format Human3.6M npz; repeatable. The first one is used for the one-frame runs.",
    ),
    images: Path = typer.Option(
        None,
        "--images",
        help="Image root the GT's imgname is relative to; every GT image is looked for.",
    ),
    checkpoint: list[Path] = typer.Option(
        [],
        "--checkpoint",
        help="SPIN's model_checkpoint.pt or VIBE/MEVA's spin_model_checkpoint.pth.tar.",
    ),
    mean_params: Path = typer.Option(None, "--mean-params", help="SPIN's smpl_mean_params.npz."),
    weights: list[Path] = typer.Option(
        [], "--weights", help="Mask R-CNN weights (torchvision's maskrcnn_resnet50_fpn_coco-*.pth)."
    ),
    predictions: list[str] = typer.Option(
        [],
        "--predictions",
        help="[METHOD=]PATH: a SPIN "
        "npz, a VIBE/MEVA output pickle or a folder of them; "
        "the method is inferred from the name if omitted.",
    ),
    regressor: list[str] = typer.Option(
        [], "--regressor", help="[NAME=]PATH of a 17xV joint regressor (.npy/.npz/.pt)."
    ),
    frame_ids: str = typer.Option(
        "video",
        "--frame-ids",
        help="vibe/meva: 'video' (the demos' "
        "0-based video frames) or 'rows' (GT row numbers), as in "
        "evaluate.",
    ),
    subject: str = typer.Option(
        None,
        "--subject",
        help="vibe/meva: subject of video folders "
        "without an S9/S11 folder above them, as in evaluate.",
    ),
    json_out: Path = typer.Option(None, "--json", help="Also write the findings here."),
    device: str = device_option(),
) -> None:
    """Check every given file (format, shapes, sha256, known release, problems) and push one
    frame through each stage they allow. Exit code 0 only if everything is usable."""
    inputs = CheckInputs(
        smpl=smpl,
        gt=gt or [],
        images=images,
        checkpoint=checkpoint,
        mean_params=mean_params,
        weights=weights,
        predictions=[_method_path(p) for p in predictions],
        regressors=[_named_path(r) for r in regressor],
        frame_ids=frame_ids,
        subject=subject,
    )
    with progress_bar("checking") as progress:
        result = run_check(inputs, device=device, json_out=json_out, progress=progress)
    print_report(result.summary)
    if json_out is not None:
        console.print(f"findings written to {json_out}")
    if not result.summary["ok"]:
        raise typer.Exit(1)


def _named_path(value: str) -> tuple[str, Path]:
    name, sep, path = value.partition("=")
    if not sep:
        return Path(value).stem, Path(value)
    if not name or not path:
        raise JregfixError(f"--regressor expects [NAME=]PATH, got {value!r}")
    return name, Path(path)


def _method_path(value: str) -> tuple[str | None, Path]:
    from jregfix.stages.evaluate import METHODS

    method, sep, path = value.partition("=")
    if sep and method in METHODS:
        return method, Path(path)
    return None, Path(value)


def print_report(doc: dict) -> None:
    """Files table and stages table on stdout; each problem as one line on stderr. ``doc`` is
    the check's summary (the ``--json`` document)."""
    out = Console()
    files = Table(title="files")
    for column in ("file", "format", "shapes", "sha256", "known release", "status"):
        files.add_column(column)
    for f in doc["files"]:
        shapes = "\n".join(f"{k} {'x'.join(map(str, v))}" for k, v in list(f["shapes"].items())[:8])
        status = (
            "[green]usable[/]" if not f["problems"] else f"[red]{len(f['problems'])} problem(s)[/]"
        )
        if f["notes"]:
            status += f"\n[yellow]{len(f['notes'])} note(s)[/]"
        files.add_row(
            f"{f['role']}\n{Path(f['path']).name}",
            f["format"],
            shapes,
            f["sha256"][:12] if f["sha256"] else "-",
            f["official"] or "-",
            status,
        )
    out.print(files)
    if doc["stages"]:
        stages = Table(title="one frame through each stage")
        for column in ("stage", "inputs", "result", "detail"):
            stages.add_column(column)
        for s in doc["stages"]:
            stages.add_row(
                s["stage"],
                "\n".join(Path(p).name for p in s["inputs"]),
                _STATUS[s["status"]],
                s["detail"],
            )
        out.print(stages)
    for f in doc["files"]:
        for note in f["notes"]:
            console.print(
                f"note: {f['path']}: {note}", highlight=False, soft_wrap=True, markup=False
            )
    for line in doc["problems"]:
        console.print(f"problem: {line}", highlight=False, soft_wrap=True, markup=False)
    verdict = (
        "[green]all usable[/]"
        if doc["ok"]
        else f"[red]{len(doc['problems'])} problem(s): fix them before a long run[/]"
    )
    console.print(verdict)
