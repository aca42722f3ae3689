"""Atomic file writes, output + sidecar pairs, safe npz reads and content hashes.

A failed stage never leaves a partial output file; npz files are read without pickle.

Files are created with the mode ``open()`` would give them (0o666 minus the process umask), and
a replaced file keeps its mode, so results on a shared filesystem stay readable by whoever could
read them before (``mkstemp`` alone would make every output 0600).

An output and its JSON sidecar (``<file>.manifest.json``, a regressor's ``<file>.json``) are one
unit: :func:`write_pair` records the output's sha256 in the sidecar and renames the sidecar
first, then the output. A crash between the two renames leaves the old output next to a sidecar
that names another hash, which every reader checks (:func:`jregfix.io.manifest.read_sidecar`):
the pair is either consistent or visibly inconsistent, never silently mixed.

``JREGFIX_FAULT`` is a test hook (:func:`fault_point`): ``JREGFIX_FAULT=<point>`` kills the
process with SIGKILL at that point, as ``kill -9`` would; ``<point>:pause`` stops it there until
it is killed. Points: ``after-sidecar`` (between the sidecar's and the output's rename),
``after-chunk`` (after a resumable chunk is saved), ``after-lock`` (once an output lock is held).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import signal
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from jregfix.errors import JregfixError
from jregfix.io.budget import check_npz


def fault_point(name: str) -> None:
    """Die (SIGKILL) or pause here when ``JREGFIX_FAULT`` names this point (tests only)."""
    point, _, action = os.environ.get("JREGFIX_FAULT", "").partition(":")
    if point != name:
        return
    if action == "pause":
        sys.stderr.write(f"jregfix: paused at fault point {name} (pid {os.getpid()})\n")
        sys.stderr.flush()
        while True:
            time.sleep(1)
    os.kill(os.getpid(), signal.SIGKILL)


def creation_mode(path: Path) -> int:
    """The mode ``path`` should get: its current one if it exists, else 0o666 minus the umask."""
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    The result has the mode of the file it replaces, or the umask's default for a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    tmp_path = Path(tmp)
    try:
        os.fchmod(fd, creation_mode(path))
        os.close(fd)
        fd = -1
        yield tmp_path
        os.chmod(tmp_path, creation_mode(path))  # the block may have recreated the file
        os.replace(tmp_path, path)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def json_bytes(obj) -> bytes:
    """Sorted, indented JSON. A NaN or inf (e.g. the mean IoU of a batch without masks) is
    written as null: JSON has no such numbers, and Python's ``NaN`` token breaks other readers."""
    return (json.dumps(_finite(obj), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    write_bytes(path, json_bytes(obj))


def write_pair(
    path: str | os.PathLike, data: bytes, sidecar: str | os.PathLike, doc: Mapping
) -> dict:
    """Write ``data`` to ``path`` and ``doc`` (plus ``output_sha256``) to ``sidecar`` as one unit.

    The sidecar is renamed first: until the output follows, the sidecar's hash names bytes that
    are not there yet, which readers detect. Returns the sidecar document as written."""
    doc = {**doc, "output_sha256": hashlib.sha256(data).hexdigest()}
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
        write_json(sidecar, doc)
        fault_point("after-sidecar")
    return doc


def npz_bytes(compressed: bool = True, **arrays) -> bytes:
    """The bytes of an npz; they depend only on the arrays (numpy writes fixed zip timestamps)."""
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    return buf.getvalue()


def save_npz(path: str | os.PathLike, compressed: bool = True, **arrays) -> None:
    """Write an npz atomically; the bytes depend only on the arrays (fixed zip timestamps)."""
    write_bytes(path, npz_bytes(compressed, **arrays))


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    write_bytes(path, npy_bytes(array))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_npz(path: str | os.PathLike, what: str = "npz file") -> dict[str, np.ndarray]:
    """All arrays of an npz (no pickled objects); a missing or broken file is a JregfixError."""
    path = Path(path)
    if not path.is_file():
        raise JregfixError(f"{path}: no such file")
    check_npz(path, what)  # before numpy allocates what the headers declare
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise JregfixError(f"{path}: not a readable {what} ({exc})") from None
