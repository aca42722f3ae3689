"""SMPL through smplx, loaded from the user's model file without chumpy (see io.smpl_file)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch

from jregfix.errors import JregfixError
from jregfix.io.smpl_file import load_smpl_file


class SMPLBody(torch.nn.Module):
    """SMPL as a :class:`~jregfix.body.base.BodyModel`: 24 rotations + 10 betas -> 6890 vertices.

    ``model`` is a path (.pkl as released, or smplx .npz) or an already loaded dict. Buffers come
    from ``smplx.SMPL``; the forward pass is smplx's blend shapes and joint regression followed
    by our own kinematic chain and skinning (:meth:`forward_skeleton`).
    """

    name = "smpl"
    num_joints = 24
    faces: torch.Tensor  # buffers registered in __init__
    parent_index: torch.Tensor

    def __init__(
        self, model: str | Path | dict, num_betas: int = 10, dtype: torch.dtype = torch.float32
    ):
        super().__init__()
        import smplx
        from smplx.utils import Struct

        data = load_smpl_file(model) if not isinstance(model, dict) else model
        available = np.asarray(data["shapedirs"]).shape[-1]
        if num_betas > available:
            raise JregfixError(f"the SMPL file has {available} shape coefficients, not {num_betas}")
        with contextlib.redirect_stdout(io.StringIO()):  # smplx prints a note about 10 betas
            self.smpl = smplx.SMPL(
                model_path=str(model) if not isinstance(model, dict) else "",
                data_struct=Struct(**data),
                num_betas=num_betas,
                dtype=dtype,
            )
        self.num_betas = num_betas
        self.num_vertices = int(self.smpl.v_template.shape[0])
        self.register_buffer("faces", self.smpl.faces_tensor.long(), persistent=False)
        # The kinematic tree as Python ints: smplx's chain indexes a list with elements of a
        # device tensor, one blocking device-to-host read per joint on a GPU.
        self.tree: tuple[int, ...] = tuple(int(p) for p in self.smpl.parents.tolist())
        self.register_buffer("parent_index", torch.tensor(self.tree[1:]), persistent=False)

    @property
    def template(self) -> torch.Tensor:
        return self.smpl.v_template

    @property
    def parents(self) -> torch.Tensor:
        return self.smpl.parents

    @property
    def joint_regressor(self) -> torch.Tensor:
        """The model's own (24, V) kinematic joint regressor."""
        return self.smpl.J_regressor

    def forward_skeleton(self, rotmat: torch.Tensor, betas: torch.Tensor):
        """rotmat (N,24,3,3), betas (N,S) -> vertices (N,V,3), posed kinematic joints (N,24,3).

        SMPL: shape blend shapes, joints regressed from the shaped rest mesh, pose blend shapes
        (on R - I of the 23 body joints), then linear blend skinning with the world transforms
        of the chain, taken relative to the rest joints. No host sync on any device.
        """
        from smplx.lbs import blend_shapes, vertices2joints

        if rotmat.shape[1:] != (24, 3, 3):
            raise ValueError(f"expected rotations (N,24,3,3), got {tuple(rotmat.shape)}")
        s = self.smpl
        n = rotmat.shape[0]
        v_shaped = s.v_template + blend_shapes(betas, s.shapedirs)
        joints = vertices2joints(s.J_regressor, v_shaped)  # (N,24,3) rest joints
        eye = torch.eye(3, dtype=rotmat.dtype, device=rotmat.device)
        v_posed = v_shaped + ((rotmat[:, 1:] - eye).reshape(n, -1) @ s.posedirs).view(n, -1, 3)
        moved, posed_joints = self.skinning_transforms(rotmat, joints)
        per_vertex = (s.lbs_weights @ moved.reshape(n, -1, 12)).view(n, -1, 3, 4)
        verts = (per_vertex[..., :3] @ v_posed[..., None])[..., 0] + per_vertex[..., 3]
        return verts, posed_joints

    def skinning_transforms(self, rotmat: torch.Tensor, rest_joints: torch.Tensor):
        """rotmat (N,24,3,3), rest joints (N,24,3) -> moved (N,24,3,4), posed joints (N,24,3).

        ``moved[:, b] = [R | t]`` carries a rest-pose point of bone b to its posed place,
        x -> R x + t; skinning blends these per vertex with the skinning weights.
        """
        n = rotmat.shape[0]
        # Homogeneous local transforms [R | offset from the parent joint], chained root to
        # leaves: one small matmul per joint.
        offset = torch.cat(
            [rest_joints[:, :1], rest_joints[:, 1:] - rest_joints[:, self.parent_index]], 1
        )
        bottom = torch.zeros(n, 24, 1, 4, dtype=rotmat.dtype, device=rotmat.device)
        bottom[..., 3] = 1.0
        local = torch.cat([torch.cat([rotmat, offset[..., None]], -1), bottom], -2)
        chain = [local[:, 0]]
        for j in range(1, len(self.tree)):
            chain.append(chain[self.tree[j]] @ local[:, j])
        world = torch.stack(chain, 1)[..., :3, :]  # (N,24,3,4)
        posed_joints = world[..., 3]
        # The world transforms place the rest joints; relative to them: x -> R (x - j) + t.
        moved = torch.cat(
            [
                world[..., :3],
                (posed_joints - (world[..., :3] @ rest_joints[..., None])[..., 0])[..., None],
            ],
            -1,
        )
        return moved, posed_joints

    def regressed_joints(self, regressor: torch.Tensor, blocks: list[int] | None = None):
        """A module rotmat (N,24,3,3), betas (N,S) -> regressor (K,V) @ vertices (N,K,3),
        exact, without skinning the whole mesh (:mod:`jregfix.body.regressed_joints`)."""
        from jregfix.body.regressed_joints import RegressedJoints

        return RegressedJoints(self, regressor, blocks)

    def vertices(self, rotmat: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        """rotmat (N,24,3,3), betas (N,num_betas) -> vertices (N,6890,3) metres."""
        return self.forward_skeleton(rotmat, betas)[0]
