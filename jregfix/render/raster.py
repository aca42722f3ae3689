"""Shared rasterisation plumbing: screen-space triangles and sparse (face, pixel) pair lists.

Pixel (row i, column j) is sampled at its centre (j + 0.5, i + 0.5); see
:mod:`jregfix.geometry.camera` for the coordinate conventions. Nothing here carries gradients.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from jregfix.errors import JregfixError
from jregfix.geometry.camera import PinholeCamera, project

Z_NEAR = 1e-3  # metres; faces with a vertex closer than this (or behind the camera) are dropped


def image_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """int or (H, W) -> (H, W)."""
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = (int(s) for s in image_size)
    return h, w


def screen_triangles(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    camera: PinholeCamera,
    cam_t: torch.Tensor | None = None,
    z_near: float = Z_NEAR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Project a batch of meshes: -> triangles (B, F, 3, 2) px (differentiable), valid (B, F) bool.

    vertices (B, V, 3) in camera coordinates (plus ``cam_t`` (B, 3) if given); faces (F, 3).
    A face is invalid when any vertex has z <= z_near; its triangle holds finite dummy values.
    """
    if vertices.dim() != 3 or vertices.shape[-1] != 3:
        raise JregfixError(f"vertices must be (B, V, 3), got {tuple(vertices.shape)}")
    if faces.dim() != 2 or faces.shape[-1] != 3:
        raise JregfixError(f"faces must be (F, 3), got {tuple(faces.shape)}")
    if camera.batch_size != vertices.shape[0]:
        raise JregfixError(
            f"camera has batch size {camera.batch_size} but vertices {vertices.shape[0]}")
    if cam_t is not None:
        vertices = vertices + cam_t[:, None, :]
    z = vertices[..., 2]
    front = z > z_near
    # Behind-camera vertices get a harmless depth so the projection stays finite (and so do
    # gradients through torch.where); their faces are dropped via ``valid``.
    safe = torch.where(front[..., None], vertices, vertices.new_tensor([0.0, 0.0, 1.0]))
    uv = project(safe, camera)
    faces = faces.to(device=vertices.device, dtype=torch.long)
    tri = uv[:, faces]
    valid = front[:, faces].all(-1)
    return tri, valid


def _bucket(n: torch.Tensor) -> torch.Tensor:
    """Round box sizes up to few distinct values: at least 4, exact up to 8, then multiples of
    n / 8 rounded down to a power of two (8, 10, 12, 14, 16, 20, ...; <= 25 % larger). Fewer
    distinct box shapes means fewer (and larger) vectorised groups in :func:`box_groups`."""
    step = torch.exp2(torch.floor(torch.log2(n.clamp(min=1).double())) - 2).clamp(min=1).long()
    return ((n + step - 1) // step * step).clamp(min=4)


def pixel_ranges(
    tri: torch.Tensor, valid: torch.Tensor, h: int, w: int, margin: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel boxes covering each face's bounding box grown by ``margin`` px, inside the image.

    tri (B, F, 3, 2) -> first column x0, first row y0, widths nx, heights ny (each (B, F) int64;
    nx * ny = 0 for invalid faces and faces entirely outside the image). Box sizes are rounded
    up (:func:`_bucket`, shifted to stay inside the image), so a box may hold a few more pixel
    centres than the grown bounding box; those pairs are evaluated exactly like the others.
    """
    lo = tri.amin(-2) - (margin + 0.5)
    hi = tri.amax(-2) - (0.5 - margin)
    # Clamp before the integer cast: far-off faces may project to huge coordinates.
    lo = torch.ceil(lo.clamp(-1.0, max(h, w) + 1.0)).long()
    hi = torch.floor(hi.clamp(-2.0, max(h, w) + 1.0)).long()
    x0, y0 = lo[..., 0].clamp(0, w), lo[..., 1].clamp(0, h)
    nx = (hi[..., 0].clamp(max=w - 1) - x0 + 1).clamp(min=0)
    ny = (hi[..., 1].clamp(max=h - 1) - y0 + 1).clamp(min=0)
    empty = ~valid | (nx == 0) | (ny == 0)
    nx, ny = _bucket(nx).clamp(max=w), _bucket(ny).clamp(max=h)
    x0, y0 = torch.minimum(x0, w - nx), torch.minimum(y0, h - ny)
    nx = nx.masked_fill(empty, 0)
    return x0, y0, nx, ny


def rect_sums(
    image: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, nx: torch.Tensor, ny: torch.Tensor
) -> torch.Tensor:
    """Sum of image (B, H, W) over per-face rectangles (B, F) via an integral image -> (B, F)."""
    b, h, w = image.shape
    sat = torch.zeros(b, h + 1, w + 1, dtype=torch.int64, device=image.device)
    sat[:, 1:, 1:] = image.long().cumsum(1).cumsum(2)
    flat = sat.view(b, -1)
    x1, y1 = x0 + nx, y0 + ny  # pixel_ranges keeps 0 <= x0 <= x1 <= W and likewise for y

    def at(y, x):
        return flat.gather(1, y * (w + 1) + x)

    return at(y1, x1) - at(y0, x1) - at(y1, x0) + at(y0, x0)


def box_groups(
    nx: torch.Tensor, ny: torch.Tensor, max_pairs: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Group faces by box shape so every group is a dense (faces x box pixels) grid.

    nx, ny (B, F) box widths/heights from :func:`pixel_ranges`. Yields (fi, ox, oy): flat face
    indices b * F + f (M,) int64 sharing one box shape, and the K = nx * ny column/row offsets
    (K,) int64 inside that box; M * K <= max(max_pairs, K). Faces with empty boxes are skipped.
    Grids avoid per-pair index arithmetic: face constants broadcast along K, offsets along M.
    """
    nx, ny = nx.reshape(-1), ny.reshape(-1)
    fi = (nx * ny).nonzero().squeeze(1)
    if fi.numel() == 0:
        return
    key = ny[fi] * (int(nx.max()) + 1) + nx[fi]
    key, order = key.sort(stable=True)
    fi = fi[order]
    counts = torch.unique_consecutive(key, return_counts=True)[1]
    start = 0
    for count in counts.tolist():
        gx, gy = int(nx[fi[start]]), int(ny[fi[start]])
        k = gx * gy
        local = torch.arange(k, device=fi.device)
        ox, oy = local % gx, local // gx
        step = max(1, max_pairs // k)
        for lo in range(start, start + count, step):
            yield fi[lo:min(lo + step, start + count)], ox, oy
        start += count


def box_pixels(
    fi: torch.Tensor, ox: torch.Tensor, oy: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor,
    num_faces: int, h: int, w: int,
) -> torch.Tensor:
    """Flat pixel indices b * H * W + row * W + col (M, K) of a :func:`box_groups` grid."""
    x0, y0 = x0.reshape(-1), y0.reshape(-1)
    base = (fi // num_faces) * (h * w) + y0[fi] * w + x0[fi]
    return base[:, None] + (oy * w + ox)[None, :]


def inside_grid(tri: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Are points (px, py) (M, K) inside or on triangles tri (M, 3, 2) (either orientation)?"""
    cmin = cmax = None
    for i in range(3):
        ax, ay = tri[:, i, 0:1], tri[:, i, 1:2]
        ex, ey = tri[:, (i + 1) % 3, 0:1] - ax, tri[:, (i + 1) % 3, 1:2] - ay
        cross = ex * (py - ay) - ey * (px - ax)
        if cmin is None:
            cmin = cmax = cross
        else:
            cmin, cmax = torch.minimum(cmin, cross), torch.maximum(cmax, cross)
    # Edge functions of one sign (zero allowed) <=> inside or on the boundary.
    return cmin * cmax >= 0
