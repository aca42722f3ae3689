"""Differentiable silhouettes (PyTorch, and numba kernels on the CPU): soft (SoftRas) and hard
masks, chamfer loss."""

from jregfix.render.chamfer import chamfer_silhouette_loss, contour_points
from jregfix.render.silhouette import (
    DEFAULT_CUTOFF,
    DEFAULT_SIGMA,
    blur_margin,
    hard_silhouette,
    soft_silhouette,
)

__all__ = [
    "DEFAULT_CUTOFF",
    "DEFAULT_SIGMA",
    "blur_margin",
    "chamfer_silhouette_loss",
    "contour_points",
    "hard_silhouette",
    "soft_silhouette",
]
