"""Regressed joints J · LBS(θ, β) of SMPL without skinning the whole mesh.

A joint regressor J (K, V) reads few vertices, and skinning is linear in everything that does
not depend on the pose's transforms. Per vertex v, with blend rows t_v + S_v β + P_v p (template,
shape and pose blend shapes; p = R - I of the 23 body joints) and bone transforms [R_b | T_b]:

    joint_k = Σ_v J[k,v] Σ_b W[v,b] (R_b (t_v + S_v β + P_v p) + T_b)

Two exact ways to evaluate it, both per frame independent of V:

* sparse: skin only the vertices some row reads (the union of the supports), then apply J;
* folded: swap the sums, joint_k = Σ_b R_b x_kb + c_kb T_b with x_kb = Σ_v J[k,v] W[v,b]
  (t_v + S_v β + P_v p) and c_kb = Σ_v J[k,v] W[v,b], precomputed per (joint, bone) pair that
  any vertex connects. A row reading thousands of vertices costs a few bones.

:class:`RegressedJoints` picks, per block of rows (one regressor file), the one with fewer
multiply-adds per frame. Both differ from the full mesh only by floating-point rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from jregfix.body.smpl import SMPLBody

MODES = ("auto", "sparse", "folded")


class RegressedJoints(torch.nn.Module):
    """rotmat (N,24,3,3), betas (N,S) -> joints (N,K,3) = regressor @ SMPL vertices.

    ``regressor`` (K, V); ``blocks`` the row counts of the regressors stacked in it (default:
    one block), each evaluated sparse or folded as ``mode`` says ("auto": the cheaper one).
    Computed in the body's dtype; ``paths`` and ``macs_per_frame`` say what was chosen.
    """

    # buffers registered in __init__
    blend_const: torch.Tensor
    blend_linear: torch.Tensor
    rest_const: torch.Tensor
    rest_linear: torch.Tensor
    pair_slots: torch.Tensor
    pair_weights: torch.Tensor
    sparse_weights_t: torch.Tensor
    sparse_regressor_t: torch.Tensor

    def __init__(
        self,
        body: SMPLBody,
        regressor: torch.Tensor,
        blocks: Sequence[int] | None = None,
        mode: str = "auto",
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        s = body.smpl
        dtype, device = s.v_template.dtype, s.v_template.device
        k_total, v_total = regressor.shape
        if v_total != body.num_vertices:
            raise ValueError(f"regressor has {v_total} columns, the body {body.num_vertices}")
        blocks = [k_total] if blocks is None else list(blocks)
        if sum(blocks) != k_total:
            raise ValueError(f"blocks {blocks} do not add up to the regressor's {k_total} rows")
        self.body = body
        f64 = torch.float64
        reg = regressor.to(device, f64)
        weights = s.lbs_weights.to(f64)  # (V, 24)
        posedirs = s.posedirs.view(-1, v_total, 3).transpose(0, 1)  # (V, 207, 3)

        def blend_rows(v: torch.Tensor) -> torch.Tensor:
            """[template; shape dirs; pose dirs] of vertices v -> (len(v), D, 3)."""
            return torch.cat(
                [s.v_template[v][:, None], s.shapedirs[v].transpose(1, 2), posedirs[v]], 1
            ).to(f64)

        d = 1 + body.num_betas + posedirs.shape[1]
        # Rest joints of the kinematic chain are linear in β too (SMPL's own 24-row regressor).
        kinematic = s.J_regressor.to(f64)
        rest = torch.cat(
            [
                (kinematic @ s.v_template.to(f64))[None],
                torch.einsum("jv,vcs->sjc", kinematic, s.shapedirs.to(f64)),
            ]
        )

        starts = [sum(blocks[:i]) for i in range(len(blocks))]
        rows_of = [slice(a, a + n) for a, n in zip(starts, blocks, strict=True)]
        # (joint, bone) pairs that some vertex connects; |J| so that cancelling terms stay.
        links = (reg.abs() @ weights.abs()) > 0  # (K, 24)
        per_vertex_macs = 3 * d + 24 * 12 + 12
        per_pair_macs = 3 * d + 12 + 3
        sparse_cols = torch.zeros(v_total, dtype=torch.bool, device=device)
        sparse_rows = torch.zeros(k_total, dtype=torch.bool, device=device)
        self.paths = ["folded"] * len(blocks)
        # Smallest support first, so that blocks sharing vertices are charged for new ones only.
        for i in sorted(range(len(blocks)), key=lambda i: int((reg[rows_of[i]] != 0).sum())):
            support = (reg[rows_of[i]] != 0).any(0)
            new = int((support & ~sparse_cols).sum())
            sparse_macs = new * per_vertex_macs + 3 * blocks[i] * int(support.sum())
            folded_macs = int(links[rows_of[i]].sum()) * per_pair_macs
            if mode == "sparse" or (mode == "auto" and sparse_macs < folded_macs):
                self.paths[i] = "sparse"
                sparse_cols |= support
                sparse_rows[rows_of[i]] = True

        cols = torch.nonzero(sparse_cols)[:, 0]
        pair_row, pair_bone = torch.nonzero(links & ~sparse_rows[:, None], as_tuple=True)
        # Folded pairs: x_kb = Σ_v J[k,v] W[v,b] (blend rows of v), over row k's support only,
        # and its weight c_kb = Σ_v J[k,v] W[v,b].
        folded = torch.zeros(d, len(pair_row), 3, dtype=f64, device=device)
        pair_weight = torch.zeros(len(pair_row), dtype=f64, device=device)
        read = (reg[~sparse_rows] != 0).any(0)  # gather the blend rows of folded rows once
        rows_read = blend_rows(torch.nonzero(read)[:, 0])
        position = torch.cumsum(read, 0) - 1
        for k in torch.unique(pair_row).tolist():
            at = torch.nonzero(pair_row == k)[:, 0]
            support = torch.nonzero(reg[k])[:, 0]
            coef = reg[k, support] * weights[support][:, pair_bone[at]].T  # (pairs, support)
            x = coef @ rows_read.index_select(0, position[support]).view(len(support), -1)
            folded[:, at] = x.view(len(at), d, 3).transpose(0, 1)
            pair_weight[at] = coef.sum(1)
        # Sparse vertices coordinate-major, so that a frame's points come out as (3, m).
        sparse = blend_rows(cols).permute(1, 2, 0)  # (D, 3, m)
        blend = torch.cat([folded.reshape(d, -1), sparse.reshape(d, -1)], 1)
        self.num_pairs, self.num_sparse, self.num_rows = len(pair_row), len(cols), k_total
        self.macs_per_frame = (
            self.num_pairs * per_pair_macs
            + self.num_sparse * per_vertex_macs
            + 3 * k_total * self.num_sparse
        )
        # Where x_kb lands in the (24 bones x 3, K) matrix that all rotations multiply at once.
        pair_slots = (
            (pair_bone[:, None] * 3 + torch.arange(3, device=device)) * k_total + pair_row[:, None]
        ).reshape(-1)
        pair_weights = torch.zeros(24, k_total, dtype=f64, device=device)
        pair_weights[pair_bone, pair_row] = pair_weight
        for name, value in (
            ("blend_const", blend[0]),
            ("blend_linear", blend[1:]),
            ("rest_const", rest[0].reshape(-1)),
            ("rest_linear", rest[1:].reshape(body.num_betas, -1)),
            ("pair_slots", pair_slots),
            ("pair_weights", pair_weights),
            ("sparse_weights_t", weights[cols].T.contiguous()),
            ("sparse_regressor_t", (reg[:, cols] * sparse_rows[:, None]).T),
        ):
            self.register_buffer(
                name, value if not value.is_floating_point() else value.to(dtype), persistent=False
            )

    def forward(self, rotmat: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
        """rotmat (N,24,3,3), betas (N,num_betas) in the body's dtype -> joints (N,K,3)."""
        n, k, m = rotmat.shape[0], self.num_rows, self.num_sparse
        eye = torch.eye(3, dtype=rotmat.dtype, device=rotmat.device)
        pose_feature = (rotmat[:, 1:] - eye).reshape(n, -1)
        rest = torch.addmm(self.rest_const, betas, self.rest_linear).view(n, 24, 3)
        moved, _ = self.body.skinning_transforms(rotmat, rest)  # (N, 24, 3, 4)
        points = torch.addmm(
            self.blend_const, torch.cat([betas, pose_feature], 1), self.blend_linear
        )
        # Folded: Σ_b R_b x_kb as one (3, 72) @ (72, K) product per frame, plus Σ_b c_kb T_b.
        x = points.new_zeros(n, 72 * k).index_copy_(
            1, self.pair_slots, points[:, : 3 * self.num_pairs]
        )
        rotations = moved[..., :3].permute(0, 2, 1, 3).reshape(n, 3, 72)
        joints = rotations @ x.view(n, 72, k) + torch.einsum(
            "nbi,bk->nik", moved[..., 3], self.pair_weights
        )
        if m:  # sparse: skin the m vertices (3, m) per frame, then apply the regressor
            rest_points = points[:, 3 * self.num_pairs :].view(n, 1, 3, m)
            # One flat GEMM: a batched product over strided frames is several times slower.
            per_vertex = (
                moved.reshape(n, 24, 12).transpose(1, 2).reshape(n * 12, 24) @ self.sparse_weights_t
            ).view(n, 3, 4, m)
            verts = (per_vertex[:, :, :3] * rest_points).sum(2) + per_vertex[:, :, 3]
            joints = joints + verts @ self.sparse_regressor_t
        return joints.transpose(1, 2)  # (N, K, 3)
