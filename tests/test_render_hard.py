"""Hard silhouettes against an independent rasteriser (matplotlib point-in-triangle tests)."""

import math

import numpy as np
import pytest
import torch
from matplotlib.path import Path

from jregfix.errors import JregfixError
from jregfix.geometry.camera import PinholeCamera, project, weak_to_cam_t
from jregfix.render import hard_silhouette, soft_silhouette
from jregfix.synthetic.body import body_blob, uv_sphere


def rot_y(angle):
    c, s = math.cos(angle), math.sin(angle)
    return torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def path_silhouette(uv, faces, keep, h, w):
    """Point-in-polygon (matplotlib Path) of every pixel centre (j + 0.5, i + 0.5) in the box of
    every kept projected triangle. (PIL's ImageDraw polygon fill was tried first: it is
    conservative for sliver triangles, IoU ~0.98 with the exact answer, so not a usable oracle.)
    """
    out = np.zeros((h, w), dtype=bool)
    for tri in uv[faces[keep]]:
        x0, y0 = np.maximum(np.floor(tri.min(0) - 0.5).astype(int), 0)
        x1, y1 = np.minimum(np.ceil(tri.max(0) + 0.5).astype(int), [w, h])
        if x1 <= x0 or y1 <= y0:
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1]
        pts = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], 1)
        # A tiny radius of the orientation's sign makes points on edges count as inside.
        (ux, uy), (vx, vy) = tri[1] - tri[0], tri[2] - tri[0]
        area = ux * vy - uy * vx
        hit = Path(tri).contains_points(pts, radius=1e-9 if area > 0 else -1e-9)
        out[ys.ravel()[hit], xs.ravel()[hit]] = True
    return out


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.mark.parametrize("angle", [0.0, 0.7, 1.9])
def test_hard_silhouette_matches_path_fill_smpl_size(angle):
    v, f = body_blob()  # 6890 vertices / 13776 faces, like SMPL
    assert v.shape == (6890, 3) and f.shape == (13776, 3)
    verts = (v @ rot_y(angle).T)[None]
    cam = PinholeCamera.spin_crop(1)
    cam_t = weak_to_cam_t(torch.tensor([[0.95, 0.03, -0.02]]))
    ours = hard_silhouette(verts, f, cam, 224, cam_t)[0].numpy()
    uv = project(verts, cam, cam_t)[0].numpy()
    ref = path_silhouette(uv, f.numpy(), np.ones(len(f), bool), 224, 224)
    assert ref.sum() > 4000  # a body-sized silhouette, not an empty one
    assert iou(ours, ref) >= 0.995


def test_partly_behind_camera_and_off_image():
    # A sphere straddling the camera plane: faces with a vertex at z <= 1e-3 are dropped, the
    # rest rasterises normally; nothing is NaN, gradients stay finite.
    v, f = uv_sphere(16, 24)
    verts = (v * 1.0 + torch.tensor([0.3, 0.1, 0.4]))[None]
    cam = PinholeCamera.from_intrinsics(60.0, 60.0, 32.0, 32.0, batch_size=1)
    ours = hard_silhouette(verts, f, cam, 64)[0].numpy()
    keep = (verts[0, :, 2][f] > 1e-3).all(1).numpy()
    assert 0 < keep.sum() < len(f)
    z = verts[0, :, 2:].clamp(min=1e-3)
    uv = (verts[0, :, :2] / z * 60.0 + 32.0).numpy()
    ref = path_silhouette(uv, f.numpy(), keep, 64, 64)
    assert iou(ours, ref) >= 0.995
    vv = verts.clone().requires_grad_(True)
    soft = soft_silhouette(vv, f, cam, 64, sigma=2.0)
    soft.sum().backward()
    assert torch.isfinite(soft).all() and torch.isfinite(vv.grad).all()

    # Entirely off-image or entirely behind: empty masks, zero coverage.
    for shift in ([50.0, 0.0, 10.0], [0.0, 0.0, -5.0]):
        far = verts + torch.tensor(shift)
        assert not hard_silhouette(far, f, cam, 64).any()
        assert soft_silhouette(far, f, cam, 64).abs().max() == 0


def test_rectangular_image_and_cracks():
    # Two triangles sharing a diagonal tile a square exactly: no crack along the diagonal,
    # and H != W is handled (rows are y, columns are x).
    verts = torch.tensor([[[-1.0, -1.0, 2.0], [1.0, -1.0, 2.0], [1.0, 1.0, 2.0], [-1.0, 1.0, 2.0]]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    cam = PinholeCamera.from_intrinsics(10.0, 10.0, 20.0, 8.0, batch_size=1)
    m = hard_silhouette(verts, faces, cam, (16, 40))[0]
    assert m.shape == (16, 40)
    # The square spans x in [15, 25], y in [3, 13]: centres j + 0.5 in it -> j = 15..24.
    expect = torch.zeros(16, 40, dtype=torch.bool)
    expect[3:13, 15:25] = True
    assert torch.equal(m, expect)


def test_bad_inputs_raise():
    v, f = uv_sphere(4, 6)
    cam = PinholeCamera.spin_crop(1)
    with pytest.raises(JregfixError):
        hard_silhouette(v, f, cam, 32)  # missing batch dimension
    with pytest.raises(JregfixError):
        hard_silhouette(v[None], f[:, :2], cam, 32)
    with pytest.raises(JregfixError):
        hard_silhouette(v[None].expand(2, -1, -1), f, cam, 32)
    with pytest.raises(JregfixError):
        soft_silhouette(v[None], f, cam, 32, sigma=0.0)
