"""Pinhole cameras and SPIN's weak-perspective -> perspective convention.

Camera coordinates: x right, y down, z forward (metres); pixel coordinates: x right, y down, the
image spanning [0, W] x [0, H], so pixel (row i, column j) has its centre at (j + 0.5, i + 0.5).
SPIN meshes are already in this frame (their global orientation carries the 180 degree rotation
about x), so they only need the translation ``cam_t``.

SPIN (constants.py, utils/geometry.py): focal 5000 px on the 224 crop, principal point at the
crop centre (112, 112), and the network camera (s, tx, ty) becomes
``cam_t = [tx, ty, 2 f / (224 s + 1e-9)]``. A crop rendered at another size keeps SPIN's field
of view by scaling the focal with it (:func:`spin_focal`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FOCAL_LENGTH = 5000.0
IMG_RES = 224  # side of SPIN's square crop, px: the network input and the camera's image


def spin_focal(size: float) -> float:
    """SPIN's focal length (5000 px at the 224 px crop) scaled to a crop of side ``size`` px, so
    that the crop shows the same field of view at any resolution."""
    return FOCAL_LENGTH * size / IMG_RES


def weak_to_cam_t(
    camera: torch.Tensor, focal: float = FOCAL_LENGTH, res: int = IMG_RES
) -> torch.Tensor:
    """SPIN weak-perspective camera (N, 3) = (s, tx, ty) -> translation (N, 3) = (tx, ty, tz).

    tz = 2 f / (res s + 1e-9) makes the pinhole projection of the crop match the weak-perspective
    one at depth tz (the epsilon is SPIN's).
    """
    s, tx, ty = camera.unbind(-1)
    return torch.stack([tx, ty, 2.0 * focal / (res * s + 1e-9)], dim=-1)


def cam_t_to_weak(
    cam_t: torch.Tensor, focal: float = FOCAL_LENGTH, res: int = IMG_RES
) -> torch.Tensor:
    """Translation (N, 3) = (tx, ty, tz) -> SPIN weak-perspective camera (N, 3) = (s, tx, ty).

    The inverse of :func:`weak_to_cam_t` up to its 1e-9: s = 2 f / (res tz). tz must be > 0.
    """
    s = 2 * focal / (res * cam_t[:, 2])
    return torch.stack([s, cam_t[:, 0], cam_t[:, 1]], 1)


@dataclass(frozen=True)
class PinholeCamera:
    """Per-image pinhole intrinsics, each a (B,) tensor (no skew, no distortion).

    Build with :meth:`spin_crop` or :meth:`from_intrinsics`; ``camera[idx]`` selects images.
    """

    fx: torch.Tensor
    fy: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor

    @classmethod
    def from_intrinsics(
        cls,
        fx: float | torch.Tensor,
        fy: float | torch.Tensor,
        cx: float | torch.Tensor,
        cy: float | torch.Tensor,
        batch_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> PinholeCamera:
        """General intrinsics; scalars or (B,) tensors, broadcast to ``batch_size`` if given."""
        vals = [
            torch.as_tensor(v, dtype=dtype, device=device).reshape(-1) for v in (fx, fy, cx, cy)
        ]
        n = batch_size if batch_size is not None else max(v.numel() for v in vals)
        return cls(*(v.expand(n).contiguous() for v in vals))

    @classmethod
    def spin_crop(
        cls,
        batch_size: int,
        focal: float = FOCAL_LENGTH,
        res: int = IMG_RES,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> PinholeCamera:
        """SPIN's crop camera: fx = fy = ``focal`` px, principal point at (res / 2, res / 2)."""
        c = res / 2.0
        return cls.from_intrinsics(focal, focal, c, c, batch_size, dtype, device)

    @property
    def batch_size(self) -> int:
        return self.fx.shape[0]

    def __getitem__(self, idx) -> PinholeCamera:
        return PinholeCamera(self.fx[idx], self.fy[idx], self.cx[idx], self.cy[idx])

    def to(self, device=None, dtype=None) -> PinholeCamera:
        return PinholeCamera(
            *(t.to(device=device, dtype=dtype) for t in (self.fx, self.fy, self.cx, self.cy))
        )

    def matrix(self) -> torch.Tensor:
        """Intrinsic matrices K (B, 3, 3)."""
        k = self.fx.new_zeros(self.batch_size, 3, 3)
        k[:, 0, 0], k[:, 1, 1] = self.fx, self.fy
        k[:, 0, 2], k[:, 1, 2] = self.cx, self.cy
        k[:, 2, 2] = 1.0
        return k


def project(
    points: torch.Tensor, camera: PinholeCamera, cam_t: torch.Tensor | None = None
) -> torch.Tensor:
    """Perspective projection: points (B, P, 3) camera coordinates (+ cam_t (B, 3)) -> (B, P, 2) px.

    u = fx X / Z + cx, v = fy Y / Z + cy. Points at Z <= 0 give meaningless (possibly infinite)
    values; callers that can see such points must mask them (the renderer drops those faces).
    """
    if cam_t is not None:
        points = points + cam_t[:, None, :]
    xy = points[..., :2] / points[..., 2:3]
    f = torch.stack([camera.fx, camera.fy], -1)[:, None, :]
    c = torch.stack([camera.cx, camera.cy], -1)[:, None, :]
    return xy * f + c
