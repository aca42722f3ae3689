"""`jregfix refine`: pseudo ground truth by Adam with 3D joint, 2D keypoint, silhouette and
adversarial terms."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from jregfix.cli.app import app, console, join_job
from jregfix.device import DEFAULT_DEVICE, DEVICE_HELP
from jregfix.distributed import Ranks
from jregfix.errors import JregfixError
from jregfix.stages.refine import PRESETS, TERMS, RefineConfig, refine


def parse_weights(spec: str | None) -> dict[str, float]:
    """'joint=1,silhouette=0' -> {'joint': 1.0, 'silhouette': 0.0}."""
    if not spec:
        return {}
    out = {}
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in TERMS:
            raise JregfixError(f"--weights expects TERM=VALUE with TERM in {TERMS}, got {item!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise JregfixError(f"--weights: {value!r} is not a number") from None
    return out


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    if not spec:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise JregfixError(f"--shard expects i/n (e.g. 0/4), got {spec!r}") from None
    if not 0 <= i < n:
        raise JregfixError(f"--shard {spec!r}: need 0 <= i < n")
    return i, n


def build_config(preset: str | None, weights: str | None, image_size: int, **given) -> RefineConfig:
    """RefineConfig from a preset (or the defaults), then every option given explicitly (not
    None) on top; ``--weights`` entries replace the preset's weight of the same term only."""
    fields: dict = {"image_size": image_size}
    if preset is not None:
        if preset not in PRESETS:
            raise JregfixError(f"--preset {preset!r} is unknown; presets: {sorted(PRESETS)}")
        fields.update(PRESETS[preset](image_size))
    fields.update({k: v for k, v in given.items() if v is not None})
    fields["weights"] = {**fields.get("weights", {}), **parse_weights(weights)}
    return RefineConfig(**fields)


@app.command("refine")
def refine_command(
    init: Path = typer.Option(..., "--init", help="Initial params npz (the output of `spin`, or "
                              "any npz with pose/rotmat, betas and cam_t or camera)."),
    gt: Path = typer.Option(..., "--gt", help="SPIN-format Human3.6M npz (3D GT joints)."),
    silhouettes: Path = typer.Option(..., "--silhouettes", help="Masks npz (`silhouettes`)."),
    smpl: Path = typer.Option(..., "--smpl", help="SMPL model file (.pkl/.npz)."),
    joint_regressor: Path = typer.Option(..., "--joint-regressor", help="J_spin: a 17xV "
                                         "regressor fitted to SPIN's meshes (`fit-regressor`)."),
    out: Path = typer.Option(..., "--out", help="Refined params npz (+ .manifest.json)."),
    preset: str = typer.Option(None, "--preset", help="hedlin-code: the authors' released "
                               "settings (fixed weights, batch 256, 1000 camera warm-up steps, "
                               "their blur); options given explicitly override it. Default: the "
                               "paper's description (auto-weighted terms). See "
                               "docs/deviations.md."),
    iters: int = typer.Option(100, "--iters", help="Adam iterations per batch (paper: 100)."),
    lr: float = typer.Option(1e-2, "--lr", help="Adam learning rate (paper: 1e-2)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Frames optimised together; the "
                                   "discriminators update once per batch; default 16, "
                                   "hedlin-code 256."),
    camera_warmup: int = typer.Option(None, "--camera-warmup", min=0, help="Adam steps on the "
                                      "camera alone (pose and shape fixed) before the joint "
                                      "optimisation, on the 2D term (on the silhouette without "
                                      "GT 'part'); default 0, hedlin-code 1000."),
    weights: str = typer.Option(None, "--weights", help="e.g. joint=1,j2d=0 with terms "
                                f"{', '.join(TERMS)} (0 turns a term off; terms not named are "
                                "auto-scaled to 1 at the first iteration)."),
    silhouette_loss: str = typer.Option(None, "--silhouette-loss", help="soft (SoftRas MSE) or "
                                        "chamfer (cheap boundary distance); default soft."),
    sigma: float = typer.Option(None, "--sigma", help="Soft-silhouette blur in px² (the "
                                "authors' PyTorch3D setting is 1.25 px² at 224²); default 0.1, "
                                "hedlin-code 1.25 x (image size / 224)²."),
    image_size: int = typer.Option(224, "--image-size", help="Crop side to refine at (SPIN: "
                                   "224); the focal length scales with it and masks stored at "
                                   "another size are box-filtered to it."),
    seed: int = typer.Option(0, "--seed", help="Seeds the discriminators; same seed, same bytes."),
    batches_per_disc_step: int = typer.Option(None, "--batches-per-disc-step", min=1,
                                              help="Batches whose discriminator gradients are "
                                              "averaged into one step (default: one per "
                                              "process). A run with N processes equals a "
                                              "single-process run with this set to N."),
    shard: str = typer.Option(None, "--shard", help="i/n: refine only the i-th of n blocks."),
    force: bool = typer.Option(False, "--force", help="Accept a regressor fitted on refined "
                               "meshes (normally refused to avoid drift)."),
    device: str = typer.Option(DEFAULT_DEVICE, "--device", help=DEVICE_HELP),
    save_figures: int = typer.Option(0, "--save-figures", help="Write a PNG with N frames: mask, "
                                     "initial and refined silhouettes (beside --out)."),
) -> None:
    """Refine SPIN's fits into pseudo ground truth (resumable: re-run the same command).

    Under torchrun (`torchrun --nproc-per-node N -m jregfix refine ...`) the batches are dealt
    out over the N processes and the discriminators stay one model (README: Scaling out).
    """
    from jregfix.body.smpl import SMPLBody

    ranks = join_job(device)
    dev = ranks.device(device)
    config = build_config(preset, weights, image_size, iters=iters, lr=lr,
                          batch_size=batch_size, camera_warmup=camera_warmup,
                          silhouette_loss=silhouette_loss, sigma=sigma, seed=seed,
                          batches_per_disc_step=batches_per_disc_step)
    if preset is not None and ranks.is_main:
        console.print(f"preset {preset}: weights {config.weights}, batch {config.batch_size}, "
                      f"camera warm-up {config.camera_warmup}, sigma {config.sigma:.4g} px²")
    body = SMPLBody(smpl).to(dev)
    run_refine(init, gt, silhouettes, body, joint_regressor, out, config, smpl,
               parse_shard(shard), force, dev, ranks)
    if save_figures > 0 and ranks.is_main:
        from jregfix.stages.figures import silhouette_figure

        figure = out.with_name(out.stem + "_silhouettes.png")
        silhouette_figure(figure, body, init, out, silhouettes, image_size, save_figures)
        console.print(f"figure: {figure}")


def run_refine(init, gt, silhouettes, body, joint_regressor, out, config, body_file, shard,
               force, device, ranks: Ranks | None = None) -> dict:
    """Call :func:`refine` under a progress bar showing live loss terms; print the summary.

    With several processes only rank 0 prints; its bar counts its own share of the frames.
    """
    from jregfix.io.h36m import load_h36m

    ranks = ranks or Ranks()
    total = len(load_h36m(gt)) // (shard[1] if shard else 1) // ranks.world_size
    columns = [TextColumn(ranks.label("refine")), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(),
               TextColumn("{task.fields[live]}")]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("refine", total=total, live="")

        def progress(done, live):
            text = " ".join(f"{k}={v:.3g}" if k != "iter" else f"it={v}" for k, v in live.items())
            bar.update(task, completed=done, live=text)

        summary = refine(init, gt, silhouettes, body, joint_regressor, out, config,
                         body_file=body_file, shard=shard, force=force, device=device,
                         progress=progress, ranks=ranks,
                         say=console.print if ranks.is_main else None)
    j2d = ""
    if "j2d_err_after_px" in summary:
        j2d = (f", 2D error {summary['j2d_err_before_px']:.2f} -> "
               f"{summary['j2d_err_after_px']:.2f} px (224 crop)")
    console.print(
        f"refined {summary['frames']} frames in {summary['seconds']:.0f} s: silhouette IoU "
        f"{summary['iou_before']:.3f} -> {summary['iou_after']:.3f}, joint error (J_spin) "
        f"{summary['joint_err_before_mm']:.1f} -> {summary['joint_err_after_mm']:.1f} mm{j2d}; "
        f"{summary['empty_masks']} frame(s) without a mask; wrote {out}")
    return summary


@app.command("refine-merge")
def refine_merge_command(
    parts: list[Path] = typer.Argument(..., help="The outputs of `refine --shard i/n` (all n)."),
    out: Path = typer.Option(..., "--out", help="Merged refined params npz (+ manifest)."),
) -> None:
    """Join the outputs of a SLURM-array `refine --shard i/n` run into one file aligned with the
    GT rows (each shard had its own discriminators; torchrun runs share one instead)."""
    from jregfix.stages.refine import merge_refined

    summary = merge_refined(parts, out)
    console.print(f"merged {summary['shards']} shards, {summary['frames']} frames -> {out}")
