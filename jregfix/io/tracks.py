"""VIBE / MEVA demo outputs (``vibe_output.pkl``, ``meva_output.pkl``), read safely.

Both are ``{track_id: {"pose" (n,72), "betas" (n,10), "frame_ids" (n,), "verts" (n,6890,3), ...}}``
written with ``joblib.dump`` (VIBE) or pickle (conventions.md §7.2-7.3). joblib stores each
numpy array as a ``NumpyArrayWrapper`` followed by the raw bytes in the stream. We read both
layouts with a pure-Python unpickler that resolves only an allow-list of globals (numpy array
reconstruction, the joblib wrapper as an inert stand-in) and reads the raw array bytes
ourselves, so no code in the file can run. Compressed joblib files (zlib, gzip, bz2, xz) are
decompressed first.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np

from jregfix.errors import JregfixError

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("collections", "OrderedDict"),
    # protocol-5 pickles rebuild arrays from raw bytes with this
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _JoblibArray:
    """Stand-in for joblib.numpy_pickle.NumpyArrayWrapper: array metadata, bytes follow."""

    def read(self, fh) -> np.ndarray:
        state = self.__dict__
        dtype = np.dtype(state["dtype"])
        if dtype.hasobject:
            raise JregfixError("object arrays in a joblib file are refused (they need pickle)")
        if state.get("numpy_array_alignment_bytes") is not None:
            pad = fh.read(1)
            fh.read(int.from_bytes(pad, "little"))
        shape = tuple(int(s) for s in state["shape"])
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        data = fh.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise JregfixError("truncated joblib array data")
        array = np.frombuffer(data, dtype=dtype, count=count).copy()
        if state.get("order") == "F":
            return array.reshape(shape[::-1]).transpose()
        return array.reshape(shape)


class _SafeUnpickler(pickle._Unpickler):  # pure-Python unpickler: BUILD can be intercepted
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, fh):
        super().__init__(fh, encoding="latin1")
        self._raw = fh

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            if module == "_codecs":
                import codecs

                return codecs.encode
            if module == "collections":
                import collections

                return collections.OrderedDict
            if module == "numpy":
                return getattr(np, name)
            core = np._core if hasattr(np, "_core") else np.core  # numpy < 2 has only np.core
            return getattr(core.numeric if module.endswith("numeric") else core.multiarray, name)
        if module == "joblib.numpy_pickle" and name == "NumpyArrayWrapper":
            return _JoblibArray
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")

    def load_build(self):
        super().load_build()
        if isinstance(self.stack[-1], _JoblibArray):
            self.stack[-1] = self.stack[-1].read(self._raw)

    dispatch[pickle.BUILD[0]] = load_build


def _decompressed(raw: bytes) -> bytes:
    if raw[:2] == b"\x1f\x8b":
        return gzip.decompress(raw)
    if raw[:3] == b"BZh":
        return bz2.decompress(raw)
    if raw[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(raw)
    if raw[:1] == b"\x78":  # zlib header (joblib's compress=True default)
        return zlib.decompress(raw)
    return raw


def load_tracks(path: str | Path) -> dict:
    """Read a VIBE/MEVA output pickle into ``{track_id: {key: array}}``."""
    path = Path(path)
    if not path.is_file():
        raise JregfixError(f"{path}: no such file")
    try:
        raw = _decompressed(path.read_bytes())
        obj = _SafeUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as exc:
        raise JregfixError(f"{path}: refused: {exc}") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, zlib.error, OSError, lzma.LZMAError) as exc:
        raise JregfixError(f"{path}: not a readable VIBE/MEVA output ({exc})") from None
    if not isinstance(obj, dict) or not obj:
        raise JregfixError(f"{path}: expected a non-empty dict of tracks, got {type(obj).__name__}")
    for tid, track in obj.items():
        if not isinstance(track, dict):
            raise JregfixError(f"{path}: track {tid!r} is a {type(track).__name__}, not a dict")
        if "frame_ids" not in track:
            raise JregfixError(f"{path}: track {tid!r} lacks 'frame_ids'")
    return obj
