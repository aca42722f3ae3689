"""The renderer on a (tracked) GPU: few launches and host syncs, and the previous numbers.

The reference is the grouped renderer this package used before the flat pair list (copied
below, test-only): faces grouped by box shape, one dense (faces x box pixels) grid per group.
"""

import math
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from jregfix.geometry.camera import PinholeCamera, weak_to_cam_t
from jregfix.render import chamfer_silhouette_loss, hard_silhouette, soft_silhouette
from jregfix.render.raster import box_pairs, image_hw, rect_sums, screen_triangles
from jregfix.render.silhouette import _erode, blur_margin
from jregfix.synthetic.body import body_blob
from tests.device_tracker import DeviceTracker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_render import scene

SIZE = 224


# --- the previous renderer (reference only) -------------------------------------------------
def old_ranges(tri, valid, h, w, margin):
    lo = torch.ceil((tri.amin(-2) - (margin + 0.5)).clamp(-1.0, max(h, w) + 1.0)).long()
    hi = torch.floor((tri.amax(-2) - (0.5 - margin)).clamp(-2.0, max(h, w) + 1.0)).long()
    x0, y0 = lo[..., 0].clamp(0, w), lo[..., 1].clamp(0, h)
    nx = (hi[..., 0].clamp(max=w - 1) - x0 + 1).clamp(min=0)
    ny = (hi[..., 1].clamp(max=h - 1) - y0 + 1).clamp(min=0)
    empty = ~valid | (nx == 0) | (ny == 0)

    def bucket(n):
        step = torch.exp2(torch.floor(torch.log2(n.clamp(min=1).double())) - 2).clamp(min=1)
        return ((n + step.long() - 1) // step.long() * step.long()).clamp(min=4)

    nx, ny = bucket(nx).clamp(max=w), bucket(ny).clamp(max=h)
    x0, y0 = torch.minimum(x0, w - nx), torch.minimum(y0, h - ny)
    return x0, y0, nx.masked_fill(empty, 0), ny


def old_groups(nx, ny, max_pairs):
    nx, ny = nx.reshape(-1), ny.reshape(-1)
    fi = (nx * ny).nonzero().squeeze(1)
    if fi.numel() == 0:
        return
    key, order = (ny[fi] * (int(nx.max()) + 1) + nx[fi]).sort(stable=True)
    fi = fi[order]
    start = 0
    for count in torch.unique_consecutive(key, return_counts=True)[1].tolist():
        gx, gy = int(nx[fi[start]]), int(ny[fi[start]])
        local = torch.arange(gx * gy)
        step = max(1, max_pairs // (gx * gy))
        for lo in range(start, start + count, step):
            yield fi[lo : min(lo + step, start + count)], local % gx, local // gx
        start += count


def old_soft(vertices, faces, camera, size, cam_t, sigma, cutoff, interior, max_pairs=1 << 17):
    """Coverage (B, H, W) with autograd through a dense per-group evaluation."""
    h, w = image_hw(size)
    margin = blur_margin(sigma, cutoff)
    tri, valid = screen_triangles(vertices, faces, camera, cam_t)
    b, f = valid.shape
    deep = None
    if interior == "hard":
        deep = _erode(old_hard(tri.detach(), valid, h, w), math.ceil(margin) + 1)
    x0, y0, nx, ny = old_ranges(tri.detach(), valid, h, w, margin)
    if deep is not None:
        nx = nx * (rect_sums(~deep, x0, y0, nx, ny) > 0)
    flat = tri.reshape(-1, 3, 2)
    logsum = tri.new_zeros(b * h * w)
    for fi, ox, oy in old_groups(nx, ny, max_pairs):
        p = torch.stack([x0.reshape(-1)[fi, None] + ox, y0.reshape(-1)[fi, None] + oy], -1)
        p = p.to(tri.dtype) + 0.5  # (M, K, 2)
        a = flat[fi][:, None]  # (M, 1, 3, 2)
        e = a.roll(-1, 2) - a
        wv = p[:, :, None] - a
        u = ((wv * e).sum(-1) / (e * e).sum(-1).clamp(min=1e-12)).clamp(0, 1)
        d2 = ((wv - u[..., None] * e) ** 2).sum(-1).amin(-1)
        cross = e[..., 0] * wv[..., 1] - e[..., 1] * wv[..., 0]
        sign = torch.sign(cross.amin(-1) * cross.amax(-1))
        term = torch.nn.functional.logsigmoid(-(d2 * sign) / sigma)
        pix = ((fi // f) * (h * w) + y0.reshape(-1)[fi] * w + x0.reshape(-1)[fi])[:, None] + (
            oy * w + ox
        )[None]
        logsum = logsum.scatter_add(0, pix.reshape(-1), term.reshape(-1))
    cover = 1 - logsum.exp()
    if deep is not None:
        cover = cover.masked_fill(deep.view(-1), 1.0)
    return cover.view(b, h, w)


def old_hard(tri, valid, h, w):
    b, f = valid.shape
    x0, y0, nx, ny = old_ranges(tri, valid, h, w, 0.0)
    flat = tri.reshape(-1, 3, 2)
    hits = torch.zeros(b * h * w, dtype=torch.bool)
    for fi, ox, oy in old_groups(nx, ny, 1 << 17):
        px = (x0.reshape(-1)[fi, None] + ox).to(tri.dtype) + 0.5
        py = (y0.reshape(-1)[fi, None] + oy).to(tri.dtype) + 0.5
        cross = []
        for i in range(3):
            a, c = flat[fi, i], flat[fi, (i + 1) % 3]
            cross.append(
                (c[:, 0:1] - a[:, 0:1]) * (py - a[:, 1:2])
                - (c[:, 1:2] - a[:, 1:2]) * (px - a[:, 0:1])
            )
        cross = torch.stack(cross)
        hit = cross.amin(0) * cross.amax(0) >= 0
        pix = ((fi // f) * (h * w) + y0.reshape(-1)[fi] * w + x0.reshape(-1)[fi])[:, None] + (
            oy * w + ox
        )[None]
        hits[pix[hit]] = True
    return hits.view(b, h, w)


# --- tests ----------------------------------------------------------------------------------
def weights(batch):
    return torch.rand(batch, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
@pytest.mark.parametrize(("sigma", "interior"), [(0.1, "hard"), (1.0, "hard"), (1.0, "soft")])
def test_same_numbers_as_the_previous_renderer(sigma, interior):
    # float64, so that the comparison sees the pairs evaluated, not float32 summation order.
    verts, f, cam, cam_t = scene("smpl", 2, SIZE)
    verts, cam, cam_t = verts.double(), cam.to(dtype=torch.float64), cam_t.double()
    w = weights(2).double()
    out = []
    for render in (partial(soft_silhouette, backend="torch"), old_soft):
        v = verts.clone().requires_grad_(True)
        a = render(v, f, cam, SIZE, cam_t, sigma=sigma, cutoff=1e-4, interior=interior)
        (a * w).sum().backward()
        out.append((a.detach(), v.grad))
    (new, g_new), (old, g_old) = out
    assert 0.1 < new.mean() < 0.5  # a body fills a good part of the images
    assert (new - old).abs().max() <= 1e-9
    assert (g_new - g_old).abs().max() <= 1e-9 * g_old.abs().max()
    tri, valid = screen_triangles(verts, f, cam, cam_t)
    for backend in ("torch", "numba"):
        assert torch.equal(
            hard_silhouette(verts, f, cam, SIZE, cam_t, backend=backend),
            old_hard(tri, valid, SIZE, SIZE),
        )


def test_pair_list_enumerates_every_box_pixel_once():
    gen = torch.Generator().manual_seed(3)
    b, f, h, w = 2, 7, 9, 11
    x0, y0 = torch.randint(0, w, (b, f), generator=gen), torch.randint(0, h, (b, f), generator=gen)
    nx = (torch.randint(0, 5, (b, f), generator=gen)).minimum(w - x0)
    ny = (torch.randint(0, 5, (b, f), generator=gen)).minimum(h - y0)
    expect = sorted(
        (bi * f + fi, bi * h * w + r * w + c, c, r)
        for bi in range(b)
        for fi in range(f)
        for r in range(int(y0[bi, fi]), int(y0[bi, fi] + ny[bi, fi]))
        for c in range(int(x0[bi, fi]), int(x0[bi, fi] + nx[bi, fi]))
    )
    for max_pairs in (3, 1000):  # chunks cutting through boxes, and one chunk
        chunks = list(box_pairs(x0, y0, nx, ny, h, w, max_pairs))
        got = sorted(tuple(int(x) for x in t) for c in chunks for t in zip(*c, strict=True))
        assert got == expect
        assert all(len(c[0]) <= max_pairs for c in chunks)


@pytest.mark.slow
@pytest.mark.parametrize("sigma", [1.0, 0.1])
def test_launches_and_syncs_per_forward_backward_at_batch_16(sigma):
    verts, f, cam, cam_t = scene("smpl", 16, SIZE)
    w = weights(16)
    v_cpu = verts.clone().requires_grad_(True)
    ref = soft_silhouette(v_cpu, f, cam, SIZE, cam_t, sigma=sigma, backend="torch")
    (ref * w).sum().backward()
    with DeviceTracker() as t:
        v = verts.cuda().requires_grad_(True)
        args = (f.cuda(), cam.to("cuda"), SIZE, cam_t.cuda())
        w_gpu = w.cuda()
        t.reset()
        a = soft_silhouette(v, *args, sigma=sigma)
        (a * w_gpu).sum().backward()
        assert t.is_tagged(a) and t.is_tagged(v.grad)
        assert t.launches <= 50 * f.shape[0] / 1000, t.summary()
        assert t.syncs <= 10, t.summary()
        assert t.syncs == 2, t.summary()  # the two pair counts of the forward
        a, grad = a.detach().cpu(), v.grad.cpu()
    # The GPU-sized chunks and one-launch gathers give the CPU path's numbers.
    assert (a - ref.detach()).abs().max() <= 1e-6
    assert (grad - v_cpu.grad).abs().max() <= 1e-5 * v_cpu.grad.abs().max()


def old_chamfer(vertices, faces, camera, target, cam_t, border=2):
    """The previous chamfer loss: one image at a time (nonzero, per-image cdist)."""
    from jregfix.geometry.camera import project

    h, w = target.shape[1:]
    vertices = vertices + cam_t[:, None, :]
    with torch.no_grad():
        mask = hard_silhouette(vertices, faces, camera, (h, w))
        near_bg = (
            torch.nn.functional.max_pool2d(
                (~mask).float()[:, None], 2 * border + 1, stride=1, padding=border
            )[:, 0]
            > 0
        )
        tri = vertices[:, faces]
        normal = torch.linalg.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0])
        front_face = (normal * tri[:, :, 0]).sum(-1) < 0
        edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        owner = torch.arange(faces.shape[0]).repeat(3)
        key, order = (edges.min(1).values * vertices.shape[1] + edges.max(1).values).sort()
        edges, owner = edges[order], owner[order]
        pair = (key[1:] == key[:-1]).nonzero().squeeze(1)
        flip = front_face[:, owner[pair]] != front_face[:, owner[pair + 1]]
        outline = torch.zeros(vertices.shape[:2], dtype=torch.bool)
        b_idx, e_idx = flip.nonzero(as_tuple=True)
        ends = edges[pair[e_idx]]
        outline[b_idx[:, None].expand_as(ends), ends] = True
        front = vertices[..., 2] > 1e-3
        outline &= front
        pix = (
            project(torch.where(front[..., None], vertices, torch.tensor([0.0, 0.0, 1.0])), camera)
            .floor()
            .long()
        )
        col, row = pix[..., 0], pix[..., 1]
        outline &= (col >= 0) & (col < w) & (row >= 0) & (row < h)
        outline &= near_bg.view(-1, h * w).gather(1, (row * w + col).clamp(0, h * w - 1))
    out = []
    for b, m in enumerate(target):
        yh, xh = (m[:, :-1] != m[:, 1:]).nonzero(as_tuple=True)
        yv, xv = (m[:-1, :] != m[1:, :]).nonzero(as_tuple=True)
        pts = torch.cat(
            [torch.stack([xh + 1.0, yh + 0.5], -1), torch.stack([xv + 0.5, yv + 1.0], -1)]
        )
        sel = outline[b].nonzero().squeeze(1)
        if sel.numel() == 0 or pts.shape[0] == 0:
            out.append(vertices.new_zeros(()))
            continue
        d = torch.cdist(project(vertices[b : b + 1, sel], camera[b : b + 1])[0], pts)
        out.append(0.5 * (d.min(1).values.mean() + d.min(0).values.mean()))
    return torch.stack(out)


def test_chamfer_batched_equals_the_previous_per_image_loss():
    v, f = body_blob(30, 36)
    cam = PinholeCamera.spin_crop(3, 5000.0 * 96 / 224, 96)
    cam_t = weak_to_cam_t(torch.tensor([[0.9, 0.0, 0.0], [0.8, 0.05, 0.0], [0.9, -0.3, 0.1]]))
    verts = v[None] * torch.tensor([[[1.0, 1.0, 1.0]], [[0.9, 1.1, 1.0]], [[1.1, 0.9, 1.0]]])
    target = hard_silhouette(verts, f, cam, 96, cam_t + torch.tensor([0.02, 0.0, 0.0]))
    target[2] = False  # an image without a contour gets 0
    grads = []
    for loss_fn in (chamfer_silhouette_loss, old_chamfer):
        vv = verts.clone().requires_grad_(True)
        loss = loss_fn(vv, f, cam, target, cam_t)
        loss.sum().backward()
        grads.append((loss.detach(), vv.grad))
    (new, g_new), (old, g_old) = grads
    assert new[2] == 0 and (new[:2] > 0.3).all()
    assert torch.allclose(new, old, rtol=1e-5, atol=1e-7)
    assert torch.allclose(g_new, g_old, rtol=1e-4, atol=1e-6 * g_old.abs().max())
    with DeviceTracker() as t:
        loss = chamfer_silhouette_loss(
            verts.cuda(), f.cuda(), cam.to("cuda"), target.cuda(), cam_t.cuda()
        )
        assert t.is_tagged(loss)
        # Reads: the hard silhouette's pair count and the padded sizes (one read for both).
        assert [kind for kind, _ in t.sync_log if kind != "upload"] == ["read", "read"], t.summary()
        assert torch.equal(loss.cpu(), new)
