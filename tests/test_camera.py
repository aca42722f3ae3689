"""Camera conventions checked against hand-written numpy formulas (SPIN geometry.py)."""

import numpy as np
import pytest
import torch

from jregfix.geometry.camera import (
    FOCAL_LENGTH,
    IMG_RES,
    PinholeCamera,
    cam_t_to_weak,
    project,
    spin_focal,
    weak_to_cam_t,
)


def test_weak_to_cam_t_matches_spin_formula():
    cam = np.array([[0.9, 0.0, 0.0], [1.2, 0.1, -0.2], [0.5, -0.3, 0.05]])
    expect = np.stack([cam[:, 1], cam[:, 2], 2 * 5000.0 / (224 * cam[:, 0] + 1e-9)], 1)
    got = weak_to_cam_t(torch.tensor(cam)).numpy()
    np.testing.assert_allclose(got, expect, rtol=1e-12)
    # SPIN's mean camera: tz = 10000 / (224 * 0.9) ~ 49.6 m.
    assert abs(got[0, 2] - 49.603) < 1e-3
    assert FOCAL_LENGTH == 5000.0 and IMG_RES == 224


def test_cam_t_to_weak_inverts_weak_to_cam_t():
    cam = np.array([[0.9, 0.0, 0.0], [1.2, 0.1, -0.2], [0.5, -0.3, 0.05]])
    cam_t = np.stack([cam[:, 1], cam[:, 2], 2 * 5000.0 / (224 * cam[:, 0])], 1)
    np.testing.assert_allclose(cam_t_to_weak(torch.tensor(cam_t)).numpy(), cam, rtol=1e-12)
    back = cam_t_to_weak(weak_to_cam_t(torch.tensor(cam))).numpy()
    np.testing.assert_allclose(back, cam, rtol=1e-9)  # up to SPIN's 1e-9 in tz


def test_spin_focal_keeps_the_field_of_view():
    # half-width angle of the crop: atan((res / 2) / f) is the same at every size
    for size in (48, 96, 224, 448):
        assert np.arctan(size / 2 / spin_focal(size)) == pytest.approx(np.arctan(112 / 5000.0))
    assert spin_focal(224) == 5000.0 and spin_focal(96) == pytest.approx(5000.0 * 96 / 224)


def test_project_matches_intrinsic_matrix():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(3, 7, 3)) + np.array([0.0, 0.0, 6.0])
    t = rng.normal(size=(3, 3)) * 0.2
    fx, fy = np.array([1000.0, 1200.0, 900.0]), np.array([1010.0, 1150.0, 905.0])
    cx, cy = np.array([320.0, 500.0, 111.5]), np.array([240.0, 380.0, 97.0])
    cam = PinholeCamera.from_intrinsics(
        *(torch.tensor(a) for a in (fx, fy, cx, cy)), dtype=torch.float64
    )
    got = project(torch.tensor(pts), cam, torch.tensor(t)).numpy()
    for b in range(3):
        k = np.array([[fx[b], 0, cx[b]], [0, fy[b], cy[b]], [0, 0, 1]])
        h = (pts[b] + t[b]) @ k.T
        np.testing.assert_allclose(got[b], h[:, :2] / h[:, 2:], rtol=1e-12)
        np.testing.assert_allclose(cam.matrix()[b].numpy(), k)


def test_spin_crop_equals_weak_perspective_at_model_origin_depth():
    # With tz from weak_to_cam_t, a point at model depth Z = 0 projects exactly where SPIN's
    # weak-perspective camera puts it: 112 * s * (X + tx) + 112.
    rng = np.random.default_rng(1)
    weak = np.array([[0.9, 0.02, -0.05], [1.1, -0.1, 0.2]])
    xy = rng.normal(size=(2, 5, 2)) * 0.5
    pts = np.concatenate([xy, np.zeros((2, 5, 1))], -1)
    cam = PinholeCamera.spin_crop(2, dtype=torch.float64)
    got = project(torch.tensor(pts), cam, weak_to_cam_t(torch.tensor(weak))).numpy()
    expect = 112.0 * weak[:, None, :1] * (xy + weak[:, None, 1:]) + 112.0
    np.testing.assert_allclose(got, expect, rtol=1e-7)
    assert torch.equal(cam.cx, torch.full((2,), 112.0, dtype=torch.float64))
    assert torch.equal(cam.fy, torch.full((2,), 5000.0, dtype=torch.float64))


def test_camera_batching_and_indexing():
    cam = PinholeCamera.from_intrinsics(500.0, 510.0, torch.tensor([10.0, 20.0, 30.0]), 40.0)
    assert cam.batch_size == 3 and cam.fx.shape == (3,)
    sub = cam[1:]
    assert sub.batch_size == 2 and sub.cx.tolist() == [20.0, 30.0]
    assert cam.to(dtype=torch.float64).fx.dtype == torch.float64
    with pytest.raises(RuntimeError):
        PinholeCamera.from_intrinsics(torch.ones(2), 1.0, 1.0, 1.0, batch_size=3)
