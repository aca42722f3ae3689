"""Run manifests and resumable chunk stores.

A stage records what went in (input files with sha256, resolved config, seed, package
versions) next to what came out. A stage is *current* when its recorded inputs and config equal
the ones of a new call. Long stages write per-chunk npz files under a chunk directory tagged
with the same fingerprint; a re-run with an equal fingerprint skips completed chunks, and a
different fingerprint discards them (they belong to another computation).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from jregfix.errors import JregfixError
from jregfix.io.atomic import save_npz, sha256_file, write_json


def versions() -> dict[str, str]:
    import torch

    import jregfix

    return {
        "jregfix": jregfix.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
    }


def describe_inputs(inputs: Mapping[str, str | Path | None]) -> dict[str, dict]:
    """{name: path} -> {name: {"path", "sha256", "bytes"}}; None entries are skipped."""
    out = {}
    for name, path in inputs.items():
        if path is None:
            continue
        p = Path(path)
        if not p.is_file():
            raise JregfixError(f"input '{name}': {p} does not exist")
        out[name] = {"path": str(p.resolve()), "sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def stage_record(stage: str, inputs: Mapping[str, str | Path | None], config: Mapping,
                 seed: int | None = None) -> dict:
    """What a stage ran on: the part of the manifest that decides whether it is current."""
    return {"stage": stage, "inputs": describe_inputs(inputs), "config": _jsonable(config),
            "seed": seed}


def fingerprint(record: Mapping) -> dict:
    """The comparable part of a record: input hashes (not paths), config, seed."""
    return {
        "stage": record["stage"],
        "inputs": {k: v["sha256"] for k, v in record["inputs"].items()},
        "config": record["config"],
        "seed": record["seed"],
    }


def write_manifest(path: str | Path, record: Mapping, outputs: Mapping | None = None,
                   extra: Mapping | None = None) -> dict:
    """Write ``<output>.manifest.json``-style provenance next to an output file."""
    doc = dict(record)
    doc["versions"] = versions()
    doc["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if outputs:
        doc["outputs"] = describe_inputs(outputs)
    if extra:
        doc.update(_jsonable(extra))
    write_json(path, doc)
    return doc


def manifest_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".manifest.json")


def read_manifest(path: str | Path) -> dict | None:
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_current(output: str | Path, record: Mapping) -> bool:
    """True when ``output`` exists and its manifest fingerprint equals ``record``'s."""
    output = Path(output)
    doc = read_manifest(manifest_path(output))
    if doc is None or not output.is_file():
        return False
    try:
        return fingerprint(doc) == fingerprint(record)
    except KeyError:
        return False


def chunk_ranges(n: int, chunk_size: int) -> list[tuple[int, int]]:
    if chunk_size <= 0:
        raise JregfixError(f"chunk size must be positive, got {chunk_size}")
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


class ChunkStore:
    """Per-chunk npz files under ``directory``, valid only for one fingerprint (and versions)."""

    TAG_FILE = "fingerprint.json"

    def __init__(self, directory: str | Path, record: Mapping):
        self.directory = Path(directory)
        # chunks made by another version of the code are not mixed with new ones
        self.tag = {**fingerprint(record), "versions": versions()}
        tag_file = self.directory / self.TAG_FILE
        if self.directory.exists():
            old = read_manifest(tag_file)
            if old != _jsonable(self.tag):
                shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if not tag_file.exists():
            write_json(tag_file, self.tag)

    def path(self, index: int) -> Path:
        return self.directory / f"chunk_{index:06d}.npz"

    def done(self, index: int) -> bool:
        return self.path(index).is_file()

    def save(self, index: int, **arrays: np.ndarray) -> None:
        save_npz(self.path(index), **arrays)

    def load(self, index: int) -> dict[str, np.ndarray]:
        with np.load(self.path(index), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def iter_loaded(self, count: int) -> Iterator[dict[str, np.ndarray]]:
        for i in range(count):
            yield self.load(i)

    def concatenate(self, count: int) -> dict[str, np.ndarray]:
        """Concatenate every chunk's arrays along axis 0 (all chunks must be done)."""
        missing = [i for i in range(count) if not self.done(i)]
        if missing:
            raise JregfixError(f"{self.directory}: chunks {missing[:5]} are not done")
        parts = list(self.iter_loaded(count))
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _jsonable(obj):
    """Round-trip through JSON so tuples/paths/numpy scalars compare equal after a reload."""
    return json.loads(json.dumps(obj, default=_default, sort_keys=True))


def _default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
