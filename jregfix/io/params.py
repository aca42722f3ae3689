"""Body-parameter files: the npz every stage exchanges (spin, refine, demo; architecture.md).

Keys: ``pose`` (N,72) axis-angle and/or ``pred_rotmat``/``rotmat`` (N,24,3,3) and/or ``pose_6d``
(N,144); ``betas`` (N,10); optional ``camera`` (N,3) weak perspective (s,tx,ty), ``cam_t``
(N,3), ``vertices`` (N,V,3), ``imgname`` (N,).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jregfix.errors import JregfixError
from jregfix.io.atomic import read_npz

POSE_KEYS = ("pred_rotmat", "rotmat", "pose", "pose_6d")
# plausibility limits: beyond them a file holds another unit or garbage, not a body
MAX_POSE = 100.0  # |axis-angle| in radians (rotation matrix and 6D entries are within 1)
MAX_BETA = 100.0  # shape coefficients are a few standard deviations
MAX_METRES = 100.0


@dataclass
class BodyParams:
    """Per-frame body parameters. ``pose`` is kept in the file's layout (axis-angle (N,3J),
    6D (N,6J)/(N,J,6) or rotation matrices (N,J,3,3)); the body layer's ``pose_to_rotmat``
    converts any of them."""

    pose: np.ndarray | None
    betas: np.ndarray | None
    camera: np.ndarray | None = None
    cam_t: np.ndarray | None = None
    vertices: np.ndarray | None = None
    imgname: np.ndarray | None = None
    path: str = ""

    def __len__(self) -> int:
        for a in (self.pose, self.vertices):
            if a is not None:
                return len(a)
        return 0

    def select(self, index: np.ndarray) -> BodyParams:
        def pick(a):
            return None if a is None else a[index]

        return BodyParams(
            pick(self.pose),
            pick(self.betas),
            pick(self.camera),
            pick(self.cam_t),
            pick(self.vertices),
            pick(self.imgname),
            self.path,
        )


def params_from_arrays(
    arrays: dict, path: str = "", num_joints: int = 24, require_pose: bool = True
) -> BodyParams:
    """Validate arrays (from an npz or a pickle track): keys, row counts, shapes, finiteness."""
    pose_key = next((k for k in POSE_KEYS if k in arrays and arrays[k] is not None), None)
    has_verts = arrays.get("vertices", arrays.get("verts")) is not None
    if pose_key is None and (require_pose or not has_verts):
        raise JregfixError(
            f"{path}: no pose found; expected one of {list(POSE_KEYS)}"
            + ("" if require_pose else " or 'vertices'")
        )
    pose = None
    n = None
    if pose_key is not None:
        pose = _numeric(arrays[pose_key], path, pose_key)
        n = len(pose)
        tail = pose.shape[1:]
        j = num_joints
        if tail not in ((3 * j,), (6 * j,), (9 * j,), (j, 3), (j, 6), (j, 3, 3)):
            raise JregfixError(
                f"{path}: key '{pose_key}' has shape {pose.shape}; expected "
                f"(N,{3 * j}) axis-angle, (N,{j},6) 6D or (N,{j},3,3) rotations"
            )
        _check_finite(pose, path, pose_key)
        _check_below(
            np.abs(pose),
            MAX_POSE,
            path,
            pose_key,
            "has values beyond 100 (radians, or matrix entries): not a pose",
        )
    betas = arrays.get("betas", arrays.get("shape"))
    if betas is not None:
        betas = _numeric(betas, path, "betas")
        _check_rows(betas, n, path, "betas", ndim=2)
        _check_finite(betas, path, "betas")
        _check_below(
            np.abs(betas),
            MAX_BETA,
            path,
            "betas",
            "has values beyond 100 (shape coefficients are a few units)",
        )
        n = len(betas) if n is None else n
    elif pose is not None:
        raise JregfixError(f"{path}: key 'betas' is missing")
    verts = arrays.get("vertices", arrays.get("verts"))
    if verts is not None:
        verts = _numeric(verts, path, "vertices").astype(np.float32)
        if verts.ndim != 3 or verts.shape[-1] != 3:
            raise JregfixError(f"{path}: vertices have shape {verts.shape}, expected (N,V,3)")
        _check_rows(verts, n, path, "vertices", ndim=3)
        _check_finite(verts, path, "vertices")
        _check_below(
            np.abs(verts), MAX_METRES, path, "vertices", "has points beyond 100 m (metres expected)"
        )
    out = {}
    for key, width in (("camera", 3), ("cam_t", 3)):
        a = arrays.get(key)
        if a is not None:
            a = _numeric(a, path, key)
            if a.ndim != 2 or a.shape != (len(a), width):
                raise JregfixError(f"{path}: key '{key}' has shape {a.shape}, expected (N,{width})")
            _check_rows(a, n if n is not None else len(a), path, key, ndim=2)
            _check_finite(a, path, key)
            # depth (cam_t z) and weak-perspective scale s (depth = 2 f / (224 s)) must be > 0:
            # a body at or behind the camera cannot be projected
            _check_below(
                -a[:, 2 if key == "cam_t" else 0],
                0,
                path,
                key,
                "puts the body at or behind the camera (depth or scale <= 0)",
                strict=False,
            )
            out[key] = a
    imgname = arrays.get("imgname")
    rows = n if n is not None else (len(verts) if verts is not None else None)
    if imgname is not None and rows is not None and np.shape(imgname) != (rows,):
        raise JregfixError(
            f"{path}: 'imgname' has shape {np.shape(imgname)} but there are "
            f"{rows} rows of parameters; they must be one name per row"
        )
    return BodyParams(
        pose,
        betas,
        out.get("camera"),
        out.get("cam_t"),
        verts,
        None if imgname is None else np.asarray(imgname).astype(str),
        path,
    )


def load_params(path: str | Path, num_joints: int = 24, require_pose: bool = True) -> BodyParams:
    return params_from_arrays(read_npz(path), str(path), num_joints, require_pose)


def _numeric(a, path: str, key: str) -> np.ndarray:
    """float64 copy of a real-valued array; strings, complex and objects are refused."""
    a = np.asarray(a)
    if a.dtype.kind not in "iuf":
        raise JregfixError(f"{path}: key '{key}' has dtype {a.dtype}; expected real numbers")
    return a.astype(np.float64)


def _check_below(
    a: np.ndarray, limit: float, path: str, key: str, why: str, strict: bool = True
) -> None:
    """Refuse rows with a value above ``limit`` (``strict``) or at/above it."""
    bad = (a > limit) if strict else (a >= limit)
    rows = np.flatnonzero(bad.reshape(len(a), -1).any(1))
    if len(rows):
        raise JregfixError(
            f"{path}: key '{key}' {why} in {len(rows)} row(s), first at row {rows[0]}"
        )


def _check_rows(a: np.ndarray, n: int | None, path: str, key: str, ndim: int) -> None:
    if a.ndim != ndim:
        raise JregfixError(f"{path}: key '{key}' has shape {a.shape}, expected {ndim} dimensions")
    if n is not None and len(a) != n:
        raise JregfixError(f"{path}: key '{key}' has {len(a)} rows but the pose has {n}")


def _check_finite(a: np.ndarray, path: str, key: str) -> None:
    if not np.isfinite(a).all():
        bad = np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(1))
        raise JregfixError(
            f"{path}: key '{key}' has NaN/inf in {len(bad)} row(s), first at row {bad[0]}"
        )
