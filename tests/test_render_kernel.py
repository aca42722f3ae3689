"""The compiled CPU kernels (jregfix.render.kernels) against the PyTorch path and exact SoftRas.

Three references: the PyTorch pair list on the same pairs (forward and gradient to rounding),
a dense all-pairs SoftRas in numpy / float64 (the pruned kernels' error, pair by pair), and
torch.autograd.gradcheck. Plus dispatch: which tensors reach the kernels.
"""

import math
import multiprocessing

import pytest
import torch

from jregfix.errors import JregfixError
from jregfix.geometry.camera import PinholeCamera, project, weak_to_cam_t
from jregfix.render import blur_margin, hard_silhouette, kernels, soft_silhouette
from jregfix.render.raster import screen_triangles
from jregfix.render.silhouette import (
    KERNEL_CUTOFF_DIVISOR,
    _erode,
    _hard_from_triangles,
    _SoftCoverage,
)
from jregfix.synthetic.body import body_blob
from tests.device_tracker import DeviceTracker
from tests.test_render_soft import dense_softras, small_scene

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="numba is not installed")


def batch_scene(batch=3, size=72, dtype=torch.float64, rings=20, segments=24):
    """Rotated body blobs (482 vertices / 960 faces): faces ~2-3 px at 72^2."""
    v, f = body_blob(rings, segments, dtype)
    gen = torch.Generator().manual_seed(5)
    ang = torch.rand(batch, generator=gen, dtype=dtype) * 2 * math.pi
    c, s, z, o = ang.cos(), ang.sin(), torch.zeros_like(ang), torch.ones_like(ang)
    rot = torch.stack(
        [torch.stack([c, z, s], -1), torch.stack([z, o, z], -1), torch.stack([-s, z, c], -1)], 1
    )
    verts = v[None] @ rot.transpose(1, 2)
    cam = PinholeCamera.spin_crop(batch, 5000.0 * size / 224, size, dtype=dtype)
    weak = torch.tensor([[0.9, 0.02, -0.03], [0.8, -0.1, 0.05], [1.0, 0.0, 0.1]], dtype=dtype)
    return verts, f, cam, weak_to_cam_t(weak[:batch])


def coverage(tri, valid, size, sigma, interior, reach, round_up=False):
    """Soft coverage of screen triangles through the kernels (reach) or PyTorch (None)."""
    margin = blur_margin(sigma, 1e-4)
    deep = None
    if interior == "hard":
        deep = _erode(
            _hard_from_triangles(tri.detach(), valid, size, size, 1 << 17), math.ceil(margin) + 1
        )
    return _SoftCoverage.apply(
        tri, valid, size, size, sigma, margin, deep, 1 << 17, reach, round_up
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("sigma", "interior"), [(1.0, "hard"), (0.1, "hard"), (1.0, "soft")])
def test_same_pairs_as_the_torch_path(dtype, sigma, interior):
    # reach = inf on the rounded boxes: exactly the PyTorch path's pairs.
    verts, f, cam, cam_t = batch_scene(dtype=dtype)
    tri, valid = screen_triangles(verts, f, cam, cam_t)
    w = torch.rand(3, 72, 72, generator=torch.Generator().manual_seed(2), dtype=dtype)
    out = []
    for reach in (None, math.inf):
        t = tri.detach().requires_grad_(True)
        a = coverage(t, valid, 72, sigma, interior, reach, round_up=True)
        (a * w).sum().backward()
        out.append((a.detach(), t.grad))
    (ref, g_ref), (ours, g_ours) = out
    assert 0.1 < ref.mean() < 0.6 and (interior == "soft" or (ref == 1).sum() > 300)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (ours - ref).abs().max() <= tol
    # float32: the PyTorch path's float32 sums of many terms vs the kernels' float64 ones.
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert (g_ours - g_ref).abs().max() <= tol * g_ref.abs().max()
    assert g_ours.dtype == dtype and g_ref.abs().max() > 0


@pytest.mark.parametrize("sigma", [1.5, 0.3])
def test_pruned_pairs_within_the_documented_bound_of_dense_softras(sigma):
    c = 1e-4
    verts, f, cam, cam_t = small_scene()
    uv = project(verts, cam, cam_t)[0].numpy()
    ref, dd = dense_softras(uv, f.numpy(), 64, 64, sigma)
    errs = {}
    for backend in ("numba", "torch"):
        ours = soft_silhouette(
            verts, f, cam, 64, cam_t, sigma=sigma, cutoff=c, interior="soft", backend=backend
        )
        errs[backend] = ref - ours[0].numpy()
    err = errs["numba"]
    # The kernels keep a pair iff its pixel is inside the triangle or within the reach r' of
    # it, i.e. (outside) iff D >= c' = c / 10: every skipped pair has D < c', and the error at
    # a pixel is at most the sum of its skipped D.
    c_kernel = c / KERNEL_CUTOFF_DIVISOR
    skipped = dd < c_kernel * (1 + 1e-9)
    assert (err >= -1e-12).all()
    assert (err.ravel() <= (dd * skipped).sum(1) + 1e-12).all()
    assert err.max() <= 10 * c_kernel  # the module docstring's bound, with c / 10
    assert err.max() < errs["torch"].max()  # closer to exact SoftRas than the PyTorch path
    assert (dd >= c).sum(1).max() > 3  # pixels with several faces in reach: a real test


@pytest.mark.slow
@pytest.mark.parametrize(("sigma", "bound"), [(1.0, 1e-3), (0.1, 5e-4)])
def test_error_on_smpl_size_mesh_at_the_outline(sigma, bound):
    # The module docstring's figures: 13776 faces at 224^2, where edge-on faces crowd.
    v, f = body_blob()
    cam = PinholeCamera.spin_crop(1, dtype=torch.float64)
    cam_t = weak_to_cam_t(torch.tensor([[0.9, 0.0, 0.0]], dtype=torch.float64))
    verts = v.double()[None]
    soft = {
        b: soft_silhouette(verts, f, cam, 224, cam_t, sigma=sigma, interior="soft", backend=b)[
            0
        ].reshape(-1)
        for b in ("numba", "torch")
    }
    pix = ((soft["torch"] > 1e-9) & (soft["torch"] < 0.999)).nonzero()[:, 0]
    assert len(pix) > 3000  # the outline band of a body
    tri = project(verts, cam, cam_t)[0][f]  # (F, 3, 2)
    p = torch.stack([pix % 224, pix // 224], -1).double() + 0.5
    exact = []
    for chunk in p.split(128):  # dense SoftRas: every face, min over segment distances
        q = chunk[:, None, None, :]
        e = tri.roll(-1, 1)[None] - tri[None]
        wv = q - tri[None]
        u = ((wv * e).sum(-1) / (e * e).sum(-1)).clamp(0, 1)
        d2 = ((wv - u[..., None] * e) ** 2).sum(-1).amin(-1)
        cross = e[..., 0] * wv[..., 1] - e[..., 1] * wv[..., 0]
        inside = (cross >= 0).all(-1) | (cross <= 0).all(-1)
        x = torch.where(inside, d2, -d2) / sigma
        exact.append(1 - torch.nn.functional.logsigmoid(-x).sum(-1).exp())
    exact = torch.cat(exact)
    err_kernel = (exact - soft["numba"][pix]).abs().max()
    err_torch = (exact - soft["torch"][pix]).abs().max()
    assert err_kernel <= bound < err_torch, (err_kernel.item(), err_torch.item())


@pytest.mark.parametrize("interior", ["soft", "hard"])
def test_gradcheck(interior):
    verts, f, _, cam_t = small_scene(torch.float64, 6, 8)
    verts = verts.clone().requires_grad_(True)
    cam_t = cam_t.clone().requires_grad_(True)
    cam = PinholeCamera.from_intrinsics(20.0, 22.0, 9.0, 9.5, batch_size=1, dtype=torch.float64)

    def fn(verts, cam_t):
        return soft_silhouette(
            verts, f, cam, (18, 20), cam_t, sigma=0.7, interior=interior, backend="numba"
        )

    out = fn(verts, cam_t)
    assert 0.05 < out.mean() < 0.9 and out.requires_grad
    assert torch.autograd.gradcheck(fn, (verts, cam_t), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hard_masks_identical(dtype):
    verts, f, cam, cam_t = batch_scene(dtype=dtype)
    verts = verts.clone()
    verts[1, :100, 2] -= 4.0  # some faces behind the camera in image 1
    cam_t[2, 0] += 0.4  # image 2 partly off the image
    masks = [hard_silhouette(verts, f, cam, (72, 80), cam_t, backend=b) for b in ("torch", "numba")]
    assert masks[0].sum() > 1000
    assert torch.equal(masks[0], masks[1])


def test_centres_on_shared_edges_are_covered():
    # A square of two triangles whose diagonal runs through pixel centres (k + 0.5, k + 0.5).
    for dtype in (torch.float32, torch.float64):
        a, b, c, d = (1.5, 1.5), (6.5, 1.5), (6.5, 6.5), (1.5, 6.5)
        tri = torch.tensor([[[a, b, c], [a, c, d]]], dtype=dtype)
        valid = torch.ones(1, 2, dtype=torch.bool)
        masks = [_hard_from_triangles(tri, valid, 9, 9, 1 << 17, kernel) for kernel in (0, 1)]
        assert torch.equal(masks[0], masks[1])
        assert masks[1][0, 1:7, 1:7].all() and masks[1].sum() == 36


@pytest.mark.parametrize("k", [0, 1, 4])
def test_erosion_equals_the_torch_path(k):
    gen = torch.Generator().manual_seed(k)
    mask = torch.rand(2, 23, 31, generator=gen) < 0.9
    mask[1, 3:20, 2:29] = True  # a block that survives erosion
    ours = kernels.erode(mask, k)
    assert torch.equal(ours, _erode(mask, k))
    assert ours[1].sum() > 0 and (k > 0 or torch.equal(ours, mask))


def test_threads_split_the_batch_without_changing_numbers():
    verts, f, cam, cam_t = batch_scene()
    n = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            v = verts.clone().requires_grad_(True)
            a = soft_silhouette(v, f, cam, 72, cam_t, backend="numba")
            a.pow(2).sum().backward()
            out.append((a.detach(), v.grad))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def _boxes_in_child(tri, valid, queue):
    torch.set_num_threads(2)
    queue.put(kernels.face_boxes(tri, valid, 72, 72, 1.5))


def test_forked_child_runs_kernels_on_fresh_threads():
    # The parent's worker threads do not exist in a forked child (e.g. DataLoader workers).
    # (Only kernels here: PyTorch's own OpenMP pool may hang in a child once it has run.)
    verts, f, cam, cam_t = batch_scene()
    tri, valid = screen_triangles(verts, f, cam, cam_t)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expect = kernels.face_boxes(tri, valid, 72, 72, 1.5)  # starts the parent's pool
    finally:
        torch.set_num_threads(n)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_boxes_in_child, args=(tri, valid, queue))
    child.start()
    try:
        assert (queue.get(timeout=60) == expect).all()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()


class Spy:
    """Replaces a kernel entry point: counts calls, or fails if ``forbid``."""

    def __init__(self, fn, forbid=False):
        self.fn, self.forbid, self.calls = fn, forbid, 0

    def __call__(self, *args):
        assert not self.forbid, "the PyTorch path was expected"
        self.calls += 1
        return self.fn(*args)


def spy_all(monkeypatch, forbid=False):
    spies = {}
    for name in ("soft_one_minus", "soft_grad", "hard_mask"):
        spies[name] = Spy(getattr(kernels, name), forbid)
        monkeypatch.setattr(kernels, name, spies[name])
    return spies


def test_dispatch_cpu_uses_the_kernels_unless_told(monkeypatch):
    verts, f, cam, cam_t = small_scene(torch.float32)
    verts.requires_grad_(True)
    spies = spy_all(monkeypatch)
    soft_silhouette(verts, f, cam, 32, cam_t).sum().backward()
    assert [s.calls for s in spies.values()] == [1, 1, 1]
    spy_all(monkeypatch, forbid=True)
    soft_silhouette(verts, f, cam, 32, cam_t, backend="torch").sum().backward()
    hard_silhouette(verts, f, cam, 32, cam_t, backend="torch")
    monkeypatch.setenv("JREGFIX_RENDER_BACKEND", "torch")
    soft_silhouette(verts, f, cam, 32, cam_t).sum().backward()
    # Other dtypes go to PyTorch; asking for numba there is an error.
    monkeypatch.delenv("JREGFIX_RENDER_BACKEND")
    hard_silhouette(
        verts.detach().bfloat16(), f, cam.to(dtype=torch.bfloat16), 32, cam_t.bfloat16()
    )
    with pytest.raises(JregfixError, match="backend 'numba' needs"):
        hard_silhouette(verts.detach().half(), f, cam, 32, cam_t.half(), backend="numba")
    with pytest.raises(JregfixError, match="backend must be one of"):
        soft_silhouette(verts, f, cam, 32, cam_t, backend="cuda")
    monkeypatch.setenv("JREGFIX_RENDER_BACKEND", "fast")
    with pytest.raises(JregfixError, match="JREGFIX_RENDER_BACKEND"):
        soft_silhouette(verts, f, cam, 32, cam_t)


def test_without_numba_the_torch_path_runs(monkeypatch):
    verts, f, cam, cam_t = small_scene(torch.float32)
    spy_all(monkeypatch, forbid=True)
    monkeypatch.setattr(kernels, "AVAILABLE", False)
    assert soft_silhouette(verts, f, cam, 32, cam_t).mean() > 0.05
    with pytest.raises(JregfixError, match="install numba"):
        soft_silhouette(verts, f, cam, 32, cam_t, backend="numba")


def test_gpu_tensors_take_the_torch_path(monkeypatch):
    # The tracker's GPU stand-ins are CPU tensors underneath; they must not reach numpy.
    verts, f, cam, cam_t = small_scene(torch.float32)
    spy_all(monkeypatch, forbid=True)
    with DeviceTracker() as t:
        v = verts.cuda().requires_grad_(True)
        a = soft_silhouette(v, f.cuda(), cam.to("cuda"), 32, cam_t.cuda())
        a.sum().backward()
        mask = hard_silhouette(v, f.cuda(), cam.to("cuda"), 32, cam_t.cuda())
        assert t.is_tagged(a) and t.is_tagged(v.grad) and t.is_tagged(mask)
