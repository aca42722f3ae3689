"""Rotation conversions over batched tensors (roma/kornia style: pure functions, shapes below).

SPIN's 6D layout is *interleaved*: the 6-vector is the first two columns of R flattened row by
row, ``[R00, R01, R10, R11, R20, R21]`` (``view(-1, 3, 2)``). MEVA's is *contiguous*
``[col0; col1]``. SPIN: utils/geometry.py ``rot6d_to_rotmat``; MEVA: utils/transform_utils.py.
"""

from __future__ import annotations

import torch

SPIN_TO_CONTIGUOUS_6D = (0, 2, 4, 1, 3, 5)
CONTIGUOUS_TO_SPIN_6D = (0, 3, 1, 4, 2, 5)


def axis_angle_to_rotmat(aa: torch.Tensor) -> torch.Tensor:
    """(..., 3) axis-angle -> (..., 3, 3) rotation matrices (Rodrigues, stable near zero)."""
    theta2 = (aa * aa).sum(-1, keepdim=True)
    theta = torch.sqrt(theta2.clamp_min(1e-30))
    small = theta2 < 1e-8
    # sin(t)/t and (1-cos t)/t^2 with Taylor fallbacks keep gradients finite at t = 0.
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2.clamp_min(1e-30))
    x, y, z = aa.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*aa.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=aa.dtype, device=aa.device).expand_as(k)
    return eye + a[..., None] * k + b[..., None] * (k @ k)


def rotmat_to_axis_angle(rotmat: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation matrices -> (..., 3) axis-angle with angle in [0, pi]."""
    quat = rotmat_to_quaternion(rotmat)
    w = quat[..., 0:1]
    xyz = quat[..., 1:]
    norm = xyz.norm(dim=-1, keepdim=True)
    angle = 2 * torch.atan2(norm, w.abs())
    sign = torch.where(w < 0, -1.0, 1.0).to(quat.dtype)
    scale = torch.where(norm > 1e-12, angle / norm.clamp_min(1e-12), 2.0 / w.abs().clamp_min(1e-12))
    return sign * xyz * scale


def rotmat_to_quaternion(rotmat: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> (..., 4) unit quaternion (w, x, y, z); branch on the largest diagonal term."""
    m = rotmat
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    candidates = torch.stack(
        [
            torch.stack(
                [
                    1 + m00 + m11 + m22,
                    m[..., 2, 1] - m[..., 1, 2],
                    m[..., 0, 2] - m[..., 2, 0],
                    m[..., 1, 0] - m[..., 0, 1],
                ],
                -1,
            ),
            torch.stack(
                [
                    m[..., 2, 1] - m[..., 1, 2],
                    1 + m00 - m11 - m22,
                    m[..., 0, 1] + m[..., 1, 0],
                    m[..., 0, 2] + m[..., 2, 0],
                ],
                -1,
            ),
            torch.stack(
                [
                    m[..., 0, 2] - m[..., 2, 0],
                    m[..., 0, 1] + m[..., 1, 0],
                    1 - m00 + m11 - m22,
                    m[..., 1, 2] + m[..., 2, 1],
                ],
                -1,
            ),
            torch.stack(
                [
                    m[..., 1, 0] - m[..., 0, 1],
                    m[..., 0, 2] + m[..., 2, 0],
                    m[..., 1, 2] + m[..., 2, 1],
                    1 - m00 - m11 + m22,
                ],
                -1,
            ),
        ],
        -2,
    )  # (..., 4 candidates, 4); candidate i has 4*q_i^2 at position i
    diag = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1
    )
    best = diag.argmax(-1, keepdim=True)
    q = torch.gather(candidates, -2, best[..., None].expand(*best.shape, 4)).squeeze(-2)
    return q / q.norm(dim=-1, keepdim=True)


def rot6d_to_rotmat(x: torch.Tensor) -> torch.Tensor:
    """SPIN interleaved 6D (..., 6) -> (..., 3, 3) by Gram-Schmidt; columns b1, b2, b1 x b2."""
    m = x.reshape(*x.shape[:-1], 3, 2)
    a1, a2 = m[..., 0], m[..., 1]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], -1)


def rotmat_to_rot6d(rotmat: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) -> SPIN interleaved 6D (..., 6): the first two columns flattened row by row."""
    return rotmat[..., :, :2].reshape(*rotmat.shape[:-2], 6)


def contiguous6d_to_spin6d(x: torch.Tensor) -> torch.Tensor:
    """MEVA contiguous [col0; col1] (..., 6) -> SPIN interleaved (..., 6)."""
    return x[..., list(CONTIGUOUS_TO_SPIN_6D)]


def spin6d_to_contiguous6d(x: torch.Tensor) -> torch.Tensor:
    """SPIN interleaved (..., 6) -> MEVA contiguous [col0; col1] (..., 6)."""
    return x[..., list(SPIN_TO_CONTIGUOUS_6D)]


def pose_to_rotmat(pose: torch.Tensor, num_joints: int = 24) -> torch.Tensor:
    """Any accepted pose layout -> (N, J, 3, 3).

    Accepted: axis-angle (N, 3J); rotation matrices (N, J, 3, 3) or (N, 9J); SPIN 6D (N, J, 6)
    or (N, 6J). The flat layouts are told apart by their width.
    """
    n = pose.shape[0]
    if pose.ndim == 4 and pose.shape[1:] == (num_joints, 3, 3):
        return pose
    if pose.ndim == 3 and pose.shape[1:] == (num_joints, 6):
        return rot6d_to_rotmat(pose)
    if pose.ndim == 3 and pose.shape[1:] == (num_joints, 3):
        return axis_angle_to_rotmat(pose)
    if pose.ndim == 2:
        width = pose.shape[1]
        if width == 3 * num_joints:
            return axis_angle_to_rotmat(pose.reshape(n, num_joints, 3))
        if width == 6 * num_joints:
            return rot6d_to_rotmat(pose.reshape(n, num_joints, 6))
        if width == 9 * num_joints:
            return pose.reshape(n, num_joints, 3, 3)
    raise ValueError(
        f"pose of shape {tuple(pose.shape)} is not axis-angle (N,{3 * num_joints}), "
        f"6D (N,{num_joints},6)/(N,{6 * num_joints}) or rotation matrices (N,{num_joints},3,3)"
    )
