"""Compiled CPU kernels (numba) for the soft and hard silhouettes of :mod:`.silhouette`.

Same semantics as the PyTorch path there, evaluated pair by pair: for each image, each face
with a non-empty pixel box, each pixel of that box. No (face, pixel) list is built and the
backward saves nothing per pair: it recomputes the pair terms from the triangles and the
per-pixel gradient of sum log(1 - D).

Pairs are pruned by geometry, not only by box: a pixel centre outside a triangle and farther
than ``reach`` from it is skipped before any exp (``reach`` = inf keeps every pair of the
boxes). Pixels in the deep interior are skipped (they are overwritten with 1 anyway), so are
pixels with a zero gradient in the backward. The forward multiplies the factors 1 - D instead
of adding their logs: one exp and a division per pair.

The soft kernels compute in float64 whatever the input dtype, with fused multiply-adds allowed
(rounding-level differences from the PyTorch path). The hard kernel computes the edge functions
in the input dtype with the PyTorch path's operations and no contraction, so both paths give
identical masks.

Threads. Images are independent (no write races), so a batch is cut into contiguous slices run
by ``torch.get_num_threads()`` Python threads calling ``nogil`` kernels, rather than by numba's
own parallel layer: that would start a second OpenMP (or TBB) pool beside PyTorch's, and two
pools of spinning threads on the same cores is the oversubscription jregfix.threads avoids.

Compiled code is cached on disk (``cache=True``): the first call in a fresh environment
compiles for a few seconds, later processes load it in well under a second.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import numpy as np
import torch


def _load_numba() -> ModuleType | None:
    """numba, or None when it is missing or broken (e.g. llvmlite): the package must still
    import, and the renderer falls back to PyTorch ops."""
    try:
        import numba
    except Exception:
        return None
    return numba


numba = _load_numba()
AVAILABLE = numba is not None
DTYPES = (torch.float32, torch.float64)


def _njit(fn=None, **options):
    if fn is None:
        return lambda f: _njit(f, **options)
    return numba.njit(cache=True, nogil=True, **options)(fn) if numba is not None else fn


# For the soft kernels: fused multiply-adds and reciprocals (rounding-level differences only).
_FAST = {"contract", "arcp", "nsz"}


@_njit(fastmath=_FAST)
def _pair(ax, ay, ex, ey, sx, sy, px, py):
    """Nearest-edge distance of pixel centre (px, py) to one triangle (float64 scalars).

    Returns d2, the inside sign s (+1 inside, -1 outside, 0 on an edge), the nearest edge k
    (ties go to the lower index), its clamped parameter u and p - q (dx, dy) for the nearest
    point q. The per-edge arithmetic is the PyTorch path's (_pair_terms)."""
    best, k, u_k, dx_k, dy_k = np.inf, 0, 0.0, 0.0, 0.0
    cmin, cmax = np.inf, -np.inf
    for i in range(3):
        wx, wy = px - ax[i], py - ay[i]
        u = min(max(wx * sx[i] + wy * sy[i], 0.0), 1.0)
        dx, dy = wx - u * ex[i], wy - u * ey[i]
        d2 = dx * dx + dy * dy
        if d2 < best:
            best, k, u_k, dx_k, dy_k = d2, i, u, dx, dy
        cross = wy * ex[i] - wx * ey[i]
        cmin, cmax = min(cmin, cross), max(cmax, cross)
    prod = cmin * cmax
    s = 1.0 if prod > 0 else (-1.0 if prod < 0 else 0.0)
    return best, s, k, u_k, dx_k, dy_k


@_njit(fastmath=_FAST)
def _load(tri, b, f, ax, ay, ex, ey, sx, sy):
    """Face constants into float64 scratch arrays (3,): vertices, edges, edge / |edge|^2."""
    for i in range(3):
        ax[i], ay[i] = tri[b, f, i, 0], tri[b, f, i, 1]
    for i in range(3):
        j = (i + 1) % 3
        ex[i], ey[i] = ax[j] - ax[i], ay[j] - ay[i]
        n2 = max(ex[i] * ex[i] + ey[i] * ey[i], 1e-12)
        sx[i], sy[i] = ex[i] / n2, ey[i] / n2


@_njit(fastmath=_FAST)
def _soft_forward(tri, boxes, deep, sigma, r2, one_minus, b0, b1):
    """Multiply one_minus (B, H, W) float64 by 1 - D of every kept pair of images b0..b1-1."""
    consts = np.empty((6, 3))
    ax, ay, ex, ey, sx, sy = consts[0], consts[1], consts[2], consts[3], consts[4], consts[5]
    for b in range(b0, b1):
        for f in range(tri.shape[1]):
            x0, y0, nx, ny = boxes[b, f, 0], boxes[b, f, 1], boxes[b, f, 2], boxes[b, f, 3]
            if nx == 0 or ny == 0:
                continue
            _load(tri, b, f, ax, ay, ex, ey, sx, sy)
            for row in range(y0, y0 + ny):
                py = row + 0.5
                for col in range(x0, x0 + nx):
                    if deep[b, row, col]:
                        continue
                    d2, s, _, _, _, _ = _pair(ax, ay, ex, ey, sx, sy, col + 0.5, py)
                    if s <= 0.0 and d2 > r2:
                        continue  # outside, beyond the reach: D below the kernels' cut-off
                    # A product, not a sum of logs: one exp per pair and no log. It reaches 0
                    # (A = 1) only where sum log(1 - D) < -745, where exp(sum) is 0 too.
                    one_minus[b, row, col] /= 1.0 + math.exp(s * d2 / sigma)


@_njit(fastmath=_FAST)
def _soft_backward(tri, boxes, g_log, sigma, r2, grad, b0, b1):
    """grad (B, F, 3, 2) float64 of sum(g_log * log-sum) over the forward's pairs."""
    consts = np.empty((6, 3))
    ax, ay, ex, ey, sx, sy = consts[0], consts[1], consts[2], consts[3], consts[4], consts[5]
    g = np.empty((3, 2))
    for b in range(b0, b1):
        for f in range(tri.shape[1]):
            x0, y0, nx, ny = boxes[b, f, 0], boxes[b, f, 1], boxes[b, f, 2], boxes[b, f, 3]
            if nx == 0 or ny == 0:
                continue
            _load(tri, b, f, ax, ay, ex, ey, sx, sy)
            g[:] = 0.0
            for row in range(y0, y0 + ny):
                py = row + 0.5
                for col in range(x0, x0 + nx):
                    gl = g_log[b, row, col]
                    if gl == 0.0:  # deep interior, saturated pixels, zero upstream gradient
                        continue
                    d2, s, k, u, dx, dy = _pair(ax, ay, ex, ey, sx, sy, col + 0.5, py)
                    if s <= 0.0 and d2 > r2:
                        continue
                    x = s * d2 / sigma
                    if x >= 0.0:
                        dd = 1.0 / (1.0 + math.exp(-x))
                    else:
                        z = math.exp(x)
                        dd = z / (1.0 + z)
                    # d log(1 - D) / dq = (2 s D / sigma) (p - q); q's share on the edge's ends.
                    coef = gl * 2.0 * s * dd / sigma
                    j = (k + 1) % 3
                    g[k, 0] += (1.0 - u) * coef * dx
                    g[k, 1] += (1.0 - u) * coef * dy
                    g[j, 0] += u * coef * dx
                    g[j, 1] += u * coef * dy
            grad[b, f] = g


@_njit
def _hard(tri, boxes, cx, cy, hits, b0, b1):
    """hits (B, H, W) |= pixel centre (cx[col], cy[row]) inside or on a triangle, in the input
    dtype with inside_triangles' operations."""
    for b in range(b0, b1):
        for f in range(tri.shape[1]):
            x0, y0, nx, ny = boxes[b, f, 0], boxes[b, f, 1], boxes[b, f, 2], boxes[b, f, 3]
            if nx == 0 or ny == 0:
                continue
            t = tri[b, f]
            for row in range(y0, y0 + ny):
                py = cy[row]
                for col in range(x0, x0 + nx):
                    if hits[b, row, col]:
                        continue
                    px = cx[col]
                    c0 = (t[1, 0] - t[0, 0]) * (py - t[0, 1]) - (t[1, 1] - t[0, 1]) * (px - t[0, 0])
                    c1 = (t[2, 0] - t[1, 0]) * (py - t[1, 1]) - (t[2, 1] - t[1, 1]) * (px - t[1, 0])
                    c2 = (t[0, 0] - t[2, 0]) * (py - t[2, 1]) - (t[0, 1] - t[2, 1]) * (px - t[2, 0])
                    if min(min(c0, c1), c2) * max(max(c0, c1), c2) >= 0:
                        hits[b, row, col] = True


@_njit
def _face_boxes(tri, valid, h, w, lo_off, hi_off, boxes, b0, b1):
    """boxes (B, F, 4) = x0, y0, nx, ny of pixel_ranges(round_up=False), computed like it in
    the input dtype (lo_off, hi_off: margin + 0.5 and 0.5 - margin as 1-element arrays)."""
    big = max(h, w) + 1.0
    for b in range(b0, b1):
        for f in range(tri.shape[1]):
            if not valid[b, f]:
                boxes[b, f, :] = 0
                continue
            for axis in range(2):
                size = w if axis == 0 else h
                t0, t1, t2 = tri[b, f, 0, axis], tri[b, f, 1, axis], tri[b, f, 2, axis]
                lo = math.ceil(min(max(min(min(t0, t1), t2) - lo_off[0], -1.0), big))
                hi = math.floor(min(max(max(max(t0, t1), t2) - hi_off[0], -2.0), big))
                start = min(max(lo, 0), size)
                boxes[b, f, axis] = start
                boxes[b, f, 2 + axis] = max(min(hi, size - 1) - start + 1, 0)


@_njit
def _erode(mask, k, out, b0, b1):
    """out (B, H, W) = every pixel of the (2k+1)^2 square around is in mask (outside: empty),
    as two 1-D passes of run lengths."""
    h, w = mask.shape[1], mask.shape[2]
    rows = np.empty((h, w), np.bool_)
    for b in range(b0, b1):
        for y in range(h):  # rows[y, x]: mask[y, x - k .. x + k] all set
            run = 0
            for x in range(w + k):
                run = run + 1 if x < w and mask[b, y, x] else 0
                if x >= k:
                    rows[y, x - k] = run >= 2 * k + 1
        for x in range(w):
            run = 0
            for y in range(h + k):
                run = run + 1 if y < h and rows[y, x] else 0
                if y >= k:
                    out[b, y - k, x] = run >= 2 * k + 1


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _over_batch(kernel: Callable[..., None], batch: int, *args) -> None:
    """Run kernel(*args, b0, b1) over contiguous slices of the batch, one per torch thread."""
    n = max(1, min(torch.get_num_threads(), batch))
    if n == 1:
        kernel(*args, 0, batch)
        return
    # Keyed by process too: a forked child inherits the pool object but not its threads.
    pool = _pools.get((os.getpid(), n))
    if pool is None:
        pool = _pools[os.getpid(), n] = ThreadPoolExecutor(n, thread_name_prefix="jregfix-render")
    cuts = [batch * i // n for i in range(n + 1)]
    jobs = [
        pool.submit(kernel, *(*args, lo, hi)) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)
    ]
    for job in jobs:
        job.result()


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def face_boxes(tri, valid, h, w, margin) -> np.ndarray:
    """Pixel boxes of :func:`jregfix.render.raster.pixel_ranges` (``round_up=False``), as one
    (B, F, 4) int64 array x0, y0, nx, ny, without PyTorch's slow small-axis reductions."""
    b = tri.shape[0]
    offsets = np.array(
        [margin + 0.5, 0.5 - margin], np.float32 if tri.dtype == torch.float32 else np.float64
    )
    boxes = np.empty((*valid.shape, 4), np.int64)
    _over_batch(_face_boxes, b, _np(tri), _np(valid), h, w, offsets[:1], offsets[1:], boxes)
    return boxes


def stack_boxes(x0, y0, nx, ny) -> np.ndarray:
    """Boxes from pixel_ranges (four (B, F) tensors) -> (B, F, 4) int64 array."""
    return _np(torch.stack([x0, y0, nx, ny], -1).to(torch.int64))


def soft_one_minus(tri, boxes, deep, h, w, sigma, reach) -> torch.Tensor:
    """Product over kept pairs of 1 - D per pixel, i.e. 1 - A -> (B, H, W) float64.

    tri (B, F, 3, 2) float32/64 CPU; boxes (B, F, 4) from :func:`face_boxes` grown by at least
    ``reach`` (or :func:`stack_boxes`); deep (B, H, W) bool or None (pixels left at 1); pairs
    outside their triangle by more than ``reach`` px are skipped (inf: keep every box pair)."""
    b = tri.shape[0]
    deep = np.zeros((b, h, w), bool) if deep is None else _np(deep)
    out = np.ones((b, h, w))
    _over_batch(_soft_forward, b, _np(tri), boxes, deep, float(sigma), float(reach) ** 2, out)
    return torch.from_numpy(out)


def soft_grad(tri, boxes, g_log, sigma, reach) -> torch.Tensor:
    """Gradient (B, F, 3, 2) float64 w.r.t. tri of sum(g_log * log soft_one_minus(...)), same
    pairs; g_log (B, H, W) float64 (zero where the forward overwrote the pixel)."""
    b = tri.shape[0]
    out = np.zeros(tri.shape)
    _over_batch(
        _soft_backward, b, _np(tri), boxes, _np(g_log), float(sigma), float(reach) ** 2, out
    )
    return torch.from_numpy(out)


def hard_mask(tri, valid, h, w) -> torch.Tensor:
    """Pixels whose centre lies in a valid triangle -> (B, H, W) bool; tri (B, F, 3, 2)."""
    b = tri.shape[0]
    boxes = face_boxes(tri, valid, h, w, 0.0)
    hits = np.zeros((b, h, w), bool)
    cx = _np(torch.arange(w, dtype=tri.dtype).add_(0.5))
    cy = _np(torch.arange(h, dtype=tri.dtype).add_(0.5))
    _over_batch(_hard, b, _np(tri), boxes, cx, cy, hits)
    return torch.from_numpy(hits)


def erode(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Binary erosion of (B, H, W) bool by a (2k+1)^2 square, outside the image empty: the
    PyTorch path's ``_erode`` without its float max-pools."""
    out = np.empty(mask.shape, bool)
    _over_batch(_erode, mask.shape[0], _np(mask), k, out)
    return torch.from_numpy(out)
