"""The options every command spells the same way, and the one progress bar.

A command builds its options from these factories so that `--gt`, `--device`, `--seed` and
`--shard` mean and default the same everywhere, and drives :func:`progress_bar` with the
stages' :class:`jregfix.stages.result.Step` events.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from jregfix.device import DEFAULT_DEVICE, DEVICE_HELP
from jregfix.errors import JregfixError
from jregfix.stages.result import Progress, Step

GT_HELP = "SPIN-format Human3.6M npz (imgname, center, scale, S[, part])."


def gt_option(required: bool = True, help: str = GT_HELP):
    """`--gt`; older scripts' `--h36m` (spin, silhouettes) still works: :func:`renamed` maps it
    before parsing, so the alias stays out of `--help`."""
    return typer.Option(... if required else None, "--gt", help=help)


# Old option names still accepted on the command line, mapped to their one current spelling.
RENAMED = {"--h36m": "--gt"}


def renamed(argv: list[str]) -> list[str]:
    """``argv`` with every old option name (``RENAMED``, also as ``--old=value``) replaced."""
    out = []
    for arg in argv:
        if not isinstance(arg, str):  # a library caller may pass Paths
            out.append(arg)
            continue
        name, sep, value = arg.partition("=")
        out.append(RENAMED[name] + sep + value if name in RENAMED else arg)
    return out


def device_option(help: str = DEVICE_HELP):
    return typer.Option(DEFAULT_DEVICE, "--device", help=help)


def seed_option(what: str):
    return typer.Option(0, "--seed", help=f"Seeds {what}: same seed, same bytes.")


def shard_option(what: str = "the frames"):
    return typer.Option(
        None,
        "--shard",
        help=f"i/n: process only the i-th of n contiguous "
        f"blocks of {what} (merge the parts afterwards).",
    )


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """'i/n' -> (i, n) with 0 <= i < n; None stays None."""
    if not spec:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise JregfixError(f"--shard expects i/n (e.g. 0/4), got {spec!r}") from None
    if not 0 <= i < n:
        raise JregfixError(f"--shard {spec!r}: need 0 <= i < n")
    return i, n


def out_option(help: str):
    return typer.Option(..., "--out", help=help)


# The per-frame stages (spin, silhouettes): pass the stage config's own default, e.g.
# `batch_size_option(SpinConfig().batch_size)`, so that the CLI never repeats a number.


def batch_size_option(default: int, help: str = "Frames per network batch."):
    return typer.Option(default, "--batch-size", min=1, help=help)


def chunk_size_option(default: int):
    return typer.Option(default, "--chunk-size", min=1, help="Frames per resumable chunk.")


def workers_option():
    return typer.Option(
        None,
        "--workers",
        min=1,
        help="Image decoding threads per process (default: this process's share of the CPUs).",
    )


def skip_missing_option():
    return typer.Option(
        False,
        "--skip-missing",
        help="Drop frames whose image is missing or unreadable (counted in the report).",
    )


def force_option():
    return typer.Option(False, "--force", help="Recompute even if the output is current.")


def save_figures_option(what: str):
    """`--save-figures N`: a PNG of the first N frames beside --out (0, the default: none)."""
    return typer.Option(
        0,
        "--save-figures",
        min=0,
        help=f"Write a PNG of the first N frames ({what}) beside --out; 0 writes none.",
    )


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Progress]:
    """A rich bar on stderr, driven by a stage's :class:`Step` events (cumulative ``done`` out
    of ``total``); live ``info`` numbers show beside it."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import (
        Progress as RichProgress,
    )

    from jregfix.cli.app import console

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with RichProgress(*columns, console=console) as bar:
        task = bar.add_task(description, total=None, info="")

        def update(step: Step) -> None:
            info = "  ".join(f"{k} {v:.4g}" for k, v in step.info.items())
            bar.update(task, completed=step.done, total=step.total, info=step.message or info)

        yield update
