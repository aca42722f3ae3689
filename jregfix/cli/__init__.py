"""Command-line interface: a thin typer layer over library functions (one module per command)."""

from jregfix.cli.app import app, main

__all__ = ["app", "main"]

from jregfix.cli import evaluate, regressors  # noqa: E402,F401  (registers commands)
