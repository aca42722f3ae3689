"""A synthetic SMPL-format body model: honest fixtures for tests, benchmarks and examples.

The real SMPL files are licensed, so tests build a stand-in with the same format and sizes:
6890 vertices and 13776 faces (a closed genus-0 surface), SMPL's 24-joint kinematic tree,
4-bone skinning weights, 10 shape and 207 pose blend shapes, and a sparse (24, 6890)
J_regressor. The surface is star-shaped around the torso: a UV sphere (82 rings x 84 columns +
2 poles) whose radius along each ray is the far boundary of a union of capsules placed on a
T-pose skeleton, so it has a head, arms and legs in the right places. It is a body-like blob,
not a human scan; every number computed on it is synthetic.

``uv_sphere`` and ``body_blob`` give closed genus-0 meshes of any size (renderer tests and
benchmarks; ``body_blob()`` has the SMPL counts, ``body_blob(108, 127)`` about Anny's).
:mod:`jregfix.io.smpl_write` writes the model dict in the released file layouts.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse
import torch

SMPL_PARENTS = (-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21)

# Rest joints (metres, y up, +x is the body's left), roughly SMPL's neutral T-pose.
REST_JOINTS = np.array(
    [
        [0.0, 0.0, 0.0],
        [0.07, -0.09, 0.0],
        [-0.07, -0.09, 0.0],
        [0.0, 0.11, -0.01],
        [0.10, -0.47, 0.0],
        [-0.10, -0.47, 0.0],
        [0.0, 0.25, 0.0],
        [0.10, -0.87, -0.03],
        [-0.10, -0.87, -0.03],
        [0.0, 0.30, 0.01],
        [0.12, -0.92, 0.10],
        [-0.12, -0.92, 0.10],
        [0.0, 0.50, -0.01],
        [0.08, 0.42, 0.0],
        [-0.08, 0.42, 0.0],
        [0.0, 0.57, 0.04],
        [0.17, 0.45, -0.01],
        [-0.17, 0.45, -0.01],
        [0.43, 0.43, -0.02],
        [-0.43, 0.43, -0.02],
        [0.68, 0.43, -0.01],
        [-0.68, 0.43, -0.01],
        [0.77, 0.42, -0.01],
        [-0.77, 0.42, -0.01],
    ]
)

# Capsules (joint a, joint b or a point offset, radius) making up the body volume.
_CAPSULES = [
    (0, 3, 0.13),
    (3, 6, 0.14),
    (6, 9, 0.15),
    (9, 12, 0.10),
    (13, 14, 0.09),
    (1, 4, 0.08),
    (2, 5, 0.08),
    (4, 7, 0.055),
    (5, 8, 0.055),
    (7, 10, 0.045),
    (8, 11, 0.045),
    (16, 18, 0.05),
    (17, 19, 0.05),
    (18, 20, 0.04),
    (19, 21, 0.04),
    (20, 22, 0.035),
    (21, 23, 0.035),
    (12, 15, 0.06),
    (15, -1, 0.10),
]
_HEAD_TOP = np.array([0.0, 0.72, 0.03])

N_RINGS, N_COLUMNS = 82, 84


def sphere_mesh() -> tuple[np.ndarray, np.ndarray]:
    """Unit UV sphere with 82 x 84 + 2 = 6890 vertices and 13776 outward triangles, poles on y."""
    v, f = uv_sphere(N_RINGS, N_COLUMNS, torch.float64)
    # (x, y, z) -> (x, z, y) puts the poles on y; the swap mirrors, so the winding flips too.
    return v[:, [0, 2, 1]].numpy(), f[:, [0, 2, 1]].numpy()


def uv_sphere(rings: int, segments: int, dtype: torch.dtype = torch.float32):
    """Unit UV sphere: ``rings`` latitude circles of ``segments`` vertices plus two poles.

    Returns vertices (rings * segments + 2, 3) and faces (2 * rings * segments, 3) int64, i.e.
    F = 2 V - 4 (closed, genus 0), consistently oriented (outward normals).
    """
    theta = torch.arange(1, rings + 1, dtype=torch.float64) * (math.pi / (rings + 1))
    phi = torch.arange(segments, dtype=torch.float64) * (2 * math.pi / segments)
    st, ct = theta.sin()[:, None], theta.cos()[:, None]
    ring = torch.stack([st * phi.cos(), st * phi.sin(), ct.expand(-1, segments)], -1)
    verts = torch.cat(
        [
            torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64),
            ring.reshape(-1, 3),
            torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64),
        ]
    )
    j = torch.arange(segments)
    jn = (j + 1) % segments
    top = torch.stack([torch.zeros_like(j), 1 + j, 1 + jn], 1)
    r = torch.arange(rings - 1)[:, None]
    a, b = 1 + r * segments + j, 1 + r * segments + jn
    c, d = a + segments, b + segments
    quads = torch.cat([torch.stack([a, c, d], -1), torch.stack([a, d, b], -1)], 1).reshape(-1, 3)
    south = verts.shape[0] - 1
    last = 1 + (rings - 1) * segments
    bottom = torch.stack([torch.full_like(j, south), last + jn, last + j], 1)
    return verts.to(dtype), torch.cat([top, quads, bottom]).long()


def body_blob(rings: int = 82, segments: int = 84, dtype: torch.dtype = torch.float32):
    """A lumpy, person-sized (about 1.7 x 0.6 m) closed mesh in SPIN's camera orientation.

    Default size: 6890 vertices / 13776 faces, the SMPL counts; ``body_blob(108, 127)`` gives
    13718 vertices / 27432 faces (Anny has 13718 / 27420 but is not closed). Vertex y is the long
    axis pointing down the image (y down), centred at the origin.
    """
    v, f = uv_sphere(rings, segments, torch.float64)
    x, y, z = v.unbind(-1)
    phi = torch.atan2(y, x)
    # Radial bumps (head/shoulder/hip-like waist) and a flattened torso, all smooth.
    bump = 1.0 + 0.18 * torch.cos(3 * phi) * (1 - z * z) + 0.25 * torch.cos(5 * z) ** 2 * x.abs()
    out = torch.stack([0.3 * x * bump, -0.85 * z, 0.15 * y * bump], -1)
    return out.to(dtype), f


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
    seg_b = np.array(
        [
            REST_JOINTS[children[j][0]]
            if children[j]
            else REST_JOINTS[j] + 0.6 * (REST_JOINTS[j] - REST_JOINTS[SMPL_PARENTS[j]])
            for j in range(24)
        ]
    )
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
    posedirs = 0.002 * np.sin(
        v_template @ rng.normal(size=(3, 3 * 207)) + rng.uniform(0, 2 * np.pi, size=3 * 207)
    ).reshape(n_verts, 3, 207)

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

    kintree = np.array(
        [[2**32 - 1 if p < 0 else p for p in SMPL_PARENTS], list(range(24))], dtype=np.int64
    )
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
