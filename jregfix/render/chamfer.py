"""Cheap silhouette loss: chamfer distance between the projected mesh outline and a mask contour.

No rasterised coverage and no sigmoid: the mesh's outline is the set of its contour-generator
vertices (on an edge between a front- and a back-facing face) that project onto the border of
its own hard silhouette; the target's contour is the set of crack points between 4-neighbouring
pixels of different value (sub-pixel, unbiased: (j + 1, i + 0.5) between columns j and j + 1,
(j + 0.5, i + 1) between rows i and i + 1). The loss is the symmetric chamfer distance in px,

    L = 1/2 [ mean_v min_c |p_v - c| + mean_c min_v |p_v - c| ],

i.e. the target's contour distance transform sampled exactly at the projected outline vertices,
plus the reverse term that stops the outline from shrinking onto part of the contour. Nearest
neighbours come from one (outline x contour) distance matrix per image, so it runs the same on
CPU and GPU. Gradients reach the vertices (hence pose, shape, camera) through p_v; which vertices
form the outline is decided without gradient, like any visibility test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jregfix.errors import JregfixError
from jregfix.geometry.camera import PinholeCamera, project
from jregfix.render.raster import image_hw, in_front
from jregfix.render.silhouette import hard_silhouette


def _crack_candidates(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every place a crack point can be, and which are cracks.

    mask (B, H, W) bool -> flags (B, N) bool and points (N, 2) px (x, y), N = H (W - 1) +
    (H - 1) W: first the cracks between columns j and j + 1 at (j + 1, i + 0.5), row-major,
    then those between rows i and i + 1 at (j + 0.5, i + 1).
    """
    b, h, w = mask.shape
    flags = torch.cat(
        [
            (mask[:, :, :-1] != mask[:, :, 1:]).reshape(b, -1),
            (mask[:, :-1, :] != mask[:, 1:, :]).reshape(b, -1),
        ],
        1,
    )
    ys, xs = (torch.arange(n, dtype=torch.float32, device=mask.device) for n in (h, w))
    between_cols = torch.stack(torch.broadcast_tensors(xs[None, 1:], ys[:, None] + 0.5), -1)
    between_rows = torch.stack(torch.broadcast_tensors(xs[None, :] + 0.5, ys[1:, None]), -1)
    return flags, torch.cat([between_cols.reshape(-1, 2), between_rows.reshape(-1, 2)])


def _binary(mask: torch.Tensor) -> torch.Tensor:
    return mask > 0.5 if mask.is_floating_point() else mask.bool()


def contour_points(mask: torch.Tensor) -> list[torch.Tensor]:
    """Crack points (x, y) px between 4-neighbouring pixels of different value, per image.

    mask (B, H, W) bool (or float > 0.5) -> list of B tensors (C_b, 2). The image border is not
    a contour (a person cut by the crop has no edge there).
    """
    flags, points = _crack_candidates(_binary(mask))
    dtype = mask.dtype if mask.is_floating_point() else torch.float32
    return [points[f].to(dtype) for f in flags]


def _contour_vertices(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(B, V) bool: vertices on an edge shared by a front- and a back-facing face.

    vertices (B, V, 3) camera coordinates; faces (F, 3) consistently oriented. A face faces the
    camera when its normal points towards the camera centre (the origin). Fixed-size ops only
    (no host sync).
    """
    b, v = vertices.shape[:2]
    tri = vertices[:, faces]
    normal = torch.linalg.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0])
    front = (normal * tri[:, :, 0]).sum(-1) < 0  # (B, F)
    # (3F, 2): edges a0 a1, a1 a2, a2 a0 (roll, not a list index: that would be an upload)
    edges = torch.stack([faces, faces.roll(-1, 1)], -1).transpose(0, 1).reshape(-1, 2)
    owner = torch.arange(faces.shape[0], device=faces.device).repeat(3)
    key = edges.min(1).values * v + edges.max(1).values
    key, order = key.sort()
    edges, owner = edges[order], owner[order]
    # Sorted keys put the two faces of a manifold edge side by side (positions i, i + 1).
    shared = key[1:] == key[:-1]
    flip = (front[:, owner[:-1]] != front[:, owner[1:]]) & shared  # (B, 3F - 1)
    hits = vertices.new_zeros(b, v)
    for end in (0, 1):
        hits.scatter_add_(1, edges[:-1, end].expand(b, -1), flip.to(hits.dtype))
    return hits > 0


def _compact(flags: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flags (B, N) bool -> the indices of the set flags, in order, padded to ``size`` (B, size)
    int64, and which entries are real (B, size) bool. No host sync."""
    b, n = flags.shape
    slot = torch.where(flags, flags.cumsum(1) - 1, size)  # unset flags go to a spare column
    index = torch.arange(n, device=flags.device).expand(b, n)
    out = torch.zeros(b, size + 1, dtype=torch.long, device=flags.device).scatter_(1, slot, index)
    real = torch.arange(size, device=flags.device) < flags.sum(1, keepdim=True)
    return out[:, :size], real


def chamfer_silhouette_loss(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    camera: PinholeCamera,
    target: torch.Tensor,
    cam_t: torch.Tensor | None = None,
    border: int = 2,
    max_pairs: int | None = None,
) -> torch.Tensor:
    """Symmetric chamfer distance (px) between the mesh outline and the target's contour -> (B,).

    vertices (B, V, 3) camera coordinates (plus ``cam_t`` (B, 3)), faces (F, 3), ``camera`` as in
    :func:`soft_silhouette`; target (B, H, W) masks. Outline vertices must lie within ``border``
    px of the background of the mesh's own hard silhouette (drops occluded contours). An image
    with an empty target contour or no outline vertex in view gets 0 (no signal).

    The images are batched: outline and contour point sets are padded to the largest of the
    batch, so a call reads two numbers back from the device (plus the hard silhouette's one).
    """
    if target.dim() != 3 or target.shape[0] != vertices.shape[0]:
        raise JregfixError(
            f"target must be (B, H, W) with B = {vertices.shape[0]}, got {tuple(target.shape)}"
        )
    h, w = image_hw((target.shape[1], target.shape[2]))
    if cam_t is not None:
        vertices = vertices + cam_t[:, None, :]
    faces = faces.to(device=vertices.device, dtype=torch.long)
    with torch.no_grad():
        mask = hard_silhouette(vertices, faces, camera, (h, w), max_pairs=max_pairs)
        k = 2 * border + 1
        near_bg = F.max_pool2d((~mask).float()[:, None], k, stride=1, padding=border)[:, 0] > 0
        safe, front = in_front(vertices)
        outline = _contour_vertices(vertices, faces) & front
        pix = project(safe, camera).floor().long()
        col, row = pix[..., 0], pix[..., 1]
        outline &= (col >= 0) & (col < w) & (row >= 0) & (row < h)
        outline &= near_bg.view(-1, h * w).gather(1, (row * w + col).clamp(0, h * w - 1))
        cracks, points = _crack_candidates(_binary(target))
        n_out, n_crack = torch.stack([outline.sum(1).max(), cracks.sum(1).max()]).tolist()
        vert, vert_ok = _compact(outline, n_out)
        crack, crack_ok = _compact(cracks, n_crack)
    if n_out == 0 or n_crack == 0:
        return vertices.new_zeros(vertices.shape[0])
    uv = project(vertices.gather(1, vert[..., None].expand(-1, -1, 3)), camera)
    pts = points.to(uv.dtype)[crack]  # (B, C, 2)
    pair_ok = vert_ok[:, :, None] & crack_ok[:, None, :]
    dist = torch.cdist(uv, pts).masked_fill(~pair_ok, torch.inf)
    n_v, n_c = vert_ok.sum(1), crack_ok.sum(1)
    signal = (n_v > 0) & (n_c > 0)
    to_contour = torch.where(vert_ok & signal[:, None], dist.min(2).values, 0.0).sum(1)
    to_outline = torch.where(crack_ok & signal[:, None], dist.min(1).values, 0.0).sum(1)
    loss = 0.5 * (to_contour / n_v.clamp(min=1) + to_outline / n_c.clamp(min=1))
    return torch.where(signal, loss, 0.0)
