"""VIBE / MEVA demo outputs (``vibe_output.pkl``, ``meva_output.pkl``), read safely.

What the tools write (mkocabas/VIBE ``demo.py``, ZhengyiLuo/MEVA ``scripts/run_meva_on_video.py``):
one file per video, ``<output_folder>/<video file name without .mp4>/vibe_output.pkl`` (MEVA:
``meva_output.pkl``), written with ``joblib.dump``. It holds ``{person_id (int): track}``, one
entry per tracklet of the multi-person tracker, each a dict of numpy arrays over the track's n
frames: ``pred_cam`` (n,3), ``orig_cam`` (n,4), ``verts`` (n,6890,3), ``pose`` (n,72)
axis-angle, ``betas`` (n,10), ``joints3d`` (n,49,3) (all float32 from torch, except
``orig_cam``, float64), ``joints2d`` (None with box tracking), ``bboxes`` (n,4) float64 square
boxes (cx, cy, w, h) in original pixels, and ``frame_ids`` (n,) int64: 0-based indices of the
video's frames (50 fps for Human3.6M). VIBE drops tracks shorter than 25 frames, MEVA shorter
than 90.

joblib stores each numpy array as a ``NumpyArrayWrapper`` followed by the raw bytes in the
stream (joblib >= 1.2 adds alignment padding; VIBE's pinned joblib 0.14 does not). We read both
layouts, and plain pickles, with a pure-Python unpickler that resolves only an allow-list of
globals (numpy array reconstruction, the joblib wrapper as an inert stand-in) and reads the raw
array bytes ourselves, so no code in the file can run. Compressed joblib files (zlib, gzip,
bz2, xz) are decompressed first.

Human3.6M videos are named ``<action>.<camera>.mp4`` (``Directions 1.54138969.mp4``) under
``S9/Videos/``: the subject is not in the file name, so :func:`video_key` takes it from the
nearest folder above the per-video folder named like ``S9`` (or from the caller).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import pickle
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from jregfix.errors import JregfixError
from jregfix.io.h36m import h36m_imgname

TRACK_FILES = {"vibe": "vibe_output.pkl", "meva": "meva_output.pkl"}

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
    # protocol-5 pickles rebuild arrays from raw bytes with this
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
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
    # typeshed types the pure-Python unpickler's dispatch as taking the C Unpickler
    dispatch: ClassVar[dict[int, Callable[..., None]]] = dict(pickle._Unpickler.dispatch)

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
    return read_tracks(path)[0]


def read_tracks(path: str | Path) -> tuple[dict, str]:
    """:func:`load_tracks` plus the file's sha256 (from the same read: the files are large)."""
    path = Path(path)
    if not path.is_file():
        raise JregfixError(f"{path}: no such file")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    try:
        obj = _SafeUnpickler(io.BytesIO(_decompressed(raw))).load()
    except pickle.UnpicklingError as exc:
        raise JregfixError(f"{path}: refused: {exc}") from None
    except (
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        struct.error,
        zlib.error,
        OSError,
        lzma.LZMAError,
    ) as exc:
        raise JregfixError(f"{path}: not a readable VIBE/MEVA output ({exc})") from None
    if not isinstance(obj, dict):  # empty is real: MEVA writes {} when every track is < 90 frames
        raise JregfixError(
            f"{path}: expected a dict of tracks, got {type(obj).__name__}; is "
            "this a VIBE/MEVA demo output?"
        )
    for tid, track in obj.items():
        if not isinstance(track, dict):
            raise JregfixError(f"{path}: track {tid!r} is a {type(track).__name__}, not a dict")
        if "frame_ids" not in track:
            raise JregfixError(f"{path}: track {tid!r} lacks 'frame_ids'")
    return obj, digest


def track_files(path: str | Path, method: str) -> list[Path]:
    """The output files of a method: ``path`` itself, or every ``vibe_output.pkl`` (MEVA:
    ``meva_output.pkl``) in the folder ``path`` and below, sorted."""
    path = Path(path)
    name = TRACK_FILES[method]
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise JregfixError(
            f"{path}: no such file or folder (give a {name} or the folder that "
            f"holds <video>/{name})"
        )
    files = sorted(p for p in path.rglob(name) if p.is_file())
    if not files:
        others = [n for n in TRACK_FILES.values() if n != name and any(path.rglob(n))]
        hint = (
            f"; it holds {others[0]} files: is --method right?"
            if others
            else f"; {method}'s demo writes <output_folder>/<video name>/{name}"
        )
        raise JregfixError(f"{path}: no {name} in this folder or below{hint}")
    return files


@dataclass(frozen=True)
class VideoKey:
    """A Human3.6M video: ``subject`` 'S9', ``action`` as in the file name ('Directions 1'),
    ``camera`` '54138969'."""

    subject: str
    action: str
    camera: str

    def imgname(self, frame: int) -> str:
        """SPIN's image name numbered ``frame``: ``images/S9_Directions_1.54138969_000006.jpg``."""
        return h36m_imgname(self.subject, self.action, self.camera, frame)

    def __str__(self) -> str:
        return f"{self.subject}/{self.action}.{self.camera}"


_SUBJECT = re.compile(r"S\d+")
# '<action>.<camera>' as Human3.6M names its videos; a leading 'S9_' / 'S9 ' is also accepted
_VIDEO = re.compile(r"(?:(S\d+)[ _])?(.+)\.(\d+)")


def video_key(track_file: str | Path, subject: str | None = None) -> VideoKey:
    """The Human3.6M video a per-video output file came from.

    The video name is the name of the file's folder (VIBE/MEVA name it after the video,
    ``Directions 1.54138969``). The subject is, in this order: a leading ``S9_`` in that name,
    the nearest folder above named like ``S9`` (``S9/Directions 1.54138969/vibe_output.pkl``),
    or ``subject``. A subject in the path that contradicts ``subject`` is an error.
    """
    track_file = Path(track_file)
    folder = track_file.absolute().parent
    m = _VIDEO.fullmatch(folder.name)
    if m is None:
        raise JregfixError(
            f"{track_file}: its folder '{folder.name}' is not a Human3.6M video "
            "name '<action>.<camera>' (e.g. 'Directions 1.54138969'); keep the "
            "demo's per-video folders, or use --frame-ids rows"
        )
    found = m.group(1) or next((p.name for p in folder.parents if _SUBJECT.fullmatch(p.name)), None)
    if found and subject and found != subject:
        raise JregfixError(
            f"{track_file}: the path says subject {found} but --subject says "
            f"{subject}; drop --subject or fix the folder"
        )
    found = found or subject
    if not found:
        raise JregfixError(
            f"{track_file}: cannot tell the subject of video '{folder.name}' "
            "(Human3.6M video names do not contain it); put the video folders "
            "under a folder named like S9, or pass --subject"
        )
    if not _SUBJECT.fullmatch(found):
        raise JregfixError(f"--subject {found!r}: expected a Human3.6M subject like S9 or S11")
    return VideoKey(found, m.group(2), m.group(3))


def save_tracks(path: str | Path, tracks: dict, writer: str) -> None:
    """Write a {track_id: {key: array}} track file atomically the way the tools write theirs:
    ``writer`` "joblib" (VIBE's demo: ``joblib.dump``) or "pickle" (MEVA's: ``pickle.dump``)."""
    from jregfix.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        if writer == "joblib":
            import joblib

            joblib.dump(tracks, tmp)
        elif writer == "pickle":
            with open(tmp, "wb") as fh:
                pickle.dump(tracks, fh, protocol=4)
        else:
            raise JregfixError(f"unknown track writer {writer!r}: joblib or pickle")
