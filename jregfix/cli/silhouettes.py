"""`jregfix silhouettes`: one Mask R-CNN person mask per Human3.6M frame, in crop coordinates."""

from __future__ import annotations

from pathlib import Path

import typer

from jregfix.cli.app import app, console, join_job
from jregfix.cli.options import (
    batch_size_option,
    chunk_size_option,
    device_option,
    force_option,
    gt_option,
    out_option,
    progress_bar,
    save_figures_option,
    skip_missing_option,
    workers_option,
)
from jregfix.cli.spin import IMAGES_HELP, print_frames_result
from jregfix.stages.silhouettes import SilhouetteConfig

DEFAULTS = SilhouetteConfig()


@app.command("silhouettes")
def silhouettes_command(
    gt: Path = gt_option(help="SPIN-format Human3.6M npz (imgname, center, scale; no 3D needed)."),
    images: Path = typer.Option(..., "--images", help=IMAGES_HELP),
    out: Path = out_option("Output silhouettes npz (bit-packed masks)."),
    backend: str = typer.Option(
        DEFAULTS.backend, "--backend", help="Segmenter: torchvision (Mask R-CNN R50-FPN, COCO)."
    ),
    weights: Path = typer.Option(
        None,
        "--weights",
        help="Mask R-CNN state_dict (default: "
        "torchvision's cache file in the torch hub directory).",
    ),
    score_threshold: float = typer.Option(
        DEFAULTS.score_threshold,
        "--score-threshold",
        min=0.0,
        max=1.0,
        help="Minimum person detection score.",
    ),
    min_iou: float = typer.Option(
        DEFAULTS.min_iou,
        "--min-iou",
        min=0.0,
        max=1.0,
        help="Minimum IoU of the chosen box with the SPIN crop square.",
    ),
    batch_size: int = batch_size_option(DEFAULTS.batch_size),
    device: str = device_option(),
    workers: int = workers_option(),
    skip_missing: bool = skip_missing_option(),
    chunk_size: int = chunk_size_option(DEFAULTS.chunk_size),
    save_figures: int = save_figures_option("crops with their masks overlaid"),
    force: bool = force_option(),
) -> None:
    """Segment the person in every frame; resumes interrupted runs chunk by chunk.

    Under torchrun the chunks are dealt out over the processes and rank 0 merges them.
    """
    from jregfix.stages.silhouettes import run_silhouettes

    config = SilhouetteConfig(
        backend=backend,
        weights=str(weights) if weights else None,
        score_threshold=score_threshold,
        min_iou=min_iou,
        batch_size=batch_size,
        device=device,
        skip_missing=skip_missing,
        chunk_size=chunk_size,
        workers=workers,
        force=force,
    )
    figure = out.with_name(out.stem + "_masks.png") if save_figures else None
    ranks = join_job(device)
    ranks.device(device)  # a bad --device fails here, before the progress bar shows
    with progress_bar(ranks.label("silhouettes")) as progress:
        result = run_silhouettes(
            gt,
            images,
            out,
            config,
            progress,
            figure=figure,
            figure_frames=save_figures,
            ranks=ranks,
        )
    print_frames_result(result, out, found=result.summary["found"])
    if "figure" in result.outputs:
        console.print(f"figure: {result.outputs['figure']}")
