"""Refuse, before any work, a command whose outputs would overwrite one of its inputs.

A stage writing ``out`` also writes ``<out>.manifest.json``, ``<out>.json`` (provenance) and
keeps resumable chunks under ``<out>.chunks/`` (deleted when done); any of them landing on an
input, or an input inside that chunk directory, would destroy data the user may not be able to
rebuild. Every stage calls :func:`refuse_overwriting_inputs` before reading anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from jregfix.errors import JregfixError

PathArg = str | os.PathLike | None
PathsArg = PathArg | Iterable[PathArg]


def _paths(value: PathsArg) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value if v is not None]


def written_beside(out: str | os.PathLike) -> list[Path]:
    """Every path a stage writing ``out`` may create: the file, its manifest, its provenance
    sidecar and its chunk directory."""
    out = Path(out)
    return [out] + [
        out.with_name(out.name + suffix) for suffix in (".manifest.json", ".json", ".chunks")
    ]


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:  # hard links and bind mounts resolve differently but are one file
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def refuse_overwriting_inputs(
    inputs: Mapping[str, PathsArg], outputs: Mapping[str, PathsArg]
) -> None:
    """Raise if an output, or a sidecar written beside it, is one of the inputs.

    ``inputs`` and ``outputs`` map an option name (for the message) to a path, a list of paths
    or None; an input inside an output's ``.chunks/`` directory is a clash too.
    """
    given = [(option, p) for option, v in inputs.items() for p in _paths(v)]
    for option, out in ((o, p) for o, v in outputs.items() for p in _paths(v)):
        for written in written_beside(out):
            for source_option, source in given:
                if _same(written, source) or (
                    written.name.endswith(".chunks") and _inside(source, written)
                ):
                    raise JregfixError(
                        f"{option} {out} would overwrite {source}, which is one of the inputs "
                        f"({source_option}); choose another output path"
                    )
