"""`jregfix refine`: pseudo ground truth by Adam with 3D joint, 2D keypoint, silhouette and
adversarial terms; `refine --merge PARTS... --out X` joins the outputs of `--shard` runs."""

from __future__ import annotations

from pathlib import Path

import typer

from jregfix.cli.app import app, console, join_job
from jregfix.cli.options import (
    device_option,
    gt_option,
    out_option,
    parse_shard,
    progress_bar,
    save_figures_option,
    seed_option,
    shard_option,
)
from jregfix.errors import JregfixError
from jregfix.methods.refinement import PRESETS, TERMS, RefineConfig
from jregfix.stages.result import StageResult

DEFAULTS = RefineConfig()
HEDLIN = PRESETS["hedlin-code"](DEFAULTS.image_size)


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
    parts: list[Path] = typer.Argument(
        None, help="With --merge: the outputs of `refine --shard i/n` (all n, once each)."
    ),
    init: Path = typer.Option(
        None,
        "--init",
        help="Initial params npz (the output of `spin`, "
        "or any npz with pose/rotmat, betas and cam_t or camera).",
    ),
    gt: Path = gt_option(
        required=False,
        help="SPIN-format Human3.6M npz: 3D GT joints 'S' "
        "(and 2D keypoints 'part', used when present).",
    ),
    silhouettes: Path = typer.Option(None, "--silhouettes", help="Masks npz (`silhouettes`)."),
    smpl: Path = typer.Option(None, "--smpl", help="SMPL model file (.pkl/.npz)."),
    joint_regressor: Path = typer.Option(
        None,
        "--joint-regressor",
        help="J_spin: a 17xV regressor fitted to SPIN's meshes (`fit-regressor`).",
    ),
    out: Path = out_option("Refined params npz (+ .manifest.json); with --merge, the joined file."),
    merge: bool = typer.Option(
        False,
        "--merge",
        help="Join the outputs of a `refine --shard "
        "i/n` run (PARTS) into --out; the other inputs are not needed.",
    ),
    preset: str = typer.Option(
        None,
        "--preset",
        help="hedlin-code: the authors' released "
        f"settings (fixed weights, batch {HEDLIN['batch_size']}, "
        f"{HEDLIN['camera_warmup']} camera warm-up steps, their blur); "
        "options given explicitly override it. Default: the paper's "
        "description (auto-weighted terms). See docs/deviations.md.",
    ),
    iters: int = typer.Option(
        DEFAULTS.iters, "--iters", help="Adam iterations per batch (paper: 100)."
    ),
    lr: float = typer.Option(DEFAULTS.lr, "--lr", help="Adam learning rate (paper: 1e-2)."),
    batch_size: int = typer.Option(
        None,
        "--batch-size",
        help="Frames optimised together; the "
        "discriminators update once per batch; default "
        f"{DEFAULTS.batch_size}, hedlin-code "
        f"{HEDLIN['batch_size']}.",
    ),
    camera_warmup: int = typer.Option(
        None,
        "--camera-warmup",
        min=0,
        help="Adam steps on the "
        "camera alone (pose and shape fixed) before the joint "
        "optimisation, on the 2D term (on the silhouette without "
        f"GT 'part'); default {DEFAULTS.camera_warmup}, "
        f"hedlin-code {HEDLIN['camera_warmup']}.",
    ),
    weights: str = typer.Option(
        None,
        "--weights",
        help="e.g. joint=1,j2d=0 with terms "
        f"{', '.join(TERMS)} (0 turns a term off; terms not named are "
        "auto-scaled to 1 at the first iteration).",
    ),
    silhouette_loss: str = typer.Option(
        None,
        "--silhouette-loss",
        help="soft (SoftRas MSE) or "
        "chamfer (cheap boundary distance); default "
        f"{DEFAULTS.silhouette_loss}.",
    ),
    sigma: float = typer.Option(
        None,
        "--sigma",
        help="Soft-silhouette blur in px²; default "
        f"{DEFAULTS.sigma:g}, hedlin-code (the authors' PyTorch3D "
        f"setting) {HEDLIN['sigma']:.4g} x (image size / "
        f"{DEFAULTS.image_size})².",
    ),
    image_size: int = typer.Option(
        DEFAULTS.image_size,
        "--image-size",
        help="Crop side to "
        "refine at (SPIN: 224); the focal length scales with it and "
        "masks stored at another size are box-filtered to it.",
    ),
    seed: int = seed_option("the discriminators"),
    batches_per_disc_step: int = typer.Option(
        None,
        "--batches-per-disc-step",
        min=1,
        help="Batches whose discriminator gradients are "
        "averaged into one step (default: one per "
        "process). A run with N processes equals a "
        "single-process run with this set to N.",
    ),
    shard: str = shard_option("the frames (whole batches)"),
    force: bool = typer.Option(
        False,
        "--force",
        help="Accept a regressor fitted on refined meshes (normally refused to avoid drift).",
    ),
    device: str = device_option(),
    save_figures: int = save_figures_option("mask, initial and refined silhouettes"),
) -> None:
    """Refine SPIN's fits into pseudo ground truth (resumable: re-run the same command).

    Under torchrun (`torchrun --nproc-per-node N -m jregfix refine ...`) the batches are dealt
    out over the N processes and the discriminators stay one model (README: Scaling out). A
    SLURM array of `--shard i/n` runs is joined by `refine --merge PARTS... --out X` (each
    shard had its own discriminators).
    """
    if merge:
        if shard is not None:
            raise JregfixError("--merge and --shard cannot be combined")
        from jregfix.stages.refine import merge_refined

        summary = merge_refined(list(parts or []), out).summary
        console.print(f"merged {summary['shards']} shards, {summary['frames']} frames -> {out}")
        return
    if parts:
        raise JregfixError(f"unexpected arguments {[str(p) for p in parts]} (only with --merge)")
    missing = [
        flag
        for flag, value in (
            ("--init", init),
            ("--gt", gt),
            ("--silhouettes", silhouettes),
            ("--smpl", smpl),
            ("--joint-regressor", joint_regressor),
        )
        if value is None
    ]
    if missing:
        raise JregfixError(
            f"refine needs {', '.join(missing)} (or --merge PARTS... --out X to join shard outputs)"
        )
    from jregfix.body.smpl import SMPLBody
    from jregfix.stages.refine import refine

    part = parse_shard(shard)
    ranks = join_job(device)
    dev = ranks.device(device)
    config = build_config(
        preset,
        weights,
        image_size,
        iters=iters,
        lr=lr,
        batch_size=batch_size,
        camera_warmup=camera_warmup,
        silhouette_loss=silhouette_loss,
        sigma=sigma,
        seed=seed,
        batches_per_disc_step=batches_per_disc_step,
    )
    if preset is not None and ranks.is_main:
        console.print(
            f"preset {preset}: weights {config.weights}, batch {config.batch_size}, "
            f"camera warm-up {config.camera_warmup}, sigma {config.sigma:.4g} px²"
        )
    body = SMPLBody(smpl).to(dev)
    # with several processes only rank 0 prints; its bar counts its own share of the frames
    with progress_bar(ranks.label("refine")) as progress:
        result = refine(
            init,
            gt,
            silhouettes,
            body,
            joint_regressor,
            out,
            config,
            body_file=smpl,
            shard=part,
            force=force,
            device=dev,
            progress=progress,
            ranks=ranks,
            say=console.print,
        )
    if not ranks.is_main:
        return
    print_summary(result)
    if save_figures > 0:
        from jregfix.stages.figures import silhouette_figure

        figure = out.with_name(out.stem + "_silhouettes.png")
        silhouette_figure(figure, body, init, out, silhouettes, image_size, save_figures)
        console.print(f"figure: {figure}")


def print_summary(result: StageResult) -> None:
    """One line: frames, time, IoU and joint (and 2D) error before -> after, empty masks."""
    s = result.summary
    j2d = ""
    if "j2d_err_after_px" in s:
        j2d = (
            f", 2D error {s['j2d_err_before_px']:.2f} -> {s['j2d_err_after_px']:.2f} px (224 crop)"
        )
    console.print(
        f"refined {s['frames']} frames in {s['seconds']:.0f} s: silhouette IoU "
        f"{s['iou_before']:.3f} -> {s['iou_after']:.3f}, joint error (J_spin) "
        f"{s['joint_err_before_mm']:.1f} -> {s['joint_err_after_mm']:.1f} mm{j2d}; "
        f"{s['empty_masks']} frame(s) without a mask; wrote {result.outputs['refined']}"
    )
