"""`jregfix spin`: SPIN's HMR on Human3.6M frames -> params npz + manifest."""

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
    skip_missing_option,
    workers_option,
)
from jregfix.stages.result import StageResult
from jregfix.stages.spin import SpinConfig

IMAGES_HELP = (
    "Image root: imgname (images/...) is relative to it; the images/ directory itself also works."
)


@app.command("spin")
def spin_command(
    gt: Path = gt_option(help="SPIN-format Human3.6M npz (imgname, center, scale; no 3D needed)."),
    images: Path = typer.Option(..., "--images", help=IMAGES_HELP),
    checkpoint: Path = typer.Option(
        ...,
        "--checkpoint",
        help="SPIN's model_checkpoint.pt (or VIBE/MEVA's spin_model_checkpoint.pth.tar).",
    ),
    mean_params: Path = typer.Option(
        None,
        "--mean-params",
        help="SPIN's smpl_mean_params.npz (needed when the checkpoint lacks init_* buffers).",
    ),
    out: Path = out_option("Output npz (pose, betas, camera, cam_t, ...)."),
    batch_size: int = batch_size_option(SpinConfig().batch_size),
    device: str = device_option(),
    workers: int = workers_option(),
    skip_missing: bool = skip_missing_option(),
    chunk_size: int = chunk_size_option(SpinConfig().chunk_size),
    force: bool = force_option(),
) -> None:
    """Run SPIN's regressor on every frame; resumes interrupted runs chunk by chunk.

    Under torchrun (`torchrun --nproc-per-node N -m jregfix spin ...`) the chunks are dealt
    out over the N processes (one GPU each) and rank 0 merges them.
    """
    from jregfix.stages.spin import run_spin

    ranks = join_job(device)
    ranks.device(device)  # a bad --device fails here, before the progress bar shows
    config = SpinConfig(
        batch_size=batch_size,
        device=device,
        skip_missing=skip_missing,
        chunk_size=chunk_size,
        workers=workers,
        force=force,
    )
    with progress_bar(ranks.label("spin")) as progress:
        result = run_spin(gt, images, checkpoint, mean_params, out, config, progress, ranks)
    print_frames_result(result, out)
    filled = result.summary["filled_keys"]
    if filled:
        console.print(
            f"checkpoint lacked {len(filled)} entries, filled: {sorted(set(filled.values()))}"
        )


def print_frames_result(result: StageResult, out: Path, found: int | None = None) -> None:
    """The summary of a per-frame stage (spin, silhouettes): written or current, frames, resumed
    chunks, skipped images."""
    s = result.summary
    if result.skipped:
        console.print(f"{out} is up to date ({s['frames']} frames); --force recomputes")
        return
    resumed = f", {s['resumed_chunks']} chunk(s) resumed" if s["resumed_chunks"] else ""
    person = f", person found in {found}" if found is not None else ""
    console.print(f"wrote {out}: {s['frames']} frames{person}{resumed}")
    if s["skipped_frames"]:
        console.print(
            f"[yellow]skipped {len(s['skipped_frames'])} frame(s)[/] with missing or "
            f"unreadable images, e.g. {', '.join(s['skipped_frames'][:3])}"
        )
