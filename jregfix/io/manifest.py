"""Run manifests and resumable chunk stores.

A stage records what went in (input files with sha256, resolved config, seed, package
versions) next to what came out. A stage is *current* (:func:`records_current`, the one rule)
when its recorded inputs and config equal the ones of a new call and its outputs are present
with the hashes it recorded. Long stages write per-chunk npz files under a chunk directory tagged
with the same fingerprint; a re-run with an equal fingerprint skips completed chunks, and a
different fingerprint discards them (they belong to another computation). Each chunk also
carries the fingerprint's hash, so a chunk written into the directory by another computation
(a concurrent writer without a lock) is discarded too, never adopted.

A manifest records its output's sha256 (``output_sha256``); :func:`read_sidecar` refuses a
sidecar whose output has other bytes (an interrupted write, see :func:`write_pair`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from jregfix.errors import JregfixError
from jregfix.io.atomic import fault_point, save_npz, sha256_file, write_json, write_pair
from jregfix.io.budget import check_npz


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


def stage_record(
    stage: str, inputs: Mapping[str, str | Path | None], config: Mapping, seed: int | None = None
) -> dict:
    """What a stage ran on: the part of the manifest that decides whether it is current."""
    return {
        "stage": stage,
        "inputs": describe_inputs(inputs),
        "config": _jsonable(config),
        "seed": seed,
    }


def fingerprint(record: Mapping) -> dict:
    """The comparable part of a record: input hashes (not paths), config, seed."""
    return {
        "stage": record["stage"],
        "inputs": {k: v["sha256"] for k, v in record["inputs"].items()},
        "config": record["config"],
        "seed": record["seed"],
    }


def _manifest_doc(record: Mapping, extra: Mapping | None) -> dict:
    doc = dict(record)
    doc["versions"] = versions()
    doc["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if extra:
        doc.update(_jsonable(extra))
    return doc


def write_manifest(
    path: str | Path, record: Mapping, outputs: Mapping | None = None, extra: Mapping | None = None
) -> dict:
    """Write ``<output>.manifest.json``-style provenance next to already written outputs (a
    single output's hash is also recorded as ``output_sha256``, for :func:`read_sidecar`)."""
    doc = _manifest_doc(record, extra)
    if outputs:
        doc["outputs"] = describe_inputs(outputs)
        if len(doc["outputs"]) == 1:
            doc["output_sha256"] = next(iter(doc["outputs"].values()))["sha256"]
    write_json(path, doc)
    return doc


def write_output(
    out: str | Path, data: bytes, record: Mapping, name: str, extra: Mapping | None = None
) -> dict:
    """Write the bytes of ``out`` and its manifest as one unit (:func:`write_pair`)."""
    doc = _manifest_doc(record, extra)
    doc["outputs"] = {
        name: {
            "path": str(Path(out).resolve()),
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
        }
    }
    return write_pair(out, data, manifest_path(out), doc)


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


def read_sidecar(output: str | Path, sidecar: str | Path | None = None) -> dict | None:
    """The JSON sidecar of ``output`` (default its manifest), checked against the output.

    None when there is no readable sidecar; a JregfixError when it records another
    ``output_sha256`` than the output's (sidecars written by other tools record none)."""
    sidecar = manifest_path(output) if sidecar is None else Path(sidecar)
    doc = read_manifest(sidecar)
    if not isinstance(doc, dict) or "output_sha256" not in doc:
        return doc
    if not Path(output).is_file() or sha256_file(output) != doc["output_sha256"]:
        raise JregfixError(
            f"{sidecar} does not describe {output} (its recorded sha256 "
            "differs: a write was interrupted or one file was replaced); re-run "
            f"the command that wrote {output}"
        )
    return doc


def records_current(
    doc: Mapping | None, record: Mapping, outputs: Mapping[str, str | Path]
) -> bool:
    """THE definition of *current*, for every stage: ``doc`` (a stage's manifest, or a stage's
    entry in a run manifest) records the fingerprint of ``record`` (same inputs by sha256, same
    config and seed), and exactly the outputs named in ``outputs``, each present with the sha256
    recorded for it (a missing, replaced or half-written output is computed again).

    ``doc["outputs"]`` maps a name to the output's sha256, or to ``{"path", "sha256", ...}`` as
    :func:`write_manifest` records it.
    """
    if not isinstance(doc, Mapping):
        return False
    try:
        if fingerprint(doc) != fingerprint(record):
            return False
        hashes = {
            name: entry["sha256"] if isinstance(entry, Mapping) else entry
            for name, entry in doc.get("outputs", {}).items()
        }
    except (KeyError, TypeError, AttributeError):  # not a manifest of ours
        return False
    return set(hashes) == set(outputs) and all(
        Path(p).is_file() and sha256_file(p) == hashes[name] for name, p in outputs.items()
    )


def is_current(output: str | Path, record: Mapping) -> bool:
    """:func:`records_current` for a stage with one output and its ``<output>.manifest.json``."""
    doc = read_manifest(manifest_path(output))
    names = list(doc.get("outputs", {})) if isinstance(doc, dict) else []
    return len(names) == 1 and records_current(doc, record, {names[0]: output})


def chunk_ranges(n: int, chunk_size: int) -> list[tuple[int, int]]:
    if chunk_size <= 0:
        raise JregfixError(f"chunk size must be positive, got {chunk_size}")
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


class ChunkStore:
    """Per-chunk npz files under ``directory``, valid only for one fingerprint (and versions)."""

    TAG_FILE = "fingerprint.json"
    TAG_MEMBER = "chunk_fingerprint"  # in every chunk: sha256 of the tag

    def __init__(
        self,
        directory: str | Path,
        record: Mapping,
        say: Callable[[str], None] | None = None,
        nan_marks: tuple[str, ...] = (),
    ):
        """``nan_marks``: arrays where NaN is a marker (a silhouette chunk's ``box`` of a frame
        without a detection); NaN anywhere else makes a chunk unsound."""
        self.directory = Path(directory)
        self.nan_marks = nan_marks
        self.say = say or (lambda message: print(message, file=sys.stderr))
        self._sound: set[int] = set()  # chunks already checked by done()
        # chunks made by another version of the code are not mixed with new ones
        self.tag = {**fingerprint(record), "versions": versions()}
        self.tag_hash = hashlib.sha256(
            json.dumps(_jsonable(self.tag), sort_keys=True).encode()
        ).hexdigest()
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
        """Whether chunk ``index`` is finished by this computation and sound; a chunk of another
        one (another fingerprint, or none), a truncated or hostile one or one holding NaN/inf
        is deleted, with a note, so that it alone is recomputed."""
        if index in self._sound:
            return True
        path = self.path(index)
        if not path.is_file():
            return False
        try:
            check_npz(path, "resume chunk")
            with np.load(path, allow_pickle=False) as z:
                ours = self.TAG_MEMBER in z.files and str(z[self.TAG_MEMBER]) == self.tag_hash
                problem = None if ours else "made by another computation"
                bad = [
                    k
                    for k in z.files
                    if ours
                    and k not in self.nan_marks
                    and z[k].dtype.kind in "fc"
                    and not np.isfinite(z[k]).all()
                ]
                if bad:
                    problem = f"NaN/inf in {bad}"
        except (JregfixError, ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            problem = f"unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        if problem is not None:
            if problem != "made by another computation":
                self.say(f"note: discarding {path} ({problem}); it will be recomputed")
            path.unlink(missing_ok=True)
            return False
        self._sound.add(index)
        return True

    def save(self, index: int, **arrays: np.ndarray) -> None:
        """Write chunk ``index``; NaN/inf is refused (the finished chunks stay for a resume)."""
        _refuse_non_finite(
            {k: v for k, v in arrays.items() if k not in self.nan_marks},
            f"chunk {index} of {self.directory}",
        )
        save_npz(
            self.path(index),
            compressed=True,
            **arrays,
            **{self.TAG_MEMBER: np.array(self.tag_hash)},
        )
        fault_point("after-chunk")

    def load(self, index: int) -> dict[str, np.ndarray]:
        with np.load(self.path(index), allow_pickle=False) as z:
            if self.TAG_MEMBER not in z.files or str(z[self.TAG_MEMBER]) != self.tag_hash:
                raise JregfixError(
                    f"{self.path(index)} belongs to another computation "
                    "(its fingerprint differs); re-run the command"
                )
            return {k: z[k] for k in z.files if k != self.TAG_MEMBER}

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


def _refuse_non_finite(arrays: Mapping[str, np.ndarray], what: str) -> None:
    """Raise naming the frames (``gt_row``/``rows`` when present, else positions) of NaN/inf."""
    frames = arrays.get("gt_row", arrays.get("rows"))
    for key, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind not in "fc" or np.isfinite(a).all():
            continue
        rows = (
            np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(1))
            if a.ndim
            else np.zeros(1, np.int64)
        )
        if frames is not None and a.ndim and len(frames) == len(a):
            rows = np.asarray(frames)[rows]
        raise JregfixError(
            f"{what}: NaN/inf in '{key}' for {len(rows)} frame(s), e.g. {rows[:5].tolist()}; the "
            "computation diverged or an input holds NaN (weights, initial parameters) or a "
            "setting is extreme (learning rate); finished chunks are kept for a resume"
        )


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
