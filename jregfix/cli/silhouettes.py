"""`jregfix silhouettes`: one Mask R-CNN person mask per Human3.6M frame, in crop coordinates."""

from __future__ import annotations

from pathlib import Path

import typer

from jregfix.cli.app import app, console, join_job
from jregfix.cli.spin import stage_progress
from jregfix.device import DEFAULT_DEVICE, DEVICE_HELP


@app.command("silhouettes")
def silhouettes_command(
    h36m: Path = typer.Option(..., "--h36m", help="SPIN-format Human3.6M npz."),
    images: Path = typer.Option(..., "--images", help="Image root (imgname is relative to it)."),
    out: Path = typer.Option(..., "--out", help="Output silhouettes npz (bit-packed masks)."),
    backend: str = typer.Option("torchvision", "--backend", help="Segmenter: torchvision "
                                "(Mask R-CNN R50-FPN, COCO)."),
    weights: Path = typer.Option(None, "--weights", help="Mask R-CNN state_dict (default: "
                                 "torchvision's cache file in the torch hub directory)."),
    score_threshold: float = typer.Option(0.5, "--score-threshold", min=0.0, max=1.0,
                                          help="Minimum person detection score."),
    min_iou: float = typer.Option(0.1, "--min-iou", min=0.0, max=1.0, help="Minimum IoU of the "
                                  "chosen box with the SPIN crop square."),
    batch_size: int = typer.Option(2, "--batch-size", min=1),
    device: str = typer.Option(DEFAULT_DEVICE, "--device", help=DEVICE_HELP),
    workers: int = typer.Option(None, "--workers", min=1, help="Image decoding threads per "
                                "process (default: this process's share of the CPUs)."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Drop frames whose image "
                                      "is missing or unreadable (counted in the report)."),
    chunk_size: int = typer.Option(256, "--chunk-size", min=1, help="Frames per resumable "
                                   "chunk."),
    save_figures: Path = typer.Option(None, "--save-figures", help="Write a PNG of the first "
                                      "crops with their masks overlaid."),
    force: bool = typer.Option(False, "--force", help="Recompute even if the output is current."),
) -> None:
    """Segment the person in every frame; resumes interrupted runs chunk by chunk.

    Under torchrun the chunks are dealt out over the processes and rank 0 merges them.
    """
    from jregfix.stages.silhouettes import SilhouetteConfig, run_silhouettes

    config = SilhouetteConfig(backend=backend, weights=str(weights) if weights else None,
                              score_threshold=score_threshold, min_iou=min_iou,
                              batch_size=batch_size, device=device, skip_missing=skip_missing,
                              chunk_size=chunk_size, workers=workers, force=force)
    ranks = join_job(device)
    ranks.device(device)  # a bad --device fails here, before the progress bar shows
    with stage_progress(ranks.label("silhouettes")) as progress:
        result = run_silhouettes(h36m, images, out, config, progress, figure=save_figures,
                                 ranks=ranks)
    if result.up_to_date:
        console.print(f"{out} is up to date ({result.frames} frames); --force recomputes")
        return
    resumed = f", {result.resumed_chunks} chunk(s) resumed" if result.resumed_chunks else ""
    console.print(f"wrote {out}: {result.frames} frames, person found in {result.found}"
                  f"{resumed}")
    if result.skipped:
        console.print(f"[yellow]skipped {len(result.skipped)} frame(s)[/] with missing or "
                      f"unreadable images, e.g. {', '.join(result.skipped[:3])}")
    if result.figure:
        console.print(f"figure: {result.figure}")
