"""Refuse an npz before numpy allocates what its headers declare, name non-npz files, and
refuse arrays that are not finite real numbers.

Each ``.npy`` member of an npz starts with a header giving dtype and shape; numpy allocates the
whole array from it before reading a byte of data, so a 1 kB file declaring (1e9, 24, 4) would
ask for 715 GiB. A member may hold no more than its recorded uncompressed size (which deflate
cannot make more than ~1032 times the compressed size), nor more than an absolute cap
(``$JREGFIX_MAX_ARRAY_BYTES``, default 32 GiB: Human3.6M's largest array is ~0.3 GB).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from jregfix.errors import JregfixError

CAP_ENV = "JREGFIX_MAX_ARRAY_BYTES"
DEFAULT_CAP = 32 << 30
DEFLATE_MAX_RATIO = 1100  # deflate's ceiling is 1032:1; a little slack for headers


def array_byte_cap() -> int:
    """The absolute cap on one array's bytes (``$JREGFIX_MAX_ARRAY_BYTES`` overrides it)."""
    text = os.environ.get(CAP_ENV)
    if not text:
        return DEFAULT_CAP
    try:
        return int(float(text))
    except ValueError:
        raise JregfixError(f"{CAP_ENV}={text!r}: expected a number of bytes") from None


def sniff_format(head: bytes) -> str | None:
    """A guess at what a file that is not a zip archive really is (for the message)."""
    text = head.lstrip()
    if text[:1] in (b"{", b"["):
        return "JSON"
    if head.startswith(b"\x93NUMPY"):
        return "a single .npy array"
    if head[:1] == b"\x80" or head.startswith((b"(dp", b"(lp", b"ccopy_reg")):
        return "a pickle"
    if head.startswith(b"\x89HDF"):
        return "HDF5"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff")):
        return "an image"
    if not head:
        return "an empty file"
    return None


def check_npz(path: str | os.PathLike, what: str = "npz file") -> None:
    """Raise unless ``path`` is a zip whose ``.npy`` members declare plausible sizes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
        if not zipfile.is_zipfile(path):
            looks = sniff_format(head)
            why = f"looks like {looks}" if looks else "not a zip archive"
            raise JregfixError(f"{path}: not an npz ({why}); a {what} was expected here")
        cap = array_byte_cap()
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".npy"):
                    _check_member(path, zf, info, cap)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise JregfixError(f"{path}: not a readable {what} ({exc})") from None


def _check_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> None:
    key = info.filename[:-4]
    with zf.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(member)
        except ValueError as exc:
            raise JregfixError(
                f"{path}: member '{key}' has a broken array header ({exc})"
            ) from None
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    stored_bytes = info.compress_size * (DEFLATE_MAX_RATIO if info.compress_type else 1)
    limit = min(cap, info.file_size, stored_bytes)
    if declared > limit:
        raise JregfixError(
            f"{path}: member '{key}' declares shape {tuple(shape)} {dtype} ({declared:,} bytes) "
            f"but the file can hold at most {limit:,}; the file is corrupt or hostile "
            f"(a genuine array over the {cap:,}-byte cap needs {CAP_ENV} raised)"
        )


def check_numbers(a: np.ndarray, what: str) -> None:
    """Refuse non-numeric dtypes (strings, complex, objects) and NaN/inf, naming ``what``."""
    if a.dtype.kind not in "iuf":
        raise JregfixError(f"{what} has dtype {a.dtype}; expected real numbers")
    if not np.isfinite(a).all():
        rows = np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(1)) if a.ndim else [0]
        raise JregfixError(
            f"{what} contains NaN or inf ({len(rows)} row(s), first at row {rows[0]})"
        )
