"""MPJPE and PA-MPJPE exactly as SPIN evaluates them (SPIN eval.py, pose_utils.py), in numpy.

PA-MPJPE aligns the *prediction onto the ground truth* with a similarity transform (rotation
with the reflection fix, isotropic scale, translation); the reverse direction (MEVA's swapped
call) gives a different number because the similarity fit is not symmetric.
"""

from __future__ import annotations

import numpy as np


def mpjpe(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """pred, gt (N, K, 3) -> (N,) mean over joints of the Euclidean error (input units)."""
    return np.linalg.norm(pred - gt, axis=-1).mean(-1)


def similarity_align(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Similarity Procrustes of pred onto gt, per sample: (N, K, 3), (N, K, 3) -> (N, K, 3)."""
    mu1 = pred.mean(1, keepdims=True)
    mu2 = gt.mean(1, keepdims=True)
    x1 = pred - mu1
    x2 = gt - mu2
    var1 = (x1 * x1).sum((1, 2))
    k = np.einsum("nki,nkj->nij", x1, x2)  # X1ᵀ X2 with points as rows = SPIN's X1 X2ᵀ
    u, _, vt = np.linalg.svd(k)
    v = np.swapaxes(vt, 1, 2)
    z = np.tile(np.eye(3), (len(pred), 1, 1))
    z[:, 2, 2] = np.sign(np.linalg.det(u @ vt))
    r = v @ z @ np.swapaxes(u, 1, 2)  # rotation acting on column vectors: x -> R x
    scale = np.einsum("nii->n", r @ k) / np.maximum(var1, 1e-300)
    t = mu2[:, 0] - scale[:, None] * np.einsum("nij,nj->ni", r, mu1[:, 0])
    return scale[:, None, None] * np.einsum("nij,nkj->nki", r, pred) + t[:, None, :]


def pa_mpjpe(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(N, K, 3) x 2 -> (N,) MPJPE after aligning pred onto gt (SPIN's reconstruction error)."""
    return mpjpe(similarity_align(pred, gt), gt)
