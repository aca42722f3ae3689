"""Soft silhouette against a dense float64 all-pairs SoftRas reference, gradients, limits."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion
from scipy.special import expit

from jregfix.geometry.camera import PinholeCamera, project, weak_to_cam_t
from jregfix.render import blur_margin, hard_silhouette, soft_silhouette
from jregfix.synthetic.body import body_blob, uv_sphere


def dense_softras(uv, faces, h, w, sigma):
    """Reference: every pixel centre against every triangle, numpy float64.

    Returns A (H, W) and the per-pair D (H * W, F) to reason about skipped pairs.
    Inside test by barycentric coordinates; distance as the minimum over the three segments.
    """
    ys, xs = np.mgrid[0:h, 0:w]
    p = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], 1)[:, None, :]  # (P, 1, 2)
    tri = uv[faces]  # (F, 3, 2)
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    v0, v1, v2 = b - a, c - a, p - a
    den = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    beta = (v2[..., 0] * v1[:, 1] - v1[:, 0] * v2[..., 1]) / den
    gamma = (v0[:, 0] * v2[..., 1] - v2[..., 0] * v0[:, 1]) / den
    inside = (beta >= 0) & (gamma >= 0) & (beta + gamma <= 1)
    d2 = np.full(inside.shape, np.inf)
    for s, e in ((a, b), (b, c), (c, a)):
        seg = e - s
        t = np.clip(((p - s) * seg).sum(-1) / (seg * seg).sum(-1), 0.0, 1.0)
        d2 = np.minimum(d2, (((s + t[..., None] * seg) - p) ** 2).sum(-1))
    x = np.where(inside, d2, -d2) / sigma
    dd = expit(x)
    return 1.0 - np.prod(1.0 - dd, axis=1).reshape(h, w), dd


def small_scene(dtype=torch.float64, rings=10, segments=12):
    v, f = body_blob(rings, segments, dtype)
    c, s = math.cos(0.6), math.sin(0.6)
    rot = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=dtype)
    verts = (v @ rot.T)[None]
    cam = PinholeCamera.from_intrinsics(80.0, 80.0, 30.0, 33.0, batch_size=1, dtype=dtype)
    cam_t = torch.tensor([[0.05, 0.0, 3.0]], dtype=dtype)
    return verts, f, cam, cam_t


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_matches_dense_with_tight_cutoff(sigma):
    verts, f, cam, cam_t = small_scene()
    uv = project(verts, cam, cam_t)[0].numpy()
    ref, _ = dense_softras(uv, f.numpy(), 64, 64, sigma)
    assert 0.1 < ref.mean() < 0.6  # the blob fills a good part of the image
    ours = soft_silhouette(verts, f, cam, 64, cam_t, sigma=sigma, cutoff=1e-15, interior="soft")
    assert np.abs(ours[0].numpy() - ref).max() <= 1e-6
    # Tiny chunks exercise the chunking path and give the same numbers.
    chunked = soft_silhouette(
        verts, f, cam, 64, cam_t, sigma=sigma, cutoff=1e-15, interior="soft", max_pairs=500
    )
    assert torch.allclose(chunked, ours, atol=1e-12, rtol=0)


def test_default_cutoff_error_within_documented_bound():
    sigma, c = 1.5, 1e-4
    verts, f, cam, cam_t = small_scene()
    uv = project(verts, cam, cam_t)[0].numpy()
    ref, dd = dense_softras(uv, f.numpy(), 64, 64, sigma)
    ours = soft_silhouette(
        verts, f, cam, 64, cam_t, sigma=sigma, cutoff=c, interior="soft", backend="torch"
    )  # the kernels' pruning: tests/test_render_kernel.py
    err = ref - ours[0].numpy()
    # Pairs outside a face's box grown by r are the skipped ones: each has D < c and the error
    # at a pixel is at most the sum of its skipped D (1 - prod(1 - D) <= sum D).
    r = blur_margin(sigma, c)
    tri = uv[f.numpy()]
    lo, hi = tri.min(1) - r, tri.max(1) + r
    ys, xs = np.mgrid[0:64, 0:64]
    p = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], 1)[:, None, :]
    skipped = ((p < lo) | (p > hi)).any(-1)
    assert dd[skipped].max() < c
    assert (err >= -1e-12).all()
    assert (err.ravel() <= (dd * skipped).sum(1) + 1e-12).all()
    assert err.max() <= 10 * c


def test_hard_interior_mode_matches_soft_mode_outside_deep_interior():
    sigma = 1.0
    verts, f, cam, cam_t = small_scene()
    soft = soft_silhouette(verts, f, cam, 64, cam_t, sigma=sigma, interior="soft")[0]
    fast = soft_silhouette(verts, f, cam, 64, cam_t, sigma=sigma, interior="hard")[0]
    mask = hard_silhouette(verts, f, cam, 64, cam_t)[0].numpy()
    k = math.ceil(blur_margin(sigma, 1e-4)) + 1
    deep = binary_erosion(np.pad(mask, k), np.ones((2 * k + 1,) * 2), border_value=0)[k:-k, k:-k]
    assert deep.sum() > 50
    fast, soft = fast.numpy(), soft.numpy()
    assert (fast[deep] == 1.0).all()
    assert np.abs(fast - soft)[~deep].max() <= 1e-12
    assert (1.0 - soft[deep]).max() <= 0.05


def test_hard_interior_error_on_smpl_size_mesh():
    # 6890 / 13776 faces at 224^2, faces ~2 px: the documented deep-interior deficit bound.
    v, f = body_blob()
    cam = PinholeCamera.spin_crop(1)
    cam_t = weak_to_cam_t(torch.tensor([[0.9, 0.0, 0.0]]))
    soft = soft_silhouette(v[None], f, cam, 224, cam_t, interior="soft")[0]
    fast = soft_silhouette(v[None], f, cam, 224, cam_t, interior="hard")[0]
    deep = fast == 1.0
    assert deep.sum() > 3000
    assert (1 - soft[deep]).max() <= 0.05
    assert (fast - soft).abs()[~deep].max() <= 1e-5


@pytest.mark.parametrize("interior", ["soft", "hard"])
def test_gradcheck(interior):
    v, f = uv_sphere(2, 5, torch.float64)
    v = v * torch.tensor([1.0, 0.7, 0.8], dtype=torch.float64) + 0.05 * torch.randn(
        v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    cam = PinholeCamera.from_intrinsics(4.0, 4.4, 5.5, 5.0, batch_size=1, dtype=torch.float64)
    verts = v[None].clone().requires_grad_(True)
    cam_t = torch.tensor([[0.1, -0.05, 3.0]], dtype=torch.float64, requires_grad=True)

    def fn(verts, cam_t):
        return soft_silhouette(verts, f, cam, (10, 11), cam_t, sigma=0.7, interior=interior)

    out = fn(verts, cam_t)
    assert 0.05 < out.mean() < 0.9 and out.requires_grad
    assert torch.autograd.gradcheck(fn, (verts, cam_t), eps=1e-6, atol=1e-6)


def test_converges_to_hard_as_sigma_vanishes():
    verts, f, cam, cam_t = small_scene(torch.float64, 16, 20)
    hard = hard_silhouette(verts, f, cam, 64, cam_t)[0].double()
    errs = [
        (soft_silhouette(verts, f, cam, 64, cam_t, sigma=s, interior="soft")[0] - hard)
        .abs()
        .mean()
        .item()
        for s in (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
    ]
    assert all(a > b for a, b in zip(errs[:-1], errs[1:], strict=True))
    assert errs[-1] < 1e-3


def test_gradient_points_the_right_way():
    # Growing the coverage where the target is larger must move boundary vertices outwards.
    verts, f, cam, cam_t = small_scene(torch.float32)
    verts = verts.clone().requires_grad_(True)
    soft_silhouette(verts, f, cam, 64, cam_t).sum().backward()
    centre = verts.detach()[0, :, :2].mean(0)
    outward = verts.detach()[0, :, :2] - centre
    assert (verts.grad[0, :, :2] * outward).sum() > 0
