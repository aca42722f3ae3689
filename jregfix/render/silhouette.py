"""Soft (differentiable) and hard silhouettes of triangle meshes, sparse: PyTorch and CPU kernels.

Semantics (SoftRas, Liu et al. 2019; PyTorch3D's soft silhouette). For pixel centre p and a
projected face f with squared distance d2 (px^2) from p to the triangle (0 inside),

    D_f(p) = sigmoid(s d2 / sigma),  s = +1 if p is inside the triangle, -1 outside,
    A(p)   = 1 - prod_f (1 - D_f(p)),

so a face gives 1/2 on its edges, tends to 1 deep inside and decays like exp(-d2 / sigma)
outside. ``sigma`` is in px^2; PyTorch3D's ``BlendParams.sigma`` (NDC units) corresponds to
``sigma_ndc * (min(H, W) / 2) ** 2`` px^2 (the paper's 1e-4 at 224^2 is 1.25 px^2). Depth plays
no role: a silhouette is the union of all faces (no z-buffer), as in PyTorch3D's silhouette
shader.

Cut-off. Face f is evaluated only on the pixels whose centres lie in its projected bounding box
grown by the margin r = sqrt(sigma ln((1 - c) / c)), c = ``cutoff``; every skipped pair has
D < c. If k faces are skipped at a pixel, 0 <= A_exact - A <= 1 - (1 - c)^k <= k c. Because D
also decays like exp(-d2 / sigma) beyond r, the sum over the skipped faces stays a small
multiple of c: <= 10 c on small meshes (tests/test_render_soft.py), but up to ~50 c (5.2e-3 at
sigma = 1, 8e-4 at sigma = 0.1, c = 1e-4) at the outline of a 13776-face body at 224^2, where
many edge-on faces crowd just beyond r. The default c = 1e-4 gives r = 3.03 sqrt(sigma) px.

Backends. The pure-PyTorch pair list below runs anywhere (GPUs) and is the reference. On the
CPU, float32 / float64 tensors go by default to compiled numba kernels (:mod:`.kernels`,
``backend="torch"`` or $JREGFIX_RENDER_BACKEND=torch forces the PyTorch path). They prune by
geometry instead of rounded boxes: a pair is kept iff its pixel centre is inside the triangle or
within r' of it, r' the margin of c / 10 (r' = 3.39 sqrt(sigma) px at c = 1e-4). The same bound
holds with c / 10 for the skipped pairs, and in practice the kernels are closer to exact SoftRas
than the PyTorch path: on the bodies above, max |A - A_exact| <= 6.2e-4 (sigma = 1) and 3e-4
(sigma = 0.1), so the two paths differ by up to ~5e-3 at the outline and agree elsewhere
(tests/test_render_kernel.py). Evaluated on the same pairs, they agree to rounding. Hard masks
are identical.

Interior (``interior="hard"``, the default, for speed). Pixels deeper than ceil(r) + 1 px
(chessboard distance) inside the hard silhouette are set to exactly 1 with zero gradient, and
faces whose grown box lies entirely in that deep interior are skipped. Exact SoftRas gives
slightly less than 1 there wherever a pixel lies within ~sqrt(sigma) of internal mesh edges
(1 - A is a product of factors <= 1/2 from the front and the back layer; a few 1e-2 at most on
body-like meshes with 2 px faces, see the tests), and those gradients only shuffle internal
edges. ``interior="soft"`` evaluates every pixel: exact SoftRas up to the cut-off.

Caveat for fitting to binary masks: where many faces crowd in projection (the outline of a
dense closed mesh, seen edge-on) their small outside terms add up, so A spills past the hard
outline; on a 6890-vertex body-like blob at 224^2 the soft area is ~8 % (sigma = 1) or ~3.5 %
(sigma = 0.25) larger than the hard one. An MSE against a hard mask is therefore biased
towards a slightly smaller body; a smaller sigma reduces the bias.

Faces with a vertex at z <= Z_NEAR (behind or at the camera) are dropped; pixels are clipped to
the image. Memory stays bounded: the (face, pixel) pairs form one flat list evaluated in chunks
of ``max_pairs`` pairs, and the backward pass keeps 32 bytes per pair (float32; the kernels
keep none); nothing ever has the size pixels x faces.

GPU. The work is a fixed sequence of vectorised ops per chunk, so a forward + backward costs a
few hundred kernel launches whatever the mesh, and the host reads only the pair counts (two
syncs per forward with ``interior="hard"``, one otherwise, none in the backward). The default
chunk is 2^17 pairs on the CPU (temporaries stay in cache) and 2^22 on a GPU (about 1 GB of
temporaries). Pixel sums use ``scatter_add_`` / ``index_add_``: float atomics on CUDA, whose
order varies from run to run unless ``torch.use_deterministic_algorithms(True)`` is on (both
ops then switch to ordered kernels).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from jregfix.errors import JregfixError
from jregfix.geometry.camera import PinholeCamera
from jregfix.render import kernels
from jregfix.render.raster import (
    box_pairs,
    image_hw,
    inside_triangles,
    pixel_ranges,
    rect_sums,
    screen_triangles,
)

DEFAULT_SIGMA = 1.0  # px^2
DEFAULT_CUTOFF = 1e-4
MAX_PAIRS = 1 << 17  # pairs per chunk on the CPU: the temporaries stay cache-resident
MAX_PAIRS_GPU = 1 << 22  # on a GPU: few launches; ~250 bytes of temporaries per pair
KERNEL_CUTOFF_DIVISOR = 10  # the CPU kernels keep pairs down to D = cutoff / 10 (docstring)


def default_max_pairs(device: torch.device) -> int:
    """Pairs per chunk for tensors on ``device`` (see the module docstring)."""
    return MAX_PAIRS if device.type == "cpu" else MAX_PAIRS_GPU


def blur_margin(sigma: float, cutoff: float) -> float:
    """Distance (px) beyond which a face's outside coverage sigmoid(-d2 / sigma) is < cutoff."""
    if not 0.0 < cutoff < 0.5:
        raise JregfixError(f"cutoff must be in (0, 0.5), got {cutoff}")
    return math.sqrt(sigma * math.log((1.0 - cutoff) / cutoff))


BACKENDS = ("auto", "torch", "numba")
BACKEND_ENV = "JREGFIX_RENDER_BACKEND"


def use_kernel(backend: str | None, tensor: torch.Tensor) -> bool:
    """Render ``tensor``'s batch with the compiled CPU kernels (True) or PyTorch ops (False)?

    ``backend`` None reads $JREGFIX_RENDER_BACKEND (default "auto": the kernels for float32 /
    float64 CPU tensors when numba imports, PyTorch otherwise); "torch" forces the PyTorch
    path; "numba" requires the kernels."""
    backend = backend or os.environ.get(BACKEND_ENV, "").strip() or "auto"
    if backend not in BACKENDS:
        raise JregfixError(
            f"renderer backend must be one of {BACKENDS}, got {backend!r} "
            f"(argument or ${BACKEND_ENV})"
        )
    # A tensor's device property (not storage) decides: tests' GPU stand-ins report "cuda".
    fits = tensor.device.type == "cpu" and tensor.dtype in kernels.DTYPES
    if backend == "numba" and not (kernels.AVAILABLE and fits):
        raise JregfixError(
            "renderer backend 'numba' needs the numba package and float32/float64 CPU tensors"
            f" (got {tensor.dtype} on {tensor.device}); install numba or use backend 'torch'"
        )
    return backend != "torch" and kernels.AVAILABLE and fits


def _erode(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Binary erosion of (B, H, W) by a (2k+1)^2 square; outside the image counts as empty."""
    empty = F.pad((~mask).float()[:, None], (k, k, k, k), value=1.0)
    empty = F.max_pool2d(empty, (2 * k + 1, 1), stride=1)  # separable: rows, then columns
    empty = F.max_pool2d(empty, (1, 2 * k + 1), stride=1)
    return empty[:, 0] == 0


def _face_table(tri: torch.Tensor) -> torch.Tensor:
    """Per-face constants as rows (18, B*F): a_x, a_y (vertices), e_x, e_y (edges a_i ->
    a_(i+1)) and e / |e|^2 (x, y), three rows each."""
    a = tri.reshape(-1, 3, 2)
    e = a.roll(-1, 1) - a
    e_scaled = e / (e * e).sum(-1, keepdim=True).clamp(min=1e-12)
    return (
        torch.cat(
            [a[..., 0], a[..., 1], e[..., 0], e[..., 1], e_scaled[..., 0], e_scaled[..., 1]], 1
        )
        .t()
        .contiguous()
    )


def _gather_columns(table: torch.Tensor, face: torch.Tensor):
    """Columns ``face`` (n,) of a per-face table (R, B*F) -> R rows of (n,): one 2-D gather on
    a GPU (one launch), R 1-D gathers on the CPU (~4x faster there)."""
    if face.device.type == "cpu":
        return [r.index_select(0, face) for r in table]
    return table.index_select(1, face)


def _pair_terms(rows, px, py, sigma, need_grad):
    """log(1 - D) of n (face, pixel) pairs, and its gradient factors.

    rows (18, n) the pairs' face constants (:func:`_face_table`, :func:`_gather_columns`); px,
    py (n,) pixel centres.
    Returns logterm (n,) and, if ``need_grad``, dlog (6, n) = d log(1 - D) / d(a_0x, a_1x,
    a_2x, a_0y, a_1y, a_2y). With q = (1 - u) a_k + u a_(k+1) the closest triangle point (on
    edge k), d log(1 - D) / d q = (2 s D / sigma) (p - q); by the envelope rule (also where u
    is clamped to 0 or 1) vertex a_k gets the share (1 - u) of it and a_(k+1) the share u.

    Only fast arithmetic (no comparisons, where or gathers): on CPU these are ~10x cheaper.
    """
    d2, us, dxs, dys, crosses = [], [], [], [], []
    for i in range(3):
        ax, ay, ex, ey, sx, sy = (rows[j + i] for j in range(0, 18, 3))
        wx, wy = px - ax, py - ay
        u = torch.addcmul(wx * sx, wy, sy).clamp_(0.0, 1.0)
        dx = torch.addcmul(wx, u, ex, value=-1.0)
        dy = torch.addcmul(wy, u, ey, value=-1.0)
        d2.append(torch.addcmul(dx * dx, dy, dy))
        crosses.append(torch.addcmul(wy * ex, wx, ey, value=-1.0))
        us.append(u), dxs.append(dx), dys.append(dy)
    best = torch.minimum(torch.minimum(d2[0], d2[1]), d2[2])
    # Inside or on the triangle iff the edge functions do not change sign: s = +1, outside -1
    # (s = 0 only where d2 = 0).
    c = crosses
    cmin = torch.minimum(torch.minimum(c[0], c[1]), c[2])
    cmax = torch.maximum(torch.maximum(c[0], c[1]), c[2])
    sign = cmin.mul_(cmax).sign_()
    x = best.mul(sign).mul_(1.0 / sigma)
    one_minus = torch.sigmoid(x.neg_())
    logterm = torch.log(one_minus)  # -inf once 1 - D underflows: then A = 1 exactly
    if not need_grad:
        return logterm, None
    # Exclusive nearest-edge indicators (ties go to the lower index).
    i0 = torch.sign(d2[0] - best).neg_().add_(1.0)
    i1 = torch.sign(d2[1] - best).neg_().add_(1.0).mul_(1.0 - i0)
    i2 = 1.0 - i0 - i1
    ind = (i0, i1, i2)
    gx = i0 * dxs[0] + i1 * dxs[1] + i2 * dxs[2]
    gy = i0 * dys[0] + i1 * dys[1] + i2 * dys[2]
    coef = one_minus.neg_().add_(1.0).mul_(sign).mul_(2.0 / sigma)  # 2 s D / sigma
    gx.mul_(coef)
    gy.mul_(coef)
    dlog = px.new_empty(6, px.shape[0])
    t = [ind[i] * us[i] for i in range(3)]
    for v in range(3):
        wv = ind[v] - t[v] + t[v - 1]  # (1 - u) from edge v, u from edge v - 1
        torch.mul(wv, gx, out=dlog[v])
        torch.mul(wv, gy, out=dlog[3 + v])
    return logterm, dlog


class _SoftCoverage(torch.autograd.Function):
    """tri (B, F, 3, 2) -> coverage A (B, H, W), with a hand-written sparse backward.

    Boxes are grown by ``margin``. ``reach`` None: the PyTorch pair list over rounded-up
    boxes. A float: the compiled kernels over exact boxes, skipping the pairs outside their
    triangle by more than ``reach`` px (inf: none; with ``round_up`` the kernels then see the
    PyTorch path's pairs, for tests)."""

    @staticmethod
    def forward(ctx, tri, valid, h, w, sigma, margin, deep, max_pairs, reach=None, round_up=False):
        b, f = valid.shape
        ctx.kernel = reach is not None
        if ctx.kernel:
            # Pixels, not faces, are tested against the deep interior: cheap in a loop.
            ctx.boxes = (
                kernels.stack_boxes(*pixel_ranges(tri, valid, h, w, margin, True))
                if round_up
                else kernels.face_boxes(tri, valid, h, w, margin)
            )
            ctx.sigma, ctx.reach = sigma, reach
            one_minus = kernels.soft_one_minus(tri, ctx.boxes, deep, h, w, sigma, reach)
            one_minus = one_minus.view(-1).to(tri.dtype)
        else:
            # Rounded-up boxes: their extra pairs (each below the cut-off) add up to a few 1e-3
            # at a body's outline, where many edge-on faces crowd (SMPL-size mesh, sigma 0.1,
            # 224^2), and keep the numbers of the earlier grouped renderer.
            x0, y0, nx, ny = pixel_ranges(tri, valid, h, w, margin, round_up=True)
            if deep is not None:
                # Faces whose grown box lies entirely in the deep interior do not contribute.
                nx = nx * (rect_sums(~deep, x0, y0, nx, ny) > 0)
            one_minus = _torch_logsum(ctx, tri, (x0, y0, nx, ny), h, w, sigma, max_pairs).exp()
        cover = 1.0 - one_minus
        if deep is not None:
            # Deep pixels may still receive terms from boundary faces: overwrite, no gradient.
            cover = cover.masked_fill(deep.view(-1), 1.0)
            one_minus = one_minus.masked_fill(deep.view(-1), 0.0)
        ctx.tri_shape = tri.shape
        ctx.save_for_backward(one_minus, tri)
        return cover.view(b, h, w)

    @staticmethod
    def backward(ctx, grad_cover):
        one_minus, tri = ctx.saved_tensors
        # dA / d(sum of log(1 - D)) = -(1 - A) at every pixel.
        g_log = -(grad_cover.reshape(-1) * one_minus)
        if ctx.kernel:
            g_log = g_log.view(grad_cover.shape).double()
            grad = kernels.soft_grad(tri, ctx.boxes, g_log, ctx.sigma, ctx.reach)
            return grad.to(tri.dtype), None, None, None, None, None, None, None, None, None
        grad = one_minus.new_zeros(6, math.prod(ctx.tri_shape[:2]))
        for face, pix, dlog in ctx.saved_pairs:
            contrib = dlog * g_log.index_select(0, pix)
            if face.device.type == "cpu":  # 1-D index_add_: ~4x faster there than along dim 1
                for k in range(6):
                    grad[k].index_add_(0, face, contrib[k])
            else:  # one launch
                grad.index_add_(1, face, contrib)
        grad = grad.t().reshape(*ctx.tri_shape[:2], 2, 3).transpose(-1, -2)
        return grad, None, None, None, None, None, None, None, None, None


def _torch_logsum(ctx, tri, boxes, h, w, sigma, max_pairs) -> torch.Tensor:
    """Sum of log(1 - D) per pixel (B*H*W,) over every pair of the boxes, in PyTorch ops;
    keeps (face, pixel, dlog) per chunk in ``ctx.saved_pairs`` when a gradient is needed."""
    table = _face_table(tri)
    logsum = tri.new_zeros(tri.shape[0] * h * w)
    need_grad = ctx.needs_input_grad[0]
    ctx.saved_pairs = []
    x0, y0, nx, ny = boxes
    for face, pix, col, row in box_pairs(x0, y0, nx, ny, h, w, max_pairs):
        px = col.to(tri.dtype).add_(0.5)
        py = row.to(tri.dtype).add_(0.5)
        logterm, dlog = _pair_terms(_gather_columns(table, face), px, py, sigma, need_grad)
        logsum.scatter_add_(0, pix, logterm)
        if need_grad:
            ctx.saved_pairs.append((face, pix.int(), dlog))
    return logsum


def soft_silhouette(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    camera: PinholeCamera,
    image_size: int | tuple[int, int],
    cam_t: torch.Tensor | None = None,
    sigma: float = DEFAULT_SIGMA,
    cutoff: float = DEFAULT_CUTOFF,
    interior: str = "hard",
    max_pairs: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Differentiable SoftRas silhouette (see the module docstring) -> (B, H, W) in [0, 1].

    vertices (B, V, 3) in camera coordinates (x right, y down, z forward), or in model
    coordinates plus ``cam_t`` (B, 3); faces (F, 3) int; ``camera`` B pinhole cameras;
    ``image_size`` int or (H, W); ``sigma`` px^2; ``cutoff`` the skipped-pair bound c;
    ``interior`` "hard" (fast, deep interior = 1) or "soft" (exact SoftRas everywhere);
    ``max_pairs`` pairs per chunk of the PyTorch path (default: :func:`default_max_pairs`);
    ``backend`` "auto" / "torch" / "numba" (see :func:`use_kernel`). Gradients flow to
    ``vertices`` and ``cam_t`` (and through them to pose, shape, camera).
    """
    if sigma <= 0:
        raise JregfixError(f"sigma must be > 0 px^2, got {sigma}")
    if interior not in ("hard", "soft"):
        raise JregfixError(f"interior must be 'hard' or 'soft', got {interior!r}")
    h, w = image_hw(image_size)
    margin = blur_margin(sigma, cutoff)
    kernel = use_kernel(backend, vertices)
    max_pairs = max_pairs or default_max_pairs(vertices.device)
    tri, valid = screen_triangles(vertices, faces, camera, cam_t)
    deep = None
    if interior == "hard":
        mask = _hard_from_triangles(tri.detach(), valid, h, w, max_pairs, kernel)
        deep = (kernels.erode if kernel else _erode)(mask, math.ceil(margin) + 1)
    if not kernel:
        return _SoftCoverage.apply(tri, valid, h, w, float(sigma), margin, deep, max_pairs)
    reach = blur_margin(sigma, cutoff / KERNEL_CUTOFF_DIVISOR)
    return _SoftCoverage.apply(tri, valid, h, w, float(sigma), reach, deep, max_pairs, reach)


def _hard_from_triangles(
    tri: torch.Tensor, valid: torch.Tensor, h: int, w: int, max_pairs: int, kernel: bool = False
) -> torch.Tensor:
    """Pixels whose centre lies in at least one valid triangle -> (B, H, W) bool."""
    if kernel:
        return kernels.hard_mask(tri, valid, h, w)
    b, f = valid.shape
    x0, y0, nx, ny = pixel_ranges(tri, valid, h, w, 0.0)
    corners = tri.transpose(-1, -2).reshape(-1, 6).t().contiguous()  # x0..x2, y0..y2 rows
    hits = tri.new_zeros(b * h * w)
    for face, pix, col, row in box_pairs(x0, y0, nx, ny, h, w, max_pairs):
        hit = inside_triangles(
            _gather_columns(corners, face), col.to(tri.dtype).add_(0.5), row.to(tri.dtype).add_(0.5)
        )
        # Counting hits with a float scatter-add is cheaper than boolean indexing (and needs no
        # host sync).
        hits.scatter_add_(0, pix, hit.to(tri.dtype))
    return (hits > 0).view(b, h, w)


@torch.no_grad()
def hard_silhouette(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    camera: PinholeCamera,
    image_size: int | tuple[int, int],
    cam_t: torch.Tensor | None = None,
    max_pairs: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Binary silhouette (B, H, W) bool: pixel centres covered by any projected face.

    Same inputs as :func:`soft_silhouette`; no gradient. Centres exactly on an edge count as
    covered, so faces sharing an edge leave no cracks. Both backends give identical masks.
    """
    h, w = image_hw(image_size)
    kernel = use_kernel(backend, vertices)
    tri, valid = screen_triangles(vertices, faces, camera, cam_t)
    return _hard_from_triangles(
        tri, valid, h, w, max_pairs or default_max_pairs(tri.device), kernel
    )
