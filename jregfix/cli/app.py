"""The typer application object and the error boundary shared by every command."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import cast

import typer
from rich.console import Console

from jregfix.device import ensure_cublas_workspace
from jregfix.distributed import Ranks, init_from_env, shutdown
from jregfix.errors import JregfixError, one_line
from jregfix.threads import configure_threads

app = typer.Typer(
    name="jregfix",
    help="Honest 3D human pose numbers: refine SMPL fits on Human3.6M and re-fit the joint "
    "regressor (Hedlin, Rhodin & Yi, CRV 2022).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
_state = {"debug": False}


# the commands that split their work over a torchrun job; the others would just repeat it
DISTRIBUTED_COMMANDS = ("spin", "silhouettes", "fit-regressor", "refine")


@app.callback()
def _root(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug
    ensure_cublas_workspace()  # before any command can start CUDA (see jregfix.device)
    configure_threads()  # each process its share of the CPUs (see jregfix.threads)
    if (
        int(os.environ.get("WORLD_SIZE", "1")) > 1
        and ctx.invoked_subcommand not in DISTRIBUTED_COMMANDS
    ):
        raise JregfixError(
            f"`{ctx.invoked_subcommand}` runs in one process; under torchrun "
            f"launch one of {', '.join(DISTRIBUTED_COMMANDS)} instead"
        )


def join_job(device: str = "cpu") -> Ranks:
    """Join the torchrun job described by the environment (if any); only rank 0 prints.

    ``device`` is the command's ``--device``: it picks the backend (NCCL for CUDA)."""
    ranks = init_from_env(device)
    console.quiet = not ranks.is_main
    return ranks


# click's UsageError (bad or missing options), reached through typer's public BadParameter:
# recent typer releases vendor click, older ones depend on it.
_UsageError = cast("type[Exception]", typer.BadParameter.__mro__[1])


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one red line and a non-zero exit for any failure (``--debug``
    re-raises).

    typer runs outside its standalone mode, so a usage error (a bad or missing option) reaches
    us too and is printed as one line (exit 2) instead of typer's framed box. Our own errors
    print their message; I/O errors, absurd sizes and bad data are worded by
    :func:`jregfix.errors.one_line`; anything else says how to get the traceback.
    """
    from jregfix.cli.options import renamed

    argv = renamed(sys.argv[1:] if argv is None else list(argv))
    try:
        with _leaving_the_job():
            code = app(args=argv, prog_name="jregfix", standalone_mode=False)
    except SystemExit as exc:
        if _interrupted(exc):
            console.print(INTERRUPTED, highlight=False)
            return 130
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except _UsageError as exc:
        return _usage_error(exc)
    except typer.Abort:
        console.print(INTERRUPTED, highlight=False)
        return 130
    except Exception as exc:
        if _state["debug"] or "--debug" in (argv if argv is not None else sys.argv):
            raise
        console.quiet = False  # every rank reports its own failure
        world = int(os.environ.get("WORLD_SIZE", "1"))
        where = f"rank {os.environ.get('RANK', '?')} of {world}: " if world > 1 else ""
        console.print(f"[bold red]error:[/] {where}", end="", highlight=False)
        console.print(one_line(exc), markup=False, highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        console.print(INTERRUPTED, highlight=False)
        return 130
    if code == 130:  # typer turns Ctrl-C inside a command into a silent exit 130
        console.print(INTERRUPTED, highlight=False)
    return code if isinstance(code, int) else 0


def _usage_error(exc) -> int:
    """A usage error as one line naming the command's --help; bare ``jregfix`` shows the help."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        print(ctx.get_help())
        return 0
    command = ctx.command_path if ctx is not None else "jregfix"
    console.print("[bold red]error:[/] ", end="", highlight=False)
    console.print(
        f"{exc.format_message()} (see `{command} --help`)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return exc.exit_code


INTERRUPTED = "interrupted; re-run the same command to resume"


def _interrupted(exc: BaseException | None) -> bool:
    """Whether a KeyboardInterrupt is somewhere in ``exc``'s cause/context chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def _leaving_the_job() -> Iterator[None]:
    try:
        yield
    finally:
        shutdown()


def parse_named_paths(values: list[str], option: str) -> dict[str, str]:
    """['std=J.npy', 'opt=J2.npy'] -> {'std': 'J.npy', 'opt': 'J2.npy'} (a bare path is named
    after its file stem)."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            from pathlib import Path

            name, path = Path(value).stem, value
        if not name or not path:
            raise JregfixError(f"{option} expects NAME=PATH, got {value!r}")
        if name in out:
            raise JregfixError(f"{option}: the name {name!r} is given twice")
        out[name] = path
    return out
