"""AnnyBody against numpy references and Anny's own output.

Needs the optional ``anny`` package (skips otherwise). The first run builds the model once
(about 70-130 s and ~2 GB RAM on 2 CPU cores) into ``$ANNY_CACHE_DIR`` or the jregfix user
cache; later runs load the ~50 MB cached model in about 2 s.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial.transform import Rotation

from jregfix.body.base import BodyModel, batch_vertices
from jregfix.errors import JregfixError


@pytest.fixture(scope="session")
def body():
    pytest.importorskip("anny")
    from jregfix.body.anny import AnnyBody

    return AnnyBody(dtype=torch.float64)


def z_up_to_y_up(v):
    """Anny's Blender axes (z up, facing -y) -> (y up, facing +z): (x, y, z) -> (x, z, -y)."""
    return np.stack([v[..., 0], v[..., 2], -v[..., 1]], -1)


def identity_pose(body, n=1):
    return torch.eye(3, dtype=torch.float64).repeat(n, body.num_joints, 1, 1)


def anny_direct(body, phenotype):
    """Anny's own forward at its reference pose (identity deltas for all 104 bones)."""
    deltas = torch.eye(4, dtype=torch.float64).repeat(1, len(body.all_bone_names), 1, 1)
    with torch.no_grad():
        out = body.anny(
            pose_parameters=deltas, phenotype_kwargs=torch.tensor([phenotype], dtype=torch.float64)
        )
    return z_up_to_y_up(out["vertices"][0].numpy()), z_up_to_y_up(
        out["bone_poses"][0, :, :3, 3].numpy()
    )


def subtree(parents, bone):
    inside = {bone}
    for b, p in enumerate(parents):  # parents precede children in Anny's bone order
        if p in inside:
            inside.add(b)
    return sorted(inside)


def test_protocol_shapes_and_closed_mesh(body):
    assert isinstance(body, BodyModel) and body.name == "anny"
    assert (body.num_vertices, body.num_joints, body.num_betas) == (13718, 24, 6)
    assert body.template.shape == (13718, 3)
    faces = body.faces.numpy()
    assert faces.shape == (27420, 3) and faces.dtype == np.int64
    assert faces.min() == 0 and faces.max() == body.num_vertices - 1
    assert len(np.unique(faces)) == body.num_vertices
    assert np.all(
        (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    )
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    # Closed, consistently oriented 2-manifold: every directed edge once, its reverse once.
    assert len(np.unique(directed, axis=0)) == len(directed)
    reverse = {tuple(e) for e in directed[:, ::-1].tolist()}
    assert reverse == {tuple(e) for e in directed.tolist()}
    edges = np.unique(np.sort(directed, 1), axis=0)
    graph = coo_matrix(
        (np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(body.num_vertices,) * 2
    )
    count, labels = connected_components(graph, directed=False)
    assert count == 4  # body, mouth cavity, two eyeballs
    v = body.template.numpy()
    tri = v[faces]
    signed_volume = np.einsum("fi,fi->f", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6
    assert signed_volume > 0.03  # outward normals (counter-clockwise seen from outside)


def test_template_is_anny_reference_pose_in_model_frame(body):
    from jregfix.body.anny import DEFAULT_PHENOTYPE

    verts, heads = anny_direct(body, DEFAULT_PHENOTYPE)
    np.testing.assert_allclose(body.template.numpy(), verts, atol=1e-9)
    out = body(identity_pose(body), torch.zeros(1, 6, dtype=torch.float64))
    np.testing.assert_allclose(out.bone_heads[0].numpy(), heads, atol=1e-9)
    names = body.all_bone_names
    head = dict(zip(names, out.bone_heads[0].numpy(), strict=True))
    np.testing.assert_allclose(head["root"], 0, atol=1e-12)
    assert head["head"][1] > head["neck01"][1] > 0 > head["foot.L"][1]  # y up
    assert head["toe1-1.L"][2] > head["foot.L"][2] + 0.08  # toes point to +z
    assert head["eye.L"][2] > head["head"][2] + 0.05  # the face looks to +z
    assert head["upperleg01.L"][0] > 0.05 and head["upperarm01.L"][0] > 0.1  # left is +x
    height = np.ptp(verts[:, 1])
    assert 1.6 < height < 1.8


def test_root_rotation_is_rigid(body):
    rng = np.random.default_rng(0)
    rot = Rotation.random(3, random_state=1).as_matrix()
    betas = torch.tensor(rng.uniform(-0.15, 0.15, (3, 6)))
    pose = identity_pose(body, 3)
    pose[:, 0] = torch.tensor(rot)
    posed = body.vertices(pose, betas).numpy()
    rest = body.vertices(identity_pose(body, 3), betas).numpy()
    np.testing.assert_allclose(posed, np.einsum("nij,nvj->nvi", rot, rest), atol=1e-9)


def test_knee_rotation_moves_the_shin_about_the_knee(body):
    names = list(body.all_bone_names)
    knee = names.index("lowerleg01.L")
    below = subtree(body.anny.bone_parents, knee)
    weights = body.anny.dense_vertex_bone_weights.numpy()
    share = weights[:, below].sum(1)
    # A general rotation (about no frame axis) and a knee flexion about the model x axis.
    rots = np.stack(
        [
            Rotation.from_rotvec([0.5, -0.9, 0.7]).as_matrix(),
            Rotation.from_rotvec([np.deg2rad(70), 0, 0]).as_matrix(),
        ]
    )
    pose = identity_pose(body, 2)
    pose[:, body.bone_names.index("lowerleg01.L")] = torch.tensor(rots)
    zero = torch.zeros(2, 6, dtype=torch.float64)
    rest = body(identity_pose(body, 2), zero)
    posed = body(pose, zero)
    k = rest.bone_heads[0, knee].numpy()
    v0, v1 = rest.vertices.numpy(), posed.vertices.numpy()
    moved = share > 1 - 1e-9
    fixed = share < 1e-12
    assert moved.sum() > 500 and fixed.sum() > 8000
    ankle = names.index("foot.L")
    a0, a1 = rest.bone_heads[:, ankle].numpy(), posed.bone_heads[:, ankle].numpy()
    for i, rot in enumerate(rots):
        np.testing.assert_allclose(v1[i, moved], (v0[i, moved] - k) @ rot.T + k, atol=1e-9)
        np.testing.assert_allclose(v1[i, fixed], v0[i, fixed], atol=1e-9)
        np.testing.assert_allclose(a1[i], (a0[i] - k) @ rot.T + k, atol=1e-9)
    assert a1[1, 2] < a0[1, 2] - 0.2  # positive x rotation flexes the knee (foot moves back)


def test_betas_are_phenotype_offsets(body):
    from jregfix.body.anny import DEFAULT_PHENOTYPE, PHENOTYPES, phenotype_to_betas

    phenotype = {
        "gender": 0.9,
        "age": 0.78,
        "muscle": 0.3,
        "weight": 0.8,
        "height": 0.2,
        "proportions": 0.6,
    }
    betas = phenotype_to_betas(**phenotype)
    np.testing.assert_allclose(
        betas.numpy() + DEFAULT_PHENOTYPE, [phenotype[k] for k in PHENOTYPES]
    )
    got = body.vertices(identity_pose(body), betas[None]).numpy()[0]
    verts, _ = anny_direct(body, [phenotype[k] for k in PHENOTYPES])
    np.testing.assert_allclose(got, verts, atol=1e-9)
    tall = body.vertices(identity_pose(body), phenotype_to_betas(height=0.6)[None])[0]
    assert np.ptp(tall[:, 1].numpy()) > np.ptp(body.template[:, 1].numpy()) + 0.1
    with pytest.raises(JregfixError, match="unknown Anny phenotype"):
        phenotype_to_betas(bmi=1.0)


def test_gradients_match_finite_differences(body):
    from jregfix.body.rotations import axis_angle_to_rotmat

    g = torch.Generator().manual_seed(0)
    aa = 0.3 * torch.randn(2, body.num_joints, 3, generator=g, dtype=torch.float64)
    # Keep the phenotypes off Anny's interpolation anchors (kinks) and clamps.
    betas = 0.03 + 0.1 * torch.rand(2, 6, generator=g, dtype=torch.float64)
    w = torch.randn(2, body.num_vertices, 3, generator=g, dtype=torch.float64)
    d_aa = torch.randn(aa.shape, generator=g, dtype=torch.float64)
    d_b = torch.randn(betas.shape, generator=g, dtype=torch.float64)

    def loss(a, b):
        return (body.vertices(axis_angle_to_rotmat(a), b) * w).sum()

    a, b = aa.clone().requires_grad_(), betas.clone().requires_grad_()
    loss(a, b).backward()
    assert a.grad is not None and b.grad is not None
    eps = 1e-6
    with torch.no_grad():
        fd_pose = (loss(aa + eps * d_aa, betas) - loss(aa - eps * d_aa, betas)) / (2 * eps)
        fd_betas = (loss(aa, betas + eps * d_b) - loss(aa, betas - eps * d_b)) / (2 * eps)
    for fd, analytic in ((fd_pose, (a.grad * d_aa).sum()), (fd_betas, (b.grad * d_b).sum())):
        assert abs(fd) > 1e-2
        assert abs(fd - analytic) <= 1e-5 * abs(fd)


def test_h36m_joints_are_bone_heads_and_crown(body):
    from jregfix.body.anny import H36M_JOINTS, HEAD_TOP_VERTEX, phenotype_to_betas

    betas = torch.stack(
        [
            phenotype_to_betas(),
            phenotype_to_betas(gender=0.0, height=0.6),
            phenotype_to_betas(gender=1.0, height=0.1, weight=0.9, age=0.7),
        ]
    )
    out = body(identity_pose(body, 3), betas)
    joints = body.h36m_joints(out).numpy()
    assert joints.shape == (3, 17, 3)
    names = list(body.all_bone_names)
    for row, (_, bone) in enumerate(H36M_JOINTS):
        if bone is not None:
            np.testing.assert_array_equal(joints[:, row], out.bone_heads[:, names.index(bone)])
    verts = out.vertices.numpy()
    assert np.all(np.argmax(verts[..., 1], 1) == HEAD_TOP_VERTEX)
    np.testing.assert_array_equal(joints[:, 10], verts[:, HEAD_TOP_VERTEX])
    y = joints[..., 1]
    for ankle, knee, hip in ((3, 2, 1), (6, 5, 4)):
        assert np.all((y[:, ankle] < y[:, knee]) & (y[:, knee] < y[:, hip]))
    assert np.all(
        (y[:, 0] < y[:, 7]) & (y[:, 7] < y[:, 8]) & (y[:, 8] < y[:, 9]) & (y[:, 9] < y[:, 10])
    )
    x = joints[..., 0]
    assert np.all(x[:, [1, 2, 3, 11, 12, 13]] > 0) and np.all(x[:, [4, 5, 6, 14, 15, 16]] < 0)


def test_batch_vertices_and_bad_shapes(body):
    g = torch.Generator().manual_seed(1)
    pose = 0.2 * torch.randn(5, body.num_joints * 3, generator=g, dtype=torch.float64)
    betas = 0.1 * torch.randn(5, 4, generator=g, dtype=torch.float64)  # padded to 6
    chunked = batch_vertices(body, pose, betas, chunk_size=2)
    from jregfix.body.rotations import axis_angle_to_rotmat

    full = torch.nn.functional.pad(betas, (0, 2))
    direct = body.vertices(axis_angle_to_rotmat(pose.view(5, -1, 3)), full)
    np.testing.assert_allclose(chunked.numpy(), direct.detach().numpy(), atol=1e-12)
    with pytest.raises(JregfixError, match="rotmat"):
        body.vertices(identity_pose(body)[:, :10], torch.zeros(1, 6, dtype=torch.float64))
    with pytest.raises(JregfixError, match="betas"):
        body.vertices(identity_pose(body), torch.zeros(1, 10, dtype=torch.float64))


def test_missing_anny_names_the_extra(monkeypatch):
    from jregfix.body.anny import AnnyBody

    monkeypatch.setitem(sys.modules, "anny", None)
    with pytest.raises(JregfixError, match=r"pip install 'jregfix\[anny\]'"):
        AnnyBody()
