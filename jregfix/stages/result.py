"""What every stage function reports while it runs and returns when it ends.

One progress protocol and one result type for all stages, so that the CLI (and a notebook)
drives every stage the same way: :class:`Step` events go to a :class:`Progress` callable, and the
stage returns a :class:`StageResult`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Step:
    """One progress event of a stage.

    ``done`` counts the units finished so far (cumulative, so an event can be dropped or repeated
    without harm) out of ``total`` (None when unknown); ``info`` carries live numbers, e.g. the
    loss terms of a refine iteration, and ``message`` a one-line note.
    """

    stage: str
    done: int
    total: int | None = None
    unit: str = "frames"
    info: Mapping[str, float] = field(default_factory=dict)
    message: str | None = None


class Progress(Protocol):
    """Receives a stage's :class:`Step` events (a progress bar, a logger, a test's list)."""

    def __call__(self, step: Step) -> None: ...


@dataclass
class StageResult:
    """What a stage did: the files it wrote (``outputs``: name -> path), whether it found them
    current and skipped the work (``skipped``), and its JSON-ready ``summary`` (the numbers its
    manifest records)."""

    stage: str
    outputs: dict[str, Path] = field(default_factory=dict)
    skipped: bool = False
    summary: dict[str, Any] = field(default_factory=dict)
