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


def in_front(vertices: torch.Tensor, z_near: float = Z_NEAR) -> tuple[torch.Tensor, torch.Tensor]:
    """vertices (B, V, 3) -> the same with points at z <= z_near replaced by (0, 0, 1), and the
    mask (B, V) of the points kept. The stand-in keeps projections finite (and gradients
    through torch.where); callers drop what touches it."""
    front = vertices[..., 2] > z_near
    # (0, 0, 1) is written on the device: a tensor from Python data is a blocking upload there.
    ahead = vertices.new_zeros(3)
    ahead[2] = 1.0
    return torch.where(front[..., None], vertices, ahead), front


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
            f"camera has batch size {camera.batch_size} but vertices {vertices.shape[0]}"
        )
    if cam_t is not None:
        vertices = vertices + cam_t[:, None, :]
    safe, front = in_front(vertices, z_near)
    uv = project(safe, camera)
    faces = faces.to(device=vertices.device, dtype=torch.long)
    tri = uv[:, faces]
    valid = front[:, faces].all(-1)
    return tri, valid


def _bucket(n: torch.Tensor) -> torch.Tensor:
    """Round box sizes up: at least 4, exact up to 8, then multiples of n / 8 rounded down to a
    power of two (8, 10, 12, 14, 16, 20, ...; <= 25 % larger)."""
    step = torch.exp2(torch.floor(torch.log2(n.clamp(min=1).double())) - 2).clamp(min=1).long()
    return ((n + step - 1) // step * step).clamp(min=4)


def pixel_ranges(
    tri: torch.Tensor, valid: torch.Tensor, h: int, w: int, margin: float, round_up: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel boxes holding the pixel centres in each face's bounding box grown by ``margin`` px.

    tri (B, F, 3, 2) -> first column x0, first row y0, widths nx, heights ny (each (B, F) int64,
    0 <= x0 <= x0 + nx <= W and likewise for y; nx * ny = 0 for invalid faces and faces
    entirely outside the image). ``round_up`` enlarges the sides with :func:`_bucket` (shifted
    to stay inside the image): the soft silhouette's boxes, whose extra pairs are evaluated
    exactly like the others.
    """
    lo = tri.amin(-2) - (margin + 0.5)
    hi = tri.amax(-2) - (0.5 - margin)
    # Clamp before the integer cast: far-off faces may project to huge coordinates.
    lo = torch.ceil(lo.clamp(-1.0, max(h, w) + 1.0)).long()
    hi = torch.floor(hi.clamp(-2.0, max(h, w) + 1.0)).long()
    x0, y0 = lo[..., 0].clamp(0, w), lo[..., 1].clamp(0, h)
    nx = (hi[..., 0].clamp(max=w - 1) - x0 + 1).clamp(min=0)
    ny = (hi[..., 1].clamp(max=h - 1) - y0 + 1).clamp(min=0)
    if round_up:
        empty = ~valid | (nx == 0) | (ny == 0)
        nx, ny = _bucket(nx).clamp(max=w), _bucket(ny).clamp(max=h)
        x0, y0 = torch.minimum(x0, w - nx), torch.minimum(y0, h - ny)
        return x0, y0, nx.masked_fill(empty, 0), ny
    return x0, y0, nx * valid, ny


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


def box_pairs(
    x0: torch.Tensor,
    y0: torch.Tensor,
    nx: torch.Tensor,
    ny: torch.Tensor,
    h: int,
    w: int,
    max_pairs: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every (face, pixel) pair of the boxes from :func:`pixel_ranges`, as one flat list cut
    into chunks of at most ``max_pairs`` pairs.

    Yields (face, pix, col, row), each (n,): flat face indices b * F + f (int32), flat pixel
    indices b * H * W + row * W + col (int64), and the pixel's column and row. The list is
    built with a fixed number of device ops whatever the box sizes; the only host read is its
    length (one sync per call), and each chunk costs a dozen kernels.
    """
    b, f = nx.shape
    nx, ny = nx.reshape(-1), ny.reshape(-1)
    counts = nx * ny
    ends = counts.cumsum(0)
    total = int(ends[-1]) if counts.numel() else 0
    if total == 0:
        return
    if b * h * w >= 2**31:
        raise JregfixError(
            f"{b} images of {h}x{w} px exceed the renderer's 2^31 pixels per "
            "call; render the batch in parts"
        )
    # Pair -> face; int32 halves the memory of this (and the saved backward) list.
    face_of = torch.arange(b * f, dtype=torch.int32, device=nx.device).repeat_interleave(
        counts, output_size=total
    )
    image = torch.arange(b * f, device=nx.device) // f
    # Per face: first pair, box width, box corner, first pixel of its image.
    info = torch.stack([ends - counts, nx, x0.reshape(-1), y0.reshape(-1), image * (h * w)], 1)
    for lo in range(0, total, max_pairs):
        hi = min(lo + max_pairs, total)
        face = face_of[lo:hi]
        start, width, col0, row0, offset = info.index_select(0, face).unbind(1)
        local = torch.arange(lo, hi, device=nx.device) - start
        oy = local.div(width, rounding_mode="floor")
        col = col0 + (local - oy * width)
        row = row0 + oy
        yield face, offset + row * w + col, col, row


def inside_triangles(corners: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Are points (px, py) (n,) inside or on triangles with corners (6, n) = x0, x1, x2, y0, y1,
    y2 (either orientation)?"""
    crosses = []
    for i in range(3):
        ax, ay = corners[i], corners[3 + i]
        ex, ey = corners[(i + 1) % 3] - ax, corners[3 + (i + 1) % 3] - ay
        crosses.append(ex * (py - ay) - ey * (px - ax))
    cmin = torch.minimum(torch.minimum(crosses[0], crosses[1]), crosses[2])
    cmax = torch.maximum(torch.maximum(crosses[0], crosses[1]), crosses[2])
    # Edge functions of one sign (zero allowed) <=> inside or on the boundary.
    return cmin * cmax >= 0
