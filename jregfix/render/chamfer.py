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
from jregfix.render.raster import image_hw
from jregfix.render.silhouette import MAX_PAIRS, hard_silhouette


def contour_points(mask: torch.Tensor) -> list[torch.Tensor]:
    """Crack points (x, y) px between 4-neighbouring pixels of different value, per image.

    mask (B, H, W) bool (or float > 0.5) -> list of B tensors (C_b, 2). The image border is not
    a contour (a person cut by the crop has no edge there).
    """
    m = mask > 0.5 if mask.is_floating_point() else mask.bool()
    dtype = torch.float32 if not mask.is_floating_point() else mask.dtype
    out = []
    for mb in m:
        yh, xh = (mb[:, :-1] != mb[:, 1:]).nonzero(as_tuple=True)
        yv, xv = (mb[:-1, :] != mb[1:, :]).nonzero(as_tuple=True)
        pts = torch.cat([torch.stack([xh + 1.0, yh + 0.5], -1),
                         torch.stack([xv + 0.5, yv + 1.0], -1)])
        out.append(pts.to(dtype))
    return out


def _contour_vertices(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(B, V) bool: vertices on an edge shared by a front- and a back-facing face.

    vertices (B, V, 3) camera coordinates; faces (F, 3) consistently oriented. A face faces the
    camera when its normal points towards the camera centre (the origin).
    """
    tri = vertices[:, faces]
    normal = torch.linalg.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0])
    front = (normal * tri[:, :, 0]).sum(-1) < 0  # (B, F)
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    owner = torch.arange(faces.shape[0], device=faces.device).repeat(3)
    key = edges.min(1).values * vertices.shape[1] + edges.max(1).values
    key, order = key.sort()
    edges, owner = edges[order], owner[order]
    pair = (key[1:] == key[:-1]).nonzero().squeeze(1)  # manifold edges: two adjacent faces
    flip = front[:, owner[pair]] != front[:, owner[pair + 1]]  # (B, E)
    out = torch.zeros(vertices.shape[:2], dtype=torch.bool, device=vertices.device)
    b_idx, e_idx = flip.nonzero(as_tuple=True)
    ends = edges[pair[e_idx]]
    out[b_idx[:, None].expand_as(ends), ends] = True
    return out


def chamfer_silhouette_loss(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    camera: PinholeCamera,
    target: torch.Tensor,
    cam_t: torch.Tensor | None = None,
    border: int = 2,
    max_pairs: int = MAX_PAIRS,
) -> torch.Tensor:
    """Symmetric chamfer distance (px) between the mesh outline and the target's contour -> (B,).

    vertices (B, V, 3) camera coordinates (plus ``cam_t`` (B, 3)), faces (F, 3), ``camera`` as in
    :func:`soft_silhouette`; target (B, H, W) masks. Outline vertices must lie within ``border``
    px of the background of the mesh's own hard silhouette (drops occluded contours). An image
    with an empty target contour or no outline vertex in view gets 0 (no signal).
    """
    if target.dim() != 3 or target.shape[0] != vertices.shape[0]:
        raise JregfixError(
            f"target must be (B, H, W) with B = {vertices.shape[0]}, got {tuple(target.shape)}")
    h, w = image_hw(tuple(target.shape[1:]))
    if cam_t is not None:
        vertices = vertices + cam_t[:, None, :]
    faces = faces.to(device=vertices.device, dtype=torch.long)
    with torch.no_grad():
        mask = hard_silhouette(vertices, faces, camera, (h, w), max_pairs=max_pairs)
        k = 2 * border + 1
        near_bg = F.max_pool2d((~mask).float()[:, None], k, stride=1, padding=border)[:, 0] > 0
        front = vertices[..., 2] > 1e-3
        outline = _contour_vertices(vertices, faces) & front
        safe = torch.where(front[..., None], vertices, vertices.new_tensor([0.0, 0.0, 1.0]))
        pix = project(safe, camera).floor().long()
        col, row = pix[..., 0], pix[..., 1]
        outline &= (col >= 0) & (col < w) & (row >= 0) & (row < h)
        outline &= near_bg.view(-1, h * w).gather(1, (row * w + col).clamp(0, h * w - 1))
    losses = []
    for b, pts in enumerate(contour_points(target)):
        sel = outline[b].nonzero().squeeze(1)
        if sel.numel() == 0 or pts.shape[0] == 0:
            losses.append(vertices.new_zeros(()))
            continue
        uv = project(vertices[b:b + 1, sel], camera[b:b + 1])[0]
        dist = torch.cdist(uv, pts.to(uv.dtype))
        losses.append(0.5 * (dist.min(1).values.mean() + dist.min(0).values.mean()))
    return torch.stack(losses)
