import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from jregfix.body.rotations import (
    axis_angle_to_rotmat,
    contiguous6d_to_spin6d,
    pose_to_rotmat,
    rot6d_to_rotmat,
    rotmat_to_axis_angle,
    rotmat_to_rot6d,
    spin6d_to_contiguous6d,
)
from tests.conftest import shared_fixture


def test_axis_angle_matches_scipy(rng):
    aa = rng.normal(size=(500, 3)) * 1.5
    aa[:5] *= 1e-9  # near-zero angles take the Taylor branch
    ours = axis_angle_to_rotmat(torch.from_numpy(aa)).numpy()
    ref = Rotation.from_rotvec(aa).as_matrix()
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_rotmat_to_axis_angle_round_trip(rng):
    ref = Rotation.random(500, random_state=3)
    mats = ref.as_matrix()
    aa = rotmat_to_axis_angle(torch.from_numpy(mats)).numpy()
    np.testing.assert_allclose(Rotation.from_rotvec(aa).as_matrix(), mats, atol=1e-10)
    assert (np.linalg.norm(aa, axis=1) <= np.pi + 1e-9).all()
    # angle of exactly pi and identity
    special = np.stack([np.diag([1.0, -1.0, -1.0]), np.eye(3)])
    aa = rotmat_to_axis_angle(torch.from_numpy(special)).numpy()
    np.testing.assert_allclose(Rotation.from_rotvec(aa).as_matrix(), special, atol=1e-10)


def test_spin_6d_layout_is_interleaved(rng):
    mats = Rotation.random(50, random_state=1).as_matrix()
    six = rotmat_to_rot6d(torch.from_numpy(mats)).numpy()
    # [R00, R01, R10, R11, R20, R21]
    expected = np.stack(
        [mats[:, 0, 0], mats[:, 0, 1], mats[:, 1, 0], mats[:, 1, 1], mats[:, 2, 0], mats[:, 2, 1]],
        1,
    )
    np.testing.assert_array_equal(six, expected)
    np.testing.assert_allclose(rot6d_to_rotmat(torch.from_numpy(six)).numpy(), mats, atol=1e-12)
    contiguous = spin6d_to_contiguous6d(torch.from_numpy(six)).numpy()
    np.testing.assert_array_equal(contiguous[:, :3], mats[:, :, 0])
    np.testing.assert_array_equal(contiguous[:, 3:], mats[:, :, 1])
    np.testing.assert_array_equal(contiguous6d_to_spin6d(torch.from_numpy(contiguous)).numpy(), six)


def test_rot6d_gram_schmidt_of_unnormalised_input(rng):
    raw = rng.normal(size=(20, 6))
    r = rot6d_to_rotmat(torch.from_numpy(raw)).numpy()
    np.testing.assert_allclose(r @ np.swapaxes(r, 1, 2), np.tile(np.eye(3), (20, 1, 1)), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-12)
    a1 = raw[:, [0, 2, 4]]
    np.testing.assert_allclose(
        r[:, :, 0], a1 / np.linalg.norm(a1, axis=1, keepdims=True), atol=1e-12
    )


def test_pose_layouts_agree(rng):
    aa = rng.normal(size=(4, 72)) * 0.5
    from_aa = pose_to_rotmat(torch.from_numpy(aa))
    six = rotmat_to_rot6d(from_aa)
    np.testing.assert_allclose(pose_to_rotmat(six).numpy(), from_aa.numpy(), atol=1e-12)
    np.testing.assert_allclose(
        pose_to_rotmat(six.reshape(4, 144)).numpy(), from_aa.numpy(), atol=1e-12
    )
    np.testing.assert_array_equal(pose_to_rotmat(from_aa.reshape(4, 216)).numpy(), from_aa.numpy())
    with pytest.raises(ValueError):
        pose_to_rotmat(torch.zeros(4, 70))


def test_spin_mean_params_global_orientation():
    path = shared_fixture("smpl_mean_params.npz")
    pose = np.load(path)["pose"].reshape(24, 6)
    r = rot6d_to_rotmat(torch.from_numpy(pose.astype(np.float64))).numpy()
    np.testing.assert_allclose(r[0], np.diag([1.0, -1.0, -1.0]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-5)
