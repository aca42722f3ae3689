"""A synthetic SMPL-format body model: honest fixtures for tests, benchmarks and examples.

The real SMPL files are licensed, so tests build a stand-in with the same format and sizes:
6890 vertices and 13776 faces (a closed genus-0 surface), SMPL's 24-joint kinematic tree,
4-bone skinning weights, 10 shape and 207 pose blend shapes, and a sparse (24, 6890)
J_regressor. The surface is star-shaped around the torso: a UV sphere (82 rings x 84 columns +
2 poles) whose radius along each ray is the far boundary of a union of capsules placed on a
T-pose skeleton, so it has a head, arms and legs in the right places. It is a body-like blob,
not a human scan; every number computed on it is synthetic.
"""

from __future__ import annotations

import copyreg
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import scipy.sparse

from jregfix.io.atomic import atomic_path

SMPL_PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21)

# Rest joints (metres, y up, +x is the body's left), roughly SMPL's neutral T-pose.
REST_JOINTS = np.array([
    [0.0, 0.0, 0.0], [0.07, -0.09, 0.0], [-0.07, -0.09, 0.0], [0.0, 0.11, -0.01],
    [0.10, -0.47, 0.0], [-0.10, -0.47, 0.0], [0.0, 0.25, 0.0], [0.10, -0.87, -0.03],
    [-0.10, -0.87, -0.03], [0.0, 0.30, 0.01], [0.12, -0.92, 0.10], [-0.12, -0.92, 0.10],
    [0.0, 0.50, -0.01], [0.08, 0.42, 0.0], [-0.08, 0.42, 0.0], [0.0, 0.57, 0.04],
    [0.17, 0.45, -0.01], [-0.17, 0.45, -0.01], [0.43, 0.43, -0.02], [-0.43, 0.43, -0.02],
    [0.68, 0.43, -0.01], [-0.68, 0.43, -0.01], [0.77, 0.42, -0.01], [-0.77, 0.42, -0.01],
])

# Capsules (joint a, joint b or a point offset, radius) making up the body volume.
_CAPSULES = [
    (0, 3, 0.13), (3, 6, 0.14), (6, 9, 0.15), (9, 12, 0.10), (13, 14, 0.09),
    (1, 4, 0.08), (2, 5, 0.08), (4, 7, 0.055), (5, 8, 0.055), (7, 10, 0.045), (8, 11, 0.045),
    (16, 18, 0.05), (17, 19, 0.05), (18, 20, 0.04), (19, 21, 0.04), (20, 22, 0.035),
    (21, 23, 0.035), (12, 15, 0.06), (15, -1, 0.10),
]
_HEAD_TOP = np.array([0.0, 0.72, 0.03])

N_RINGS, N_COLUMNS = 82, 84


def sphere_mesh() -> tuple[np.ndarray, np.ndarray]:
    """Unit UV sphere with 82 x 84 + 2 = 6890 vertices and 13776 outward triangles."""
    polar = np.pi * (np.arange(N_RINGS) + 1) / (N_RINGS + 1)
    azim = 2 * np.pi * np.arange(N_COLUMNS) / N_COLUMNS
    p, a = np.meshgrid(polar, azim, indexing="ij")
    ring = np.stack([np.sin(p) * np.cos(a), np.cos(p), np.sin(p) * np.sin(a)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0.0, 1.0, 0.0]], ring, [[0.0, -1.0, 0.0]]])
    top, bottom = 0, len(verts) - 1
    idx = lambda r, c: 1 + r * N_COLUMNS + (c % N_COLUMNS)  # noqa: E731
    faces = []
    for c in range(N_COLUMNS):
        faces.append((top, idx(0, c + 1), idx(0, c)))
        faces.append((bottom, idx(N_RINGS - 1, c), idx(N_RINGS - 1, c + 1)))
        for r in range(N_RINGS - 1):
            a0, a1, b0, b1 = idx(r, c), idx(r, c + 1), idx(r + 1, c), idx(r + 1, c + 1)
            faces.append((a0, a1, b1))
            faces.append((a0, b1, b0))
    return verts, np.asarray(faces, dtype=np.int64)


def _capsule_segments() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.array([REST_JOINTS[i] for i, _, _ in _CAPSULES])
    b = np.array([REST_JOINTS[j] if j >= 0 else _HEAD_TOP for _, j, _ in _CAPSULES])
    r = np.array([rad for _, _, rad in _CAPSULES])
    return a, b, r


def _segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """points (..., 3), segments a, b (K, 3) -> distances (..., K)."""
    ab = b - a
    t = np.clip(((points[..., None, :] - a) * ab).sum(-1) / (ab * ab).sum(-1), 0.0, 1.0)
    closest = a + t[..., None] * ab
    return np.linalg.norm(points[..., None, :] - closest, axis=-1)


def body_surface(directions: np.ndarray, centre=(0.0, 0.15, 0.0)) -> np.ndarray:
    """Far boundary of the capsule union along rays from ``centre`` (star-shaped surface)."""
    centre = np.asarray(centre)
    a, b, r = _capsule_segments()

    def far_inside(lo: np.ndarray, step: float, count: int) -> np.ndarray:
        ts = lo[:, None] + step * np.arange(count)[None]
        pts = centre + ts[..., None] * directions[:, None, :]
        inside = (_segment_distance(pts, a, b) <= r).any(-1)
        last = np.where(inside, np.arange(count)[None], 0).max(1)
        return lo + step * last

    # Coarse 2 cm march, then 0.5 mm inside the last coarse step: the far boundary per ray.
    coarse = far_inside(np.zeros(len(directions)), 0.02, 66)
    radius = far_inside(coarse, 0.0005, 41)
    return centre + radius[:, None] * directions


def make_smpl_like_model(seed: int = 0) -> dict:
    """A dict with the released SMPL pickle's keys and shapes (numpy / scipy.sparse values)."""
    rng = np.random.default_rng(seed)
    directions, faces = sphere_mesh()
    v_template = body_surface(directions)
    n_verts = len(v_template)

    # Skinning: Gaussian falloff of the distance to each joint's bone, 4 largest kept.
    children = {j: [c for c, p in enumerate(SMPL_PARENTS) if p == j] for j in range(24)}
    seg_a = REST_JOINTS.copy()
    seg_b = np.array([REST_JOINTS[children[j][0]] if children[j] else REST_JOINTS[j] +
                      0.6 * (REST_JOINTS[j] - REST_JOINTS[SMPL_PARENTS[j]]) for j in range(24)])
    seg_b[0] = REST_JOINTS[3]  # pelvis bone points up the spine
    d = _segment_distance(v_template, seg_a, seg_b)
    w = np.exp(-((d / 0.05) ** 2)) + 1e-12
    keep = np.argsort(-w, axis=1)[:, :4]
    weights = np.zeros_like(w)
    np.put_along_axis(weights, keep, np.take_along_axis(w, keep, 1), 1)
    weights /= weights.sum(1, keepdims=True)

    # Shape blend shapes: height, girth, then smooth random fields (centimetre scale).
    shapedirs = np.zeros((n_verts, 3, 10))
    shapedirs[:, 1, 0] = 0.06 * v_template[:, 1]
    axis_offset = v_template - seg_a[np.argmax(weights, 1)]
    axis_offset[:, 1] = 0
    shapedirs[:, :, 1] = 0.15 * axis_offset
    freq = rng.normal(size=(8, 3, 3)) * 2.0
    phase = rng.uniform(0, 2 * np.pi, size=(8, 3))
    for k in range(8):
        shapedirs[:, :, k + 2] = 0.01 * np.sin(v_template @ freq[k] + phase[k])
    posedirs = 0.002 * np.sin(v_template @ rng.normal(size=(3, 3 * 207)) + rng.uniform(
        0, 2 * np.pi, size=3 * 207)).reshape(n_verts, 3, 207)

    # Joint regressor: the 12 vertices nearest each joint, inverse-distance weights, rows sum to 1.
    rows, cols, vals = [], [], []
    for j in range(24):
        dist = np.linalg.norm(v_template - REST_JOINTS[j], axis=1)
        near = np.argsort(dist)[:12]
        wj = 1.0 / (dist[near] + 1e-3)
        rows += [j] * 12
        cols += near.tolist()
        vals += (wj / wj.sum()).tolist()
    j_regressor = scipy.sparse.csc_matrix((vals, (rows, cols)), shape=(24, n_verts))

    kintree = np.array([[2**32 - 1 if p < 0 else p for p in SMPL_PARENTS], list(range(24))],
                       dtype=np.int64)
    return {
        "v_template": v_template,
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "J_regressor": j_regressor,
        "J": j_regressor @ v_template,
        "weights": weights,
        "kintree_table": kintree,
        "f": faces.astype(np.uint32),
        "bs_type": "lrotmin",
        "bs_style": "lbs",
    }


def write_released_style_pickle(path: str | Path, model: dict) -> None:
    """Write ``model`` as the released SMPL pickles are: protocol 2, ``shapedirs`` (and
    ``v_template``, ``weights``, ``posedirs``, ``J``) as chumpy ``Ch`` objects carrying the array in
    their ``x`` state, ``J_regressor`` as a ``scipy.sparse.csc.csc_matrix`` by that old name.
    Protocol 2 with Python 3's import fixing writes ``copyreg`` as Python 2's ``copy_reg``.
    """
    ch_mod = types.ModuleType("chumpy.ch")
    csc_mod = types.ModuleType("scipy.sparse.csc")

    class Ch:  # pickled by reference as chumpy.ch.Ch
        def __init__(self, x):
            self.x = x

        def __reduce_ex__(self, protocol):
            return (copyreg._reconstructor, (Ch, object, None), {"x": self.x})

    class csc_matrix:  # noqa: N801 - the released name
        def __init__(self, m):
            self.m = m

        def __reduce_ex__(self, protocol):
            m = self.m
            state = {"_shape": m.shape, "data": m.data, "indices": m.indices,
                     "indptr": m.indptr, "maxprint": 50, "format": "csc"}
            return (copyreg._reconstructor, (csc_matrix, object, None), state)

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    csc_matrix.__module__, csc_matrix.__qualname__ = "scipy.sparse.csc", "csc_matrix"
    ch_mod.Ch, csc_mod.csc_matrix = Ch, csc_matrix
    out = {}
    for key, value in model.items():
        if key in ("shapedirs", "v_template", "weights", "posedirs", "J"):
            out[key] = Ch(np.asarray(value))
        elif scipy.sparse.issparse(value):
            out[key] = csc_matrix(scipy.sparse.csc_matrix(value))
        else:
            out[key] = value
    saved = {name: sys.modules.get(name) for name in ("chumpy", "chumpy.ch", "scipy.sparse.csc")}
    sys.modules.update({"chumpy": types.ModuleType("chumpy"), "chumpy.ch": ch_mod,
                        "scipy.sparse.csc": csc_mod})
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            pickle.dump(out, f, protocol=2)
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


def write_npz(path: str | Path, model: dict) -> None:
    """Write ``model`` in smplx's .npz layout (dense J_regressor)."""
    from jregfix.io.atomic import save_npz

    arrays = {k: (v.toarray() if scipy.sparse.issparse(v) else np.asarray(v))
              for k, v in model.items() if not isinstance(v, str)}
    save_npz(path, **arrays)
