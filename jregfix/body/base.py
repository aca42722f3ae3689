"""The interface every body model implements, and chunked batch evaluation over it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from jregfix.body.rotations import pose_to_rotmat


@runtime_checkable
class BodyModel(Protocol):
    """A skinned mesh: rotations + shape vector -> vertices (metres, model frame, no translation).

    Attributes: ``name``; ``num_vertices`` V; ``num_joints`` J rotations per pose (24 for SMPL,
    global orientation first); ``num_betas`` S; ``faces`` (F, 3) int64; ``template`` (V, 3) rest
    vertices at zero shape.
    """

    # Read-only: SMPL derives ``template`` from smplx's buffers; plain attributes satisfy these too.
    @property
    def name(self) -> str: ...
    @property
    def num_vertices(self) -> int: ...
    @property
    def num_joints(self) -> int: ...
    @property
    def num_betas(self) -> int: ...
    @property
    def faces(self) -> torch.Tensor: ...
    @property
    def template(self) -> torch.Tensor: ...

    def vertices(self, rotmat: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        """rotmat (N, J, 3, 3), betas (N, S) -> vertices (N, V, 3). Differentiable."""
        ...


def batch_vertices(
    model: BodyModel,
    pose: torch.Tensor,
    betas: torch.Tensor,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    out_device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Vertices for many frames in memory-bounded chunks.

    pose: any layout accepted by :func:`pose_to_rotmat` (N, ...); betas (N, S') with S' <= S
    (missing shape coefficients are zero). Returns (N, V, 3) on ``out_device``.
    """
    device = torch.device(device) if device is not None else model.template.device
    dtype = model.template.dtype
    n = pose.shape[0]
    if betas.shape[0] != n:
        raise ValueError(f"pose has {n} rows but betas has {betas.shape[0]}")
    out = torch.empty((n, model.num_vertices, 3), dtype=dtype, device=out_device)
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            rot = pose_to_rotmat(pose[start:stop].to(device, dtype), model.num_joints)
            out[start:stop] = model.vertices(
                rot, fit_betas(betas[start:stop].to(device, dtype), model.num_betas)
            ).to(out_device)
    return out


def fit_betas(betas: torch.Tensor, num_betas: int) -> torch.Tensor:
    """Pad with zeros or refuse: (N, S') -> (N, num_betas)."""
    s = betas.shape[-1]
    if s == num_betas:
        return betas
    if s < num_betas:
        return torch.nn.functional.pad(betas, (0, num_betas - s))
    raise ValueError(f"betas have {s} coefficients but the body model has {num_betas}")


def joint_regression(model: BodyModel, regressor: torch.Tensor, blocks: list[int] | None = None):
    """A callable rotmat (N, J, 3, 3), betas (N, S) -> joints (N, K, 3) float64 = regressor
    (K, V) applied to the model's vertices.

    A model offering ``regressed_joints(regressor, blocks)`` computes them without skinning the
    whole mesh (SMPL: :mod:`jregfix.body.regressed_joints`); any other model is skinned in full.
    ``blocks``: row counts of the regressors stacked in ``regressor``.
    """
    fast = getattr(model, "regressed_joints", None)
    if fast is not None:
        joints_of = fast(regressor, blocks)
        return lambda rotmat, betas: joints_of(rotmat, betas).to(torch.float64)
    reg = regressor.to(torch.float64)
    return lambda rotmat, betas: torch.einsum(
        "kv,nvc->nkc", reg.to(rotmat.device), model.vertices(rotmat, betas).to(torch.float64)
    )


def rest_h36m_joints(model) -> np.ndarray:
    """The 17 Human3.6M joints (17, 3) float64, metres, model frame, of the rest pose (every
    rotation the identity) at zero shape, for a model with anatomical joints: one called as
    ``model(rotmat, betas)`` whose ``h36m_joints(output)`` gives them (Anny). They centre the
    candidate vertices of each joint regressor row, the pilot fit's job for SMPL."""
    like = {"dtype": model.template.dtype, "device": model.template.device}
    eye = torch.eye(3, **like).repeat(1, model.num_joints, 1, 1)
    with torch.no_grad():
        out = model(eye, torch.zeros(1, model.num_betas, **like))
        return model.h36m_joints(out)[0].double().cpu().numpy()
