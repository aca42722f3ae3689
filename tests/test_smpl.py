"""SMPL loading (released-style pickle without chumpy, npz) against an independent numpy LBS."""

import pickle

import numpy as np
import pytest
import scipy.sparse
import torch
from scipy.spatial.transform import Rotation

from jregfix.body.base import batch_vertices
from jregfix.body.smpl import SMPLBody
from jregfix.body.synthetic import SMPL_PARENTS, write_npz
from jregfix.errors import JregfixError
from jregfix.io.smpl_file import load_smpl_file


def numpy_lbs(model: dict, rotmats: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """Textbook SMPL: shape + pose blend shapes, joints from the shaped mesh, LBS (one frame)."""
    v_shaped = model["v_template"] + np.asarray(model["shapedirs"])[:, :, :10] @ betas
    jreg = model["J_regressor"]
    jreg = jreg.toarray() if scipy.sparse.issparse(jreg) else np.asarray(jreg)
    joints = jreg @ v_shaped
    pose_feature = (rotmats[1:] - np.eye(3)).reshape(-1)
    v_posed = v_shaped + np.asarray(model["posedirs"]) @ pose_feature
    world = [None] * 24
    for j in range(24):
        local = np.eye(4)
        local[:3, :3] = rotmats[j]
        parent = SMPL_PARENTS[j]
        local[:3, 3] = joints[j] - (joints[parent] if parent >= 0 else 0)
        world[j] = local if parent < 0 else world[parent] @ local
    skin = np.stack(world)
    skin[:, :3, 3] -= np.einsum("jab,jb->ja", skin[:, :3, :3], joints)  # relative to rest joints
    t = np.einsum("vj,jab->vab", np.asarray(model["weights"]), skin)
    homo = np.concatenate([v_posed, np.ones((len(v_posed), 1))], 1)
    return np.einsum("vab,vb->va", t, homo)[:, :3]


def test_synthetic_model_has_smpl_format(smpl_like_model):
    m = smpl_like_model
    assert m["v_template"].shape == (6890, 3)
    assert m["f"].shape == (13776, 3)
    assert m["shapedirs"].shape == (6890, 3, 10)
    assert m["posedirs"].shape == (6890, 3, 207)
    assert scipy.sparse.issparse(m["J_regressor"]) and m["J_regressor"].shape == (24, 6890)
    # closed genus-0 surface: every edge shared by exactly two faces, Euler characteristic 2
    f = m["f"].astype(np.int64)
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), 1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert (counts == 2).all()
    assert 6890 - len(counts) + len(f) == 2
    np.testing.assert_allclose(m["weights"].sum(1), 1.0)
    np.testing.assert_allclose(np.asarray(m["J_regressor"].sum(1)).ravel(), 1.0)


def test_released_style_pickle_is_chumpy_like(smpl_pkl):
    import pickletools

    globals_used = {arg for op, arg, _ in pickletools.genops(smpl_pkl.read_bytes())
                    if op.name == "GLOBAL"}
    assert "chumpy.ch Ch" in globals_used
    assert "scipy.sparse.csc csc_matrix" in globals_used
    assert "copy_reg _reconstructor" in globals_used
    with pytest.raises(ModuleNotFoundError):  # what a plain pickle.load would hit
        pickle.loads(smpl_pkl.read_bytes(), encoding="latin1")


def test_loader_matches_numpy_lbs(smpl_like_model, smpl_body, rng):
    aa = rng.normal(size=(3, 24, 3)) * 0.4
    betas = rng.normal(size=(3, 10))
    rot = Rotation.from_rotvec(aa.reshape(-1, 3)).as_matrix().reshape(3, 24, 3, 3)
    ours = batch_vertices(smpl_body, torch.from_numpy(aa.reshape(3, 72)),
                          torch.from_numpy(betas)).numpy()
    for i in range(3):
        ref = numpy_lbs(smpl_like_model, rot[i], betas[i])
        np.testing.assert_allclose(ours[i], ref, atol=2e-5)


def test_npz_format_and_double_precision(smpl_like_model, tmp_path, rng):
    path = tmp_path / "SMPL_NEUTRAL.npz"
    write_npz(path, smpl_like_model)
    body = SMPLBody(path, dtype=torch.float64)
    aa = rng.normal(size=(2, 72)) * 0.3
    betas = rng.normal(size=(2, 10))
    verts = batch_vertices(body, torch.from_numpy(aa), torch.from_numpy(betas)).numpy()
    rot = Rotation.from_rotvec(aa.reshape(-1, 3)).as_matrix().reshape(2, 24, 3, 3)
    # smplx stores its buffers through float32 (smplx.utils.to_np), hence not 1e-12
    np.testing.assert_allclose(verts[1], numpy_lbs(smpl_like_model, rot[1], betas[1]), atol=1e-6)


def test_chunking_does_not_change_results(smpl_body, rng):
    pose = torch.from_numpy(rng.normal(size=(7, 24, 6)))
    betas = torch.from_numpy(rng.normal(size=(7, 10)))
    a = batch_vertices(smpl_body, pose, betas, chunk_size=3)
    b = batch_vertices(smpl_body, pose, betas, chunk_size=100)
    torch.testing.assert_close(a, b)


def test_disallowed_global_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"v_template": Evil()}, protocol=2))
    with pytest.raises(JregfixError, match="not allowed"):
        load_smpl_file(path)


def test_missing_key_and_bad_shape(smpl_like_model, tmp_path):
    partial = {k: v for k, v in smpl_like_model.items() if k != "posedirs"}
    path = tmp_path / "partial.npz"
    write_npz(path, partial)
    with pytest.raises(JregfixError, match="posedirs"):
        load_smpl_file(path)
    bad = dict(smpl_like_model, weights=np.ones((100, 24)))
    write_npz(path, bad)
    with pytest.raises(JregfixError, match="weights"):
        load_smpl_file(path)
