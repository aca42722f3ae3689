"""Error models of the synthetic world: what a detector does to masks and what each method
does to poses, shapes and cameras.

* Masks: per frame a 1 px dilation, erosion or neither, then boundary pixels flipped with
  probability ``flip`` (:func:`corrupt_masks`).
* SPIN-like (:func:`spin_like`): independent per-frame noise on every rotation, betas pulled
  towards the mean body, camera depth and offset noise.
* VIBE-like and MEVA-like (:func:`track_like`): noise smoothed over a few frames of each track
  plus a little white noise, one shape error per track; MEVA-like with smoother noise and
  slightly under-articulated poses (body rotations shrunk towards the rest pose).

Rotations are (N, J, 3, 3) in SPIN's camera-frame parameterisation (root = global orientation in
the camera frame); betas are Anny phenotype offsets (N, 6); ``cam_t`` (N, 3) metres.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from jregfix.body.anny import DEFAULT_PHENOTYPE, PHENOTYPE_RANGE, PHENOTYPES


def clip_betas(betas: np.ndarray) -> np.ndarray:
    """Keep phenotype offsets inside Anny's ranges (beyond them Anny clamps anyway)."""
    base = np.asarray(DEFAULT_PHENOTYPE)
    lo = np.array([PHENOTYPE_RANGE[k][0] for k in PHENOTYPES]) - base
    hi = np.array([PHENOTYPE_RANGE[k][1] for k in PHENOTYPES]) - base
    return np.clip(betas, lo, hi)


def noisy_rotations(
    rot: np.ndarray, body_noise: np.ndarray, root_noise: np.ndarray, shrink: float = 1.0
) -> np.ndarray:
    """rot (N,J,3,3) camera-frame params; body noise (N,J-1,3) local, root noise (N,3) in the
    camera frame; ``shrink`` scales body rotations towards the rest pose first."""
    out = rot.copy()
    if shrink != 1.0:
        aa = Rotation.from_matrix(rot[:, 1:].reshape(-1, 3, 3)).as_rotvec() * shrink
        out[:, 1:] = Rotation.from_rotvec(aa).as_matrix().reshape(rot[:, 1:].shape)
    n, j = rot.shape[:2]
    local = Rotation.from_rotvec(body_noise.reshape(-1, 3)).as_matrix().reshape(n, j - 1, 3, 3)
    out[:, 1:] = out[:, 1:] @ local
    out[:, 0] = Rotation.from_rotvec(root_noise).as_matrix() @ out[:, 0]
    return out


def smoothed_noise(
    rng: np.random.Generator,
    tracks: list[np.ndarray],
    shape: tuple[int, ...],
    std: float,
    sigma: float,
) -> np.ndarray:
    """Stationary Gaussian noise, smoothed in time within each track, marginal std ``std``.

    White noise is drawn over the track padded by 4 sigma on both sides, filtered, and the
    middle kept, so short tracks are as noisy as long ones; the filter's gain on white noise,
    sqrt(sum k^2) for its kernel k, is divided out.
    """
    pad = int(4 * sigma + 1) if sigma > 0 else 0
    gain = 1.0
    if sigma > 0:
        impulse = np.zeros(2 * pad + 1)
        impulse[pad] = 1.0
        gain = float(np.sqrt((ndimage.gaussian_filter1d(impulse, sigma) ** 2).sum()))
    out = np.zeros((sum(len(t) for t in tracks), *shape))
    for rows in tracks:
        white = rng.normal(0, 1, (len(rows) + 2 * pad, *shape))
        if sigma > 0:
            white = ndimage.gaussian_filter1d(white, sigma, axis=0) / gain
        out[rows] = white[pad : pad + len(rows)] * std
    return out


def corrupt_masks(masks: np.ndarray, rng: np.random.Generator, flip: float) -> np.ndarray:
    """Per frame: 1 px dilation (p = 1/4), erosion (1/4) or neither, then boundary pixels
    flipped with probability ``flip``."""
    out = np.empty_like(masks)
    for i, m in enumerate(masks):
        op = rng.integers(4)
        if op == 1:
            m = ndimage.binary_dilation(m)
        elif op == 2:
            m = ndimage.binary_erosion(m)
        band = ndimage.binary_dilation(m) & ~ndimage.binary_erosion(m)
        out[i] = m ^ (band & (rng.random(m.shape) < flip))
    return out


def spin_like(
    rot: np.ndarray,
    betas: np.ndarray,
    cam_t: np.ndarray,
    rng: np.random.Generator,
    *,
    pose_std: float,
    root_std: float,
    shape_pull: float,
    shape_std: float,
    cam_std: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame independent errors: (rotations, betas, cam_t) of a SPIN-like method.

    Body rotations get local axis-angle noise of std ``pose_std`` (rad), the root ``root_std``;
    betas become ``shape_pull`` x the truth + noise; depth is scaled by exp(N(0, cam_std)) and
    tx, ty get N(0, 0.3 cam_std) metres.
    """
    n, j = rot.shape[:2]
    out_rot = noisy_rotations(
        rot, rng.normal(0, pose_std, (n, j - 1, 3)), rng.normal(0, root_std, (n, 3))
    )
    out_betas = clip_betas(shape_pull * betas + rng.normal(0, shape_std, betas.shape))
    out_t = cam_t.copy()
    out_t[:, 2] *= np.exp(rng.normal(0, cam_std, n))
    out_t[:, :2] += rng.normal(0, 0.3 * cam_std, (n, 2))
    return out_rot, out_betas, out_t


def track_like(
    rot: np.ndarray,
    betas: np.ndarray,
    cam_t: np.ndarray,
    tracks: list[np.ndarray],
    rng: np.random.Generator,
    *,
    pose_std: float,
    smooth: float,
    shrink: float,
    shape_pull: float,
    shape_std: float,
    cam_std: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Temporally smoothed errors within each track (rows ``tracks[k]``): (rotations, betas,
    cam_t) of a VIBE/MEVA-like method.

    Body noise: Gaussian-smoothed (sigma ``smooth`` frames) of std ``pose_std`` plus white noise
    of a quarter of it, after shrinking the rotations by ``shrink``; root noise half as large;
    one shape error per track; smoothed depth noise.
    """
    n, j = rot.shape[:2]
    body_noise = smoothed_noise(rng, tracks, (j - 1, 3), pose_std, smooth)
    body_noise += rng.normal(0, 0.25 * pose_std, body_noise.shape)
    root_noise = smoothed_noise(rng, tracks, (3,), 0.5 * pose_std, smooth)
    out_rot = noisy_rotations(rot, body_noise, root_noise, shrink)
    per_track = np.zeros_like(betas)
    for rows in tracks:
        per_track[rows] = rng.normal(0, shape_std, betas.shape[1])
    out_betas = clip_betas(shape_pull * betas + per_track)
    out_t = cam_t.copy()
    out_t[:, 2] *= np.exp(smoothed_noise(rng, tracks, (), cam_std, smooth))
    return out_rot, out_betas, out_t
