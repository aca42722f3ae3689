"""Command-line interface: a thin typer layer over library functions (one module per command)."""

from jregfix.cli.app import app, main

__all__ = ["app", "main"]

from jregfix.cli import (  # noqa: F401  (registers commands)
    check,
    demo,
    evaluate,
    fit_regressor,
    refine,
    regressors,
    run,
    silhouettes,
    spin,
)
