"""`jregfix regressors ...`: list, download, convert and inspect joint regressors."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from jregfix.cli.app import app, console
from jregfix.errors import JregfixError
from jregfix.io.regressors import (
    KNOWN_REGRESSORS,
    TRANSFORMS,
    download_regressor,
    effective_regressor,
    load_regressor,
    provenance_path,
    regressor_stats,
    regressor_warnings,
    save_regressor,
)

regressors_app = typer.Typer(
    help="Known joint regressors: list, download, convert, show.", no_args_is_help=True
)
app.add_typer(regressors_app, name="regressors")


@regressors_app.command("list")
def list_command() -> None:
    """Known regressors (the registry shipped with jregfix): what each is, its shape, source,
    sha256, licence note and the transform applied before use."""
    table = Table(title="known joint regressors", show_lines=True)
    for col in ("name", "what it is", "shape", "source / sha256", "licence", "transform"):
        table.add_column(col, overflow="fold")
    for r in KNOWN_REGRESSORS.values():
        table.add_row(
            r.name,
            r.description,
            f"{r.shape[0]}x{r.shape[1]}",
            f"{r.url or 'no public download'}\n{r.sha256 or '-'}",
            r.licence,
            r.transform,
        )
    Console().print(table)


@regressors_app.command("download")
def download_command(
    name: str = typer.Argument(..., help="Known regressor name (see `regressors list`)."),
    out: Path = typer.Option(
        None,
        "--out",
        help="Where to write the effective (K,V) .npy "
        "(default: the jregfix cache, $JREGFIX_CACHE_DIR).",
    ),
    url: str = typer.Option(
        None,
        "--url",
        help="Alternative source: a mirror, file:///... or a "
        "local path; the sha256 pin still applies.",
    ),
) -> None:
    """Fetch a released regressor (the registry's url, sha256-pinned, cached) and write the
    form used for scoring (the entry's transform applied)."""
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        *Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(), console=console
    ) as bar:
        task = bar.add_task(f"downloading {name}", total=None)
        path = download_regressor(
            name,
            out,
            url,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    console.print(f"wrote {path} ({TRANSFORMS[KNOWN_REGRESSORS[name].transform]})")


@regressors_app.command("convert")
def convert_command(
    src: Path = typer.Argument(..., help="Input regressor (.npy/.npz/.pt)."),
    dst: Path = typer.Argument(..., help="Output (.npy or .npz)."),
    effective: bool = typer.Option(
        False,
        "--effective",
        help="Apply ReLU and renormalise rows to sum to 1 (how Hedlin et al.'s raw file is used).",
    ),
) -> None:
    """Convert between regressor formats, optionally to the effective (ReLU + normalised) form."""
    if any(
        out.resolve() == src.resolve() or (out.exists() and src.exists() and out.samefile(src))
        for out in (dst, provenance_path(dst))
    ):
        raise JregfixError(f"{dst}: would overwrite the input {src}; choose another output path")
    j = load_regressor(src)
    if effective:
        j = effective_regressor(j)
    save_regressor(
        dst,
        j,
        provenance={
            "converted_from": str(src.resolve()),
            "transform": "effective" if effective else "none",
        },
    )
    console.print(f"wrote {dst} {j.shape}")
    warnings = regressor_warnings(j)
    if warnings:
        console.print(
            f"note: {'; '.join(warnings)}: `evaluate` will flag it; --effective "
            "applies ReLU and renormalises the rows"
        )


@regressors_app.command("show")
def show_command(path: Path = typer.Argument(..., help="Regressor file.")) -> None:
    """Shape, sparsity, sign and row-sum statistics, and per-joint support size."""
    from jregfix.io.h36m import H36M17_NAMES

    j = load_regressor(path)
    s = regressor_stats(j)
    out = Console()
    out.print(
        f"[bold]{path}[/]: shape {tuple(s['shape'])}, {s['nonzeros']} non-zeros "
        f"({100 * s['nonzeros'] / j.size:.3f}%), {s['negative_entries']} negative, "
        f"row sums {s['row_sum_min']:.4f}..{s['row_sum_max']:.4f}"
    )
    for warning in regressor_warnings(j):
        out.print(f"[yellow]warning[/]: {warning}")
    table = Table()
    for col in ("row", "joint", "support", "row sum", "min", "max"):
        table.add_column(col, justify="right")
    names = H36M17_NAMES if j.shape[0] == 17 else [""] * j.shape[0]
    for i in range(j.shape[0]):
        table.add_row(
            str(i),
            names[i],
            str(s["support_per_row"][i]),
            f"{s['row_sums'][i]:.4f}",
            f"{j[i].min():.4f}",
            f"{j[i].max():.4f}",
        )
    out.print(table)
