"""Chamfer silhouette loss: contour extraction and distances against analytic geometry."""

import math

import pytest
import torch

from jregfix.errors import JregfixError
from jregfix.geometry.camera import PinholeCamera
from jregfix.render import chamfer_silhouette_loss, contour_points, hard_silhouette
from jregfix.synthetic.body import uv_sphere


def test_contour_points_of_a_rectangle():
    mask = torch.zeros(1, 16, 40, dtype=torch.bool)
    mask[0, 3:13, 15:25] = True  # rows 3..12, columns 15..24: the square [15, 25] x [3, 13]
    pts = {tuple(p) for p in contour_points(mask)[0].tolist()}
    expect = {(x, y + 0.5) for x in (15.0, 25.0) for y in range(3, 13)}
    expect |= {(x + 0.5, y) for y in (3.0, 13.0) for x in range(15, 25)}
    assert pts == expect


def disk(size, cx, cy, radius):
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return ((xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2)[None]


def sphere_scene():
    v, f = uv_sphere(40, 60)
    cam = PinholeCamera.from_intrinsics(100.0, 100.0, 64.0, 64.0, batch_size=1)
    cam_t = torch.tensor([[0.0, 0.0, 5.0]])
    rho = 100.0 / math.sqrt(5.0**2 - 1.0)  # projected radius of the unit sphere's outline
    return v[None], f, cam, cam_t, rho


def test_chamfer_equals_radius_gap_for_concentric_circles():
    v, f, cam, cam_t, rho = sphere_scene()
    own = chamfer_silhouette_loss(v, f, cam, hard_silhouette(v, f, cam, 128, cam_t), cam_t)
    assert own.item() < 0.6  # discretisation only
    for radius in (rho + 4.0, rho - 5.0):
        loss = chamfer_silhouette_loss(v, f, cam, disk(128, 64.0, 64.0, radius), cam_t)
        assert abs(loss.item() - abs(radius - rho)) < 0.6


def test_chamfer_gradient_moves_towards_target():
    v, f, cam, cam_t, rho = sphere_scene()
    target = disk(128, 70.0, 60.0, rho)  # target 6 px right, 4 px up
    t = cam_t.clone().requires_grad_(True)
    chamfer_silhouette_loss(v, f, cam, target, t).sum().backward()
    assert t.grad[0, 0] < 0 and t.grad[0, 1] > 0  # descent moves right (+x) and up (-y)


def test_chamfer_bad_target_and_empty_cases():
    v, f, cam, cam_t, _ = sphere_scene()
    with pytest.raises(JregfixError):
        chamfer_silhouette_loss(v, f, cam, torch.zeros(128, 128, dtype=torch.bool), cam_t)
    empty = torch.zeros(1, 128, 128, dtype=torch.bool)
    assert chamfer_silhouette_loss(v, f, cam, empty, cam_t).item() == 0.0
    behind = chamfer_silhouette_loss(v, f, cam, disk(128, 64, 64, 10), -cam_t)
    assert behind.item() == 0.0 and torch.isfinite(behind).all()
