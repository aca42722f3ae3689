"""Error and overlap measures: MPJPE / PA-MPJPE, box IoU, mask IoU.

MPJPE and PA-MPJPE are computed exactly as SPIN evaluates them (SPIN eval.py, pose_utils.py), in
numpy. PA-MPJPE aligns the *prediction onto the ground truth* with a similarity transform
(rotation with the reflection fix, isotropic scale, translation); the reverse direction (MEVA's
swapped call) gives a different number because the similarity fit is not symmetric.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, overload

import numpy as np

if TYPE_CHECKING:
    import torch


def joint_errors(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """pred, gt (N, K, 3) -> (N, K) Euclidean distance of each joint (input units)."""
    return np.linalg.norm(pred - gt, axis=-1)


def pa_joint_errors(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """pred, gt (N, K, 3) -> (N, K) joint distances after aligning pred onto gt per frame."""
    return joint_errors(similarity_align(pred, gt), gt)


def mpjpe(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """pred, gt (N, K, 3) -> (N,) mean over joints of the Euclidean error (input units)."""
    return joint_errors(pred, gt).mean(-1)


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
    return pa_joint_errors(pred, gt).mean(-1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of axis-aligned boxes x0, y0, x1, y1, broadcast over the leading
    axes: (K, 4) with (4,) -> (K,) (many boxes against one), (K, 4) with (K, 4) -> (K,) (pairs).
    Two empty boxes give 0."""
    lo = np.maximum(a[..., :2], b[..., :2])
    hi = np.minimum(a[..., 2:], b[..., 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    union = (
        np.prod(a[..., 2:] - a[..., :2], axis=-1)
        + np.prod(b[..., 2:] - b[..., :2], axis=-1)
        - inter
    )
    return inter / np.maximum(union, 1e-12)


@overload
def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray: ...
@overload
def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor: ...
def mask_iou(a, b):
    """Intersection over union of boolean masks over the last two axes; 1 when both are empty.

    a, b: (..., H, W) bool, both numpy arrays or both torch tensors -> (...) float64 of the
    same kind (a 0-d array for a single (H, W) pair).
    """
    inter = (a & b).sum((-2, -1))
    union = (a | b).sum((-2, -1))
    if isinstance(a, np.ndarray):
        return np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    # torch: no import needed, tensor methods only (keeps this module numpy-only to load)
    return (inter.double() / union.double().clamp_min(1)).masked_fill(union == 0, 1.0)
