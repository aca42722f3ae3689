"""Regressed joints without skinning the whole mesh: exact against the full mesh, in the module
and through `evaluate` end to end."""

import joblib
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from jregfix.body.base import joint_regression
from jregfix.body.regressed_joints import RegressedJoints
from jregfix.body.smpl import SMPLBody
from jregfix.io.h36m import h36m_imgname, joints17_to_s24, save_h36m
from jregfix.stages.evaluate import evaluate
from tests.conftest import camera_facing_poses, planted_regressor, shared_fixture

N = 48


@pytest.fixture(scope="module")
def body64(smpl_pkl):
    return SMPLBody(smpl_pkl, dtype=torch.float64)


class FullMesh:
    """The same body without its fast joint path, so that every vertex is skinned (the path
    `evaluate` took before)."""

    def __init__(self, body):
        self._body = body
        self.vertex_calls = 0

    def __getattr__(self, name):
        if name == "regressed_joints":
            raise AttributeError(name)
        return getattr(self._body, name)

    def vertices(self, rotmat, betas):
        self.vertex_calls += 1
        return self._body.vertices(rotmat, betas)


def wide_regressor(rng, support=600, num_vertices=6890):
    """(17, V) like SPIN's H36M regressor but wider: hundreds of vertices per row."""
    return planted_regressor(rng, support, num_vertices)


def narrow_regressor(rng, vertices=58, num_vertices=6890):
    """(17, V) like Hedlin's: rows on a few of ``vertices`` shared vertices, signed weights."""
    cols = rng.choice(num_vertices, vertices, replace=False)
    j = np.zeros((17, num_vertices))
    for row in range(17):
        j[row, rng.choice(cols, 6, replace=False)] = rng.normal(size=6)
    return j


def random_frames(rng, n, dtype=torch.float64):
    aa = rng.normal(size=(n * 24, 3)) * 0.6
    rot = torch.from_numpy(Rotation.from_rotvec(aa).as_matrix()).to(dtype).view(n, 24, 3, 3)
    return rot, torch.from_numpy(rng.normal(size=(n, 10)) * 2).to(dtype)


@pytest.mark.parametrize("mode", ["auto", "sparse", "folded"])
def test_every_path_equals_the_full_mesh(body64, rng, mode):
    reg = torch.from_numpy(np.concatenate([wide_regressor(rng), narrow_regressor(rng)]))
    rot, betas = random_frames(rng, 32)
    full = torch.einsum("kv,nvc->nkc", reg, body64.vertices(rot, betas))
    fast = RegressedJoints(body64, reg, [17, 17], mode=mode)
    assert fast(rot, betas).shape == (32, 34, 3)
    assert (fast(rot, betas) - full).abs().max() < 1e-10  # metres: 1e-7 mm


def test_auto_folds_wide_rows_and_skins_narrow_ones(body64, rng):
    wide, narrow = wide_regressor(rng), narrow_regressor(rng)
    reg = torch.from_numpy(np.concatenate([wide, narrow]))
    auto = RegressedJoints(body64, reg, [17, 17])
    assert auto.paths == ["folded", "sparse"]
    assert auto.num_sparse == int((narrow != 0).any(0).sum())
    cost = {
        m: RegressedJoints(body64, reg, [17, 17], mode=m).macs_per_frame
        for m in ("sparse", "folded")
    }
    assert auto.macs_per_frame < min(cost.values())
    # A block of all-zero rows costs nothing either way and gives zeros.
    zero = RegressedJoints(body64, torch.zeros(3, 6890, dtype=torch.float64))
    rot, betas = random_frames(rng, 4)
    assert zero.macs_per_frame == 0 and torch.equal(zero(rot, betas), torch.zeros(4, 3, 3))


def test_float32_body_stays_within_its_precision(smpl_body, rng):
    reg = torch.from_numpy(np.concatenate([wide_regressor(rng), narrow_regressor(rng)]))
    rot, betas = random_frames(rng, 16, torch.float32)
    full = torch.einsum("kv,nvc->nkc", reg, smpl_body.vertices(rot, betas).double())
    fast = joint_regression(smpl_body, reg, [17, 17])(rot, betas)
    assert fast.dtype == torch.float64
    assert (fast - full).abs().max() < 1e-5  # 0.01 mm: float32 round-off of either path


def test_released_hedlin_regressor_is_skinned_on_its_58_vertices(body64, rng):
    from jregfix.io.regressors import effective_regressor, load_regressor

    hedlin = effective_regressor(load_regressor(shared_fixture("retrained_J_Regressor.pt")))
    reg = torch.from_numpy(np.asarray(hedlin, dtype=np.float64))
    fast = RegressedJoints(body64, reg)
    assert fast.paths == ["sparse"] and fast.num_sparse == 58
    rot, betas = random_frames(rng, 16)
    full = torch.einsum("kv,nvc->nkc", reg, body64.vertices(rot, betas))
    assert (fast(rot, betas) - full).abs().max() < 1e-10


def test_bad_blocks_and_mode(body64):
    reg = torch.zeros(17, 6890, dtype=torch.float64)
    with pytest.raises(ValueError, match="add up"):
        RegressedJoints(body64, reg, [10, 10])
    with pytest.raises(ValueError, match="mode"):
        RegressedJoints(body64, reg, mode="dense")
    with pytest.raises(ValueError, match="columns"):
        RegressedJoints(body64, reg[:, :100])


@pytest.fixture(scope="module")
def world(body64, tmp_path_factory):
    rng = np.random.default_rng(11)
    root = tmp_path_factory.mktemp("fast_eval")
    aa = camera_facing_poses(rng, N, 0.3)
    betas = rng.normal(size=(N, 10))
    rot = torch.from_numpy(Rotation.from_rotvec(aa.reshape(-1, 3)).as_matrix()).view(N, 24, 3, 3)
    verts = body64.vertices(rot, torch.from_numpy(betas)).numpy()
    wide, narrow = wide_regressor(rng), narrow_regressor(rng)
    np.save(root / "wide.npy", wide)
    np.save(root / "narrow.npy", np.abs(narrow) / np.abs(narrow).sum(1, keepdims=True))
    gt17 = np.einsum("kv,nvc->nkc", wide, verts) + rng.normal(size=(N, 17, 3)) * 0.02
    names = [
        h36m_imgname(
            ["S9", "S11"][i % 2],
            ["Walking_1", "Sitting 2"][(i // 2) % 2],
            ["54138969", "60457274"][(i // 4) % 2],
            i + 1,
        )
        for i in range(N)
    ]
    save_h36m(
        root / "gt.npz", names, np.full((N, 2), 500.0), np.full(N, 2.0), joints17_to_s24(gt17)
    )
    pred_aa = (aa + rng.normal(size=aa.shape) * 0.1).reshape(N, 72)
    pred_betas = betas + rng.normal(size=betas.shape) * 0.5
    np.savez(root / "spin.npz", pose=pred_aa, betas=pred_betas)
    # VIBE's vertices deliberately differ from SMPL(pose, betas): they must be used as given.
    pred_rot = torch.from_numpy(Rotation.from_rotvec(pred_aa.reshape(-1, 3)).as_matrix())
    file_verts = body64.vertices(pred_rot.view(N, 24, 3, 3), torch.from_numpy(pred_betas))
    file_verts = (file_verts.numpy() + rng.normal(size=(N, 6890, 3)) * 0.01).astype(np.float32)
    ids = np.arange(N)
    joblib.dump(
        {
            1: {
                "pose": pred_aa,
                "betas": pred_betas,
                "frame_ids": ids,
                "verts": file_verts,
                "pred_cam": np.zeros((N, 3)),
                "joints2d": None,
            }
        },
        root / "vibe_output.pkl",
    )
    return dict(root=root, file_verts=file_verts, gt17=gt17, wide=wide)


def _numbers(doc):
    out = {}
    for res in doc["results"]:
        key = (res["method"], res["regressor"])
        out[key] = [
            res["mpjpe_mm"],
            res["pa_mpjpe_mm"],
            *res["per_joint_mm"].values(),
            *res["per_joint_pa_mm"].values(),
            *[v for a in res["per_action"].values() for v in a.values()],
        ]
    return out


@pytest.mark.parametrize(("protocol", "joints"), [("p1", 14), ("p2", 17)])
def test_evaluate_numbers_equal_the_full_mesh_path(world, body64, protocol, joints, monkeypatch):
    r = world["root"]
    args = (
        [("spin", r / "spin.npz"), ("vibe", r / "vibe_output.pkl")],
        r / "gt.npz",
        {"wide": r / "wide.npy", "narrow": r / "narrow.npy"},
    )
    kw = dict(
        joints=joints,
        protocol=protocol,
        per_action=True,
        frame_ids="rows",
        bootstrap=50,
        chunk_size=20,
    )
    full_body = FullMesh(body64)
    full = _numbers(evaluate(*args, body=full_body, **kw).summary)
    assert full_body.vertex_calls > 0
    # The fast path never skins the whole mesh.
    monkeypatch.setattr(body64, "vertices", lambda *a: pytest.fail("full mesh skinned"))
    fast = _numbers(evaluate(*args, body=body64, **kw).summary)
    assert fast.keys() == full.keys() and len(fast) == 4
    for key, values in full.items():
        np.testing.assert_allclose(fast[key], values, rtol=0, atol=1e-4)


def test_vibe_keeps_the_vertices_of_its_file(world, body64):
    r = world["root"]
    doc = evaluate(
        [("vibe", r / "vibe_output.pkl")],
        r / "gt.npz",
        {"wide": r / "wide.npy"},
        body=body64,
        joints=17,
        frame_ids="rows",
        bootstrap=10,
    ).summary
    pred = np.einsum("kv,nvc->nkc", world["wide"], world["file_verts"].astype(np.float64))
    gt = world["gt17"] - world["gt17"][:, :1]
    expected = 1000 * np.linalg.norm(pred - pred[:, :1] - gt, axis=-1).mean()
    assert doc["results"][0]["mpjpe_mm"] == pytest.approx(expected, abs=1e-6)
    assert doc["protocol"]["methods"]["vibe"]["vertices"] == "from file"


def test_default_threads_share_the_cpus():
    from jregfix.threads import default_threads

    assert default_threads({"OMP_NUM_THREADS": "3"}, cpus=2, torch_default=2) == 3  # as told
    assert default_threads({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "4"}, 8, 8) == 3
    assert default_threads({"LOCAL_WORLD_SIZE": "4"}, cpus=8, torch_default=8) == 1  # torchrun
    assert default_threads({"LOCAL_WORLD_SIZE": "1"}, cpus=8, torch_default=4) == 4
    assert default_threads({}, cpus=2, torch_default=16) == 2  # taskset / cpuset
    assert default_threads({"OMP_NUM_THREADS": ""}, cpus=1, torch_default=1) == 1


def test_cli_applies_the_default(monkeypatch):
    from jregfix.cli import main

    before = torch.get_num_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert main(["regressors", "--help"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
