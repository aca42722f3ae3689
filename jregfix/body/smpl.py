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
    from ``smplx.SMPL``; the forward pass is ``smplx.lbs.lbs`` on rotation matrices.
    """

    name = "smpl"
    num_joints = 24

    def __init__(self, model: str | Path | dict, num_betas: int = 10,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        import smplx
        from smplx.utils import Struct

        data = load_smpl_file(model) if not isinstance(model, dict) else model
        available = np.asarray(data["shapedirs"]).shape[-1]
        if num_betas > available:
            raise JregfixError(f"the SMPL file has {available} shape coefficients, not {num_betas}")
        with contextlib.redirect_stdout(io.StringIO()):  # smplx prints a note about 10 betas
            self.smpl = smplx.SMPL(model_path=str(model) if not isinstance(model, dict) else "",
                                   data_struct=Struct(**data), num_betas=num_betas, dtype=dtype)
        self.num_betas = num_betas
        self.num_vertices = int(self.smpl.v_template.shape[0])
        self.register_buffer("faces", self.smpl.faces_tensor.long(), persistent=False)

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
        """rotmat (N,24,3,3), betas (N,S) -> vertices (N,V,3), posed kinematic joints (N,24,3)."""
        from smplx.lbs import lbs

        if rotmat.shape[1:] != (24, 3, 3):
            raise ValueError(f"expected rotations (N,24,3,3), got {tuple(rotmat.shape)}")
        s = self.smpl
        return lbs(betas, rotmat, s.v_template, s.shapedirs, s.posedirs, s.J_regressor,
                   s.parents, s.lbs_weights, pose2rot=False)

    def vertices(self, rotmat: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        """rotmat (N,24,3,3), betas (N,num_betas) -> vertices (N,6890,3) metres."""
        return self.forward_skeleton(rotmat, betas)[0]
