"""Silhouette-only fitting: recover a mesh's rotation and translation from a target mask."""

import pytest
import torch

from jregfix.body.rotations import axis_angle_to_rotmat
from jregfix.geometry.camera import PinholeCamera
from jregfix.render import chamfer_silhouette_loss, hard_silhouette, soft_silhouette
from jregfix.synthetic.body import body_blob

SIZE = 64


@pytest.fixture(autouse=True)
def one_thread():
    # Hundreds of small forward/backward passes: thread hand-offs would dominate.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def scene():
    v, f = body_blob(14, 18)  # 254 vertices, 504 faces
    cam = PinholeCamera.from_intrinsics(120.0, 120.0, 32.0, 32.0, batch_size=1)
    return v, f, cam, torch.tensor([[0.1, 0.25, 0.15]]), torch.tensor([[0.05, -0.03, 4.0]])


def posed(v, aa, t):
    return v[None] @ axis_angle_to_rotmat(aa).transpose(-1, -2) + t[:, None, :]


def iou(a, b):
    return ((a & b).sum() / (a | b).sum()).item()


def fit(loss_fn, target, steps, lr):
    """Adam on axis-angle + translation from a start ~20 degrees and ~10 px off."""
    v, f, cam, _, _ = scene()
    aa = torch.tensor([[-0.1, -0.05, -0.2]], requires_grad=True)
    t = torch.tensor([[0.35, 0.25, 4.6]], requires_grad=True)
    opt = torch.optim.Adam([aa, t], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(posed(v, aa, t), f, cam, target).backward()
        opt.step()
    return posed(v, aa.detach(), t.detach())


def test_recover_pose_from_soft_silhouette():
    # The target is the soft silhouette of the true pose: SoftRas coverage spills ~1 px past
    # the hard outline on dense meshes (see jregfix.render.silhouette), so matching a hard mask
    # would be biased; matching the renderer's own output has the true pose as its optimum.
    v, f, cam, aa_true, t_true = scene()
    truth = posed(v, aa_true, t_true)
    target = soft_silhouette(truth, f, cam, SIZE)
    hard_target = hard_silhouette(truth, f, cam, SIZE)
    start = posed(v, torch.tensor([[-0.1, -0.05, -0.2]]), torch.tensor([[0.35, 0.25, 4.6]]))
    assert iou(hard_silhouette(start, f, cam, SIZE), hard_target) < 0.4  # visibly wrong

    def loss(verts, f, cam, target):
        return ((soft_silhouette(verts, f, cam, SIZE) - target) ** 2).mean()

    end = fit(loss, target, 110, 0.03)
    assert iou(hard_silhouette(end, f, cam, SIZE), hard_target) >= 0.95


def test_recover_pose_from_chamfer_loss_on_hard_mask():
    v, f, cam, aa_true, t_true = scene()
    target = hard_silhouette(posed(v, aa_true, t_true), f, cam, SIZE)

    def loss(verts, f, cam, target):
        return chamfer_silhouette_loss(verts, f, cam, target).mean()

    end = fit(loss, target, 120, 0.02)
    assert iou(hard_silhouette(end, f, cam, SIZE), target) >= 0.95
