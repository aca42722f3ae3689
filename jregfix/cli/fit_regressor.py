"""`jregfix fit-regressor`: the paper's NNLS regressor fit, streamed, shardable."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from jregfix.cli.app import app, console, join_job
from jregfix.cli.options import (
    device_option,
    gt_option,
    out_option,
    parse_shard,
    progress_bar,
    shard_option,
)
from jregfix.device import DEVICE_HELP
from jregfix.errors import JregfixError
from jregfix.io.guard import refuse_overwriting_inputs
from jregfix.methods.fitting import ABSOLUTE, ROOT_RELATIVE, FitConfig
from jregfix.stages.fit_regressor import load_inputs, run_fit, run_merge, run_shard
from jregfix.stages.result import StageResult

DEFAULTS = FitConfig()


@app.command("fit-regressor")
def fit_regressor_command(
    parts: list[Path] = typer.Argument(None, help="With --merge: the shard files to add up."),
    params: Path = typer.Option(
        None,
        "--params",
        help="Body parameters npz (pose + betas, or vertices), rows aligned with --gt.",
    ),
    gt: Path = gt_option(required=False, help="SPIN-format Human3.6M npz with 3D joints 'S'."),
    smpl: Path = typer.Option(None, "--smpl", help="SMPL model file (.pkl/.npz) to pose meshes."),
    out: Path = out_option("Regressor (.npy/.npz); with --shard, the partial sums (.npz)."),
    sum_to_one_weight: float = typer.Option(
        DEFAULTS.sum_to_one_weight,
        "--sum-to-one-weight",
        help="lam / frames in lam (1^T w - 1)^2 (m^2 per frame).",
    ),
    exact_sum_to_one: bool = typer.Option(
        DEFAULTS.exact_sum_to_one,
        "--exact-sum-to-one",
        help="Constrain each row to sum to exactly one.",
    ),
    support: str = typer.Option(
        DEFAULTS.support,
        "--support",
        help="Candidate vertices per joint: all, knn:K or radius:R (metres).",
    ),
    subjects: str = typer.Option(
        None,
        "--subjects",
        help="Comma-separated, e.g. S1,S5 (default: the training subjects S1,S5,S6,S7,S8).",
    ),
    allow_test_subjects: bool = typer.Option(
        False, "--allow-test-subjects", help="Permit fitting on S9/S11 (leaks into eval)."
    ),
    absolute: bool = typer.Option(
        False,
        "--absolute",
        help="Meshes and joints share a frame: no per-frame translation is eliminated.",
    ),
    init_regressor: Path = typer.Option(
        None,
        "--init-regressor",
        help="A 17xV regressor whose "
        "joints on the template centre the support (else a "
        "pilot fit does).",
    ),
    json_out: Path = typer.Option(None, "--json", help="Also write the report here."),
    shard: str = shard_option("the frame chunks"),
    merge: bool = typer.Option(
        False,
        "--merge",
        help="Merge the parts written with --shard "
        "(PARTS: every shard of one run, once) and finish the job.",
    ),
    chunk_size: int = typer.Option(
        DEFAULTS.chunk_size, "--chunk-size", help="Frames per accumulation chunk."
    ),
    device: str = device_option("Where --smpl poses the meshes: " + DEVICE_HELP),
    certify: bool = typer.Option(
        None,
        "--certify/--no-certify",
        help="Certify the optimum "
        "over all vertices (default; extra passes over the frames, "
        "so --merge then needs the shards' --params/--gt/--smpl) or "
        "solve on the candidate vertices only.",
    ),
) -> None:
    """Fit a 17xV joint regressor to Human3.6M ground truth by exact NNLS (sum-to-one term)."""
    refuse_overwriting_inputs(
        {
            "PARTS": parts,
            "--params": params,
            "--gt": gt,
            "--smpl": smpl,
            "--init-regressor": init_regressor,
        },
        {"--out": out, "--json": json_out},
    )
    if merge:
        if shard is not None:
            raise JregfixError("--merge and --shard cannot be combined")
        ranks = join_job()
        with progress_bar("certifying (frames streamed)") as progress:
            result = run_merge(
                parts or [],
                out,
                json_out,
                params=params,
                gt=gt,
                body=_smpl_body(smpl, ranks, device),
                certify=certify,
                smpl=smpl,
                progress=progress,
                ranks=ranks,
            )
        if ranks.is_main:
            _print_report(result)
        return
    if parts:
        raise JregfixError(f"unexpected arguments {[str(p) for p in parts]} (only with --merge)")
    if params is None or gt is None:
        raise JregfixError("--params and --gt are required (or --merge PARTS...)")
    config = FitConfig(
        mode=ABSOLUTE if absolute else ROOT_RELATIVE,
        sum_to_one_weight=sum_to_one_weight,
        exact_sum_to_one=exact_sum_to_one,
        support=support,
        chunk_size=chunk_size,
        certify=DEFAULTS.certify if certify is None else certify,
    )
    chosen = [s.strip() for s in subjects.split(",") if s.strip()] if subjects else None
    part = parse_shard(shard)
    ranks = join_job()  # the exact sums are all-reduced on the CPU (gloo)
    body = _smpl_body(smpl, ranks, device)
    inputs = load_inputs(
        params, gt, smpl, out, config, chosen, allow_test_subjects, init_regressor, body=body
    )
    if part is not None:
        i, n = part
        with progress_bar(f"accumulating shard {i}/{n}") as progress:
            result = run_shard(inputs, out, config, part, progress, ranks)
        console.print(
            f"shard {i}/{n}: {result.summary['frames']} frames -> {result.outputs['shard']}"
        )
        return
    # the pilot, the accumulation and each certification pass stream the frames
    with progress_bar("accumulating and certifying (frames streamed)") as progress:
        result = run_fit(inputs, out, config, json_out, progress, ranks)
    if ranks.is_main:
        _print_report(result)


def _smpl_body(smpl: Path | None, ranks, device: str):
    if smpl is None:
        return None
    from jregfix.body.smpl import SMPLBody

    dev = ranks.device(device)  # a bad --device fails before the model file is read
    return SMPLBody(smpl).to(dev)


def _print_report(result: StageResult) -> None:
    report = result.summary
    res = report["result"]
    table = Table(
        title=f"fit-regressor: {res['frames']} frames, {report['method']['frame']}, "
        f"{report['method']['sum_to_one']}"
    )
    for col in ("joint", "RMS mm", "non-zeros", "row sum", "KKT (rel)"):
        table.add_column(col, justify="left" if col == "joint" else "right")
    for p in res["per_joint"]:
        table.add_row(
            p["joint"],
            f"{p['rms_mm']:.2f}",
            str(p["nonzeros"]),
            f"{p['row_sum']:.4f}",
            f"{p['kkt_relative']:.1e}",
        )
    Console().print(table)
    t = res.get("time_s", {})
    console.print(
        f"regressor -> {result.outputs['regressor']} (provenance "
        f"{result.outputs['provenance']}); "
        f"time {sum(v for k, v in t.items() if k != 'total'):.1f} s, "
        f"peak RSS {res['peak_rss_mb']:.0f} MB"
    )
    cert = res["certification"]
    if res["kkt_global_relative_max"] is not None:
        console.print(
            f"KKT over all vertices: {res['kkt_global_relative_max']:.1e} (relative); "
            f"{cert['rounds']} column-generation rounds added "
            f"{cert['vertices_added_per_round']} vertices, {cert['passes']} "
            "certification passes over the frames"
        )
    if not res["converged"]:
        why = cert.get("note") or "the solver stopped before reaching the KKT tolerance"
        console.print(f"[yellow]warning:[/] not certified over all vertices: {why}")
