"""Camera rig and crops of the synthetic world, like Human3.6M's capture and SPIN's boxes.

Four cameras on the corners around the capture area like Human3.6M's (azimuth 45 + 90k degrees,
4.5-5.5 m from the centre, 1.2-1.8 m high, looking at (0, 1, 0)), pinhole f = 1150 px, 1000 x 1000
px images, principal point at the centre; world frame y up, camera frame x right, y down, z
forward. A crop is the projected true mesh's bounding box: ``center`` its centre (image px) and
``scale = 1.2 max(w, h) / 200``. (SPIN shrinks Human3.6M's loose ground-truth boxes by 0.9; these
boxes are tight mesh boxes, so they are padded by 1.2 as SPIN's 3DPW preprocessing does.) The
crop of a pinhole image is itself a pinhole camera (:func:`crop_camera`); SPIN's long-focal crop
camera cannot equal it, so the ground-truth ``cam_t`` is SPIN's own kind of estimate
(:func:`estimate_translation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from jregfix.geometry.camera import PinholeCamera
from jregfix.io.h36m import CAMERAS

IMAGE_SIZE = 1000
FOCAL = 1150.0
BOX_PAD = 1.2


@dataclass(frozen=True)
class Camera:
    """World -> camera extrinsics (x right, y down, z forward) and pinhole intrinsics."""

    name: str
    rotation: np.ndarray  # (3, 3) R_cw
    translation: np.ndarray  # (3,) t_cw
    focal: float = FOCAL
    center: tuple[float, float] = (IMAGE_SIZE / 2, IMAGE_SIZE / 2)


def make_cameras(rng: np.random.Generator) -> list[Camera]:
    """Four cameras on the corners around the capture area, looking at (0, 1, 0)."""
    cams = []
    target = np.array([0.0, 1.0, 0.0])
    for k, name in enumerate(CAMERAS):
        az = np.deg2rad(45 + 90 * k + rng.uniform(-8, 8))
        dist, height = rng.uniform(4.5, 5.5), rng.uniform(1.2, 1.8)
        pos = np.array([dist * np.sin(az), height, dist * np.cos(az)])
        fwd = (target - pos) / np.linalg.norm(target - pos)
        right = np.cross(fwd, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        down = np.cross(fwd, right)
        rot = np.stack([right, down, fwd])
        cams.append(Camera(name, rot, -rot @ pos))
    return cams


def project(points: np.ndarray) -> np.ndarray:
    """Camera-frame points (..., 3) metres -> image pixels (..., 2) of a rig camera."""
    return FOCAL * points[..., :2] / points[..., 2:] + IMAGE_SIZE / 2


def crop_box(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Projected meshes (B, P, 2) px -> box centres (B, 2) and padded square sides (B,) px."""
    lo, hi = pixels.min(1), pixels.max(1)
    return (lo + hi) / 2, BOX_PAD * (hi - lo).max(1)


def to_crop(pixels: np.ndarray, center: np.ndarray, side: float, size: int) -> np.ndarray:
    """Image pixels (..., 2) -> pixels of the square crop (side ``side`` px around ``center``)
    resized to ``size`` px."""
    return size * (pixels - center) / side + size / 2


def crop_camera(center: np.ndarray, side: np.ndarray, size: int) -> PinholeCamera:
    """The exact pinhole camera of crops (B,) of a rig image: focal f size / side, principal point
    size (image centre - box centre) / side + size / 2; float64."""
    fx = FOCAL * size / side
    cx = size * (IMAGE_SIZE / 2 - center[:, 0]) / side + size / 2
    cy = size * (IMAGE_SIZE / 2 - center[:, 1]) / side + size / 2
    return PinholeCamera.from_intrinsics(
        torch.from_numpy(fx),
        torch.from_numpy(fx),
        torch.from_numpy(cx),
        torch.from_numpy(cy),
        dtype=torch.float64,
    )


def estimate_translation(
    points: np.ndarray, pixels: np.ndarray, focal: float, res: int
) -> np.ndarray:
    """SPIN-style cam_t: least squares t with focal*(p + t)_xy/(p + t)_z + res/2 = pixels.

    points (P, 3) camera-oriented, root-relative; pixels (P, 2) crop px. Per point two rows
    [f, 0, c - u] t = (u - c) Z - f X (and the same for y).
    """
    c = res / 2.0
    a = np.zeros((2 * len(points), 3))
    b = np.zeros(2 * len(points))
    a[0::2, 0] = focal
    a[1::2, 1] = focal
    a[0::2, 2] = c - pixels[:, 0]
    a[1::2, 2] = c - pixels[:, 1]
    b[0::2] = (pixels[:, 0] - c) * points[:, 2] - focal * points[:, 0]
    b[1::2] = (pixels[:, 1] - c) * points[:, 2] - focal * points[:, 1]
    return np.linalg.lstsq(a, b, rcond=None)[0]
