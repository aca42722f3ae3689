"""Silhouette files: binary person masks at 224 in SPIN crop coordinates, bit-packed.

Keys: ``masks_packed`` (N, ceil(H*W/8)) uint8 (``np.packbits`` of each row-major mask, big bit
order), ``mask_shape`` (2,) = (H, W), ``score`` (N,) float32 detection score, ``found`` (N,) bool
(False: no person detection chosen; the mask is empty), ``imgname`` (N,) str, plus optional
per-frame extras (e.g. ``gt_row``, ``box``) carried through unchanged. A 224x224 mask takes 6,272
bytes before the npz's own zip compression.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jregfix.errors import JregfixError
from jregfix.io.atomic import save_npz
from jregfix.io.budget import check_npz

MASK_RES = 224
_KEYS = ("masks_packed", "mask_shape", "score", "found", "imgname")


class Silhouettes(NamedTuple):
    masks: np.ndarray  # (N, H, W) bool
    score: np.ndarray  # (N,) float32
    found: np.ndarray  # (N,) bool
    imgname: np.ndarray  # (N,) str


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, ceil(H*W/8)) uint8."""
    masks = np.asarray(masks)
    return np.packbits(masks.reshape(len(masks), -1).astype(bool), axis=1)


def unpack_masks(packed: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(N, ceil(H*W/8)) uint8 -> (N, H, W) bool."""
    h, w = int(shape[0]), int(shape[1])
    flat = np.unpackbits(packed, axis=1, count=h * w)
    return flat.reshape(len(packed), h, w).astype(bool)


def save_silhouettes(
    path: str | Path,
    masks: np.ndarray,
    score: np.ndarray,
    found: np.ndarray,
    imgname: np.ndarray,
    **extra: np.ndarray,
) -> None:
    """Write masks (N,H,W) bool, score (N,), found (N,), imgname (N,) (+ extras) atomically."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise JregfixError(f"masks must be (N, H, W), got shape {masks.shape}")
    save_packed_silhouettes(
        path, pack_masks(masks), masks.shape[1:], score, found, imgname, **extra
    )


def save_packed_silhouettes(
    path: str | Path,
    masks_packed: np.ndarray,
    mask_shape: tuple,
    score: np.ndarray,
    found: np.ndarray,
    imgname: np.ndarray,
    **extra: np.ndarray,
) -> None:
    """As :func:`save_silhouettes`, masks already packed with :func:`pack_masks`."""
    n = len(masks_packed)
    arrays: dict[str, np.ndarray] = {
        "masks_packed": np.asarray(masks_packed, dtype=np.uint8),
        "mask_shape": np.array(mask_shape, dtype=np.int64),
        "score": np.asarray(score, dtype=np.float32).reshape(-1),
        "found": np.asarray(found, dtype=bool).reshape(-1),
        "imgname": np.asarray(imgname).astype(str).reshape(-1),
    }
    arrays.update({k: np.asarray(v) for k, v in extra.items()})
    bad = {k: v.shape for k, v in arrays.items() if k != "mask_shape" and len(v) != n}
    if bad:
        raise JregfixError(f"silhouette arrays disagree on the frame count {n}: {bad}")
    h, w = arrays["mask_shape"]
    if arrays["masks_packed"].shape != (n, -(-h * w // 8)):
        raise JregfixError(
            f"masks_packed {arrays['masks_packed'].shape} does not hold {h}x{w} masks"
        )
    save_npz(path, compressed=True, **arrays)


def load_silhouettes(path: str | Path) -> Silhouettes:
    """Read a silhouettes npz -> (masks (N,H,W) bool, score (N,), found (N,) bool, imgname)."""
    path = Path(path)
    if not path.is_file():
        raise JregfixError(f"{path}: no such file")
    check_npz(path, "silhouettes npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in _KEYS if k not in z.files]
            if missing:
                raise JregfixError(
                    f"{path}: not a silhouettes file: missing {missing}; found {sorted(z.files)}"
                )
            arrays = {k: z[k] for k in _KEYS}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise JregfixError(f"{path}: not a readable npz file ({exc})") from None
    shape = tuple(int(v) for v in arrays["mask_shape"])
    n = len(arrays["masks_packed"])
    if len(shape) != 2 or arrays["masks_packed"].shape[1:] != (-(-shape[0] * shape[1] // 8),):
        raise JregfixError(
            f"{path}: masks_packed {arrays['masks_packed'].shape} does not hold "
            f"masks of shape {shape}"
        )
    for key in ("score", "found", "imgname"):
        if arrays[key].shape != (n,):
            raise JregfixError(f"{path}: '{key}' has shape {arrays[key].shape}, expected ({n},)")
    return Silhouettes(
        unpack_masks(arrays["masks_packed"], shape),
        arrays["score"],
        arrays["found"].astype(bool),
        arrays["imgname"].astype(str),
    )
