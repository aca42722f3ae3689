"""`jregfix spin`: SPIN's HMR on Human3.6M frames -> params npz + manifest."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import typer

from jregfix.cli.app import app, console, join_job
from jregfix.device import DEFAULT_DEVICE, DEVICE_HELP


@contextlib.contextmanager
def stage_progress(description: str) -> Iterator[Callable[[int, int], None]]:
    """A rich bar on stderr driven by the stages' ``progress(done, total)`` callback."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@app.command("spin")
def spin_command(
    h36m: Path = typer.Option(..., "--h36m", help="SPIN-format Human3.6M npz (imgname, center, "
                              "scale[, S])."),
    images: Path = typer.Option(..., "--images", help="Image root: imgname (images/...) is "
                                "relative to it; the images/ directory itself also works."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="SPIN's model_checkpoint.pt (or "
                                    "VIBE/MEVA's spin_model_checkpoint.pth.tar)."),
    mean_params: Path = typer.Option(None, "--mean-params", help="SPIN's smpl_mean_params.npz "
                                     "(needed when the checkpoint lacks init_* buffers)."),
    out: Path = typer.Option(..., "--out", help="Output npz (pose, betas, camera, cam_t, ...)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    device: str = typer.Option(DEFAULT_DEVICE, "--device", help=DEVICE_HELP),
    workers: int = typer.Option(None, "--workers", min=1, help="Image decoding threads per "
                                "process (default: this process's share of the CPUs)."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Drop frames whose image "
                                      "is missing or unreadable (counted in the report)."),
    chunk_size: int = typer.Option(2048, "--chunk-size", min=1,
                                   help="Frames per resumable chunk."),
    force: bool = typer.Option(False, "--force", help="Recompute even if the output is current."),
) -> None:
    """Run SPIN's regressor on every frame; resumes interrupted runs chunk by chunk.

    Under torchrun (`torchrun --nproc-per-node N -m jregfix spin ...`) the chunks are dealt
    out over the N processes (one GPU each) and rank 0 merges them.
    """
    from jregfix.stages.spin import SpinConfig, run_spin

    ranks = join_job(device)
    ranks.device(device)  # a bad --device fails here, before the progress bar shows
    config = SpinConfig(batch_size=batch_size, device=device, skip_missing=skip_missing,
                        chunk_size=chunk_size, workers=workers, force=force)
    with stage_progress(ranks.label("spin")) as progress:
        result = run_spin(h36m, images, checkpoint, mean_params, out, config, progress, ranks)
    if result.up_to_date:
        console.print(f"{out} is up to date ({result.frames} frames); --force recomputes")
        return
    resumed = f", {result.resumed_chunks} chunk(s) resumed" if result.resumed_chunks else ""
    console.print(f"wrote {out}: {result.frames} frames{resumed}")
    if result.filled_keys:
        console.print(f"checkpoint lacked {len(result.filled_keys)} entries, filled: "
                      f"{sorted(set(result.filled_keys.values()))}")
    if result.skipped:
        console.print(f"[yellow]skipped {len(result.skipped)} frame(s)[/] with missing or "
                      f"unreadable images, e.g. {', '.join(result.skipped[:3])}")
