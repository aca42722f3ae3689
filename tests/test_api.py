"""The library API as a notebook uses it: nothing but `import jregfix` and its attributes.

Scores are checked against MPJPE / PA-MPJPE computed here from their definitions; the fit
against a planted regressor; a wrong shape is refused at the door naming the input.
"""

import subprocess
import sys

import numpy as np
import pytest

import jregfix

H36M_TO_J14 = [6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10]  # SPIN constants.py
V, N = 60, 12


# ----------------------------------------------------------------------------- references


def umeyama_error(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(K,) joint distances after the least-squares similarity (R, s, t) mapping pred onto gt,
    from Umeyama (1991): R = U diag(1, 1, det(U Vᵀ)) Vᵀ of cov = Σ (gt-μg)(pred-μp)ᵀ."""
    p, g = pred - pred.mean(0), gt - gt.mean(0)
    u, d, vt = np.linalg.svd(g.T @ p)
    e = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    r = u @ e @ vt
    s = np.trace(np.diag(d) @ e) / (p**2).sum()
    aligned = s * p @ r.T + gt.mean(0)
    return np.linalg.norm(aligned - gt, axis=1)


def reference(verts, gt17, j, joints):
    """(N, K) errors before and after alignment (mm), pelvis-centred, loops only."""
    e, pa = [], []
    for n in range(len(verts)):
        p = j @ verts[n]
        p, g = p - p[0], gt17[n] - gt17[n, 0]
        if joints == 14:
            p, g = p[H36M_TO_J14], g[H36M_TO_J14]
        e.append(1000 * np.sqrt(((p - g) ** 2).sum(1)))
        pa.append(1000 * umeyama_error(p, g))
    return np.array(e), np.array(pa)


@pytest.fixture
def world():
    rng = np.random.default_rng(5)
    truth = rng.normal(size=(N, V, 3)) * 0.3
    j_true = np.zeros((17, V))
    for k in range(17):  # disjoint supports of 3 vertices: identifiable
        j_true[k, 3 * k : 3 * k + 3] = rng.dirichlet(np.ones(3))
    j_other = np.roll(j_true, 1, axis=1)
    pred = truth + rng.normal(size=truth.shape) * 0.02
    gt17 = np.einsum("kv,nvc->nkc", j_true, truth) + rng.normal(size=(N, 1, 3))  # any offset
    return dict(
        truth=truth,
        pred=pred,
        gt17=gt17,
        j_true=j_true,
        j_other=j_other,
        actions=np.array(["Walk", "Sit"] * (N // 2)),
        sequences=np.array([f"S9_Walk.{n // 3}" for n in range(N)]),
    )


# ----------------------------------------------------------------------------- import


def test_import_is_cheap_and_names_resolve():
    code = "import sys, jregfix; print('numpy' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "False"]
    for name in jregfix.__all__:
        assert getattr(jregfix, name) is not None, name
        assert name in dir(jregfix)
    assert set(jregfix.__all__) == {"__version__", "load_body_model", *jregfix._API}
    assert jregfix.methods.score is jregfix.score
    assert set(jregfix.methods.__all__) == set(jregfix.methods._API)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        jregfix.nothing  # noqa: B018


# ----------------------------------------------------------------------------- score


@pytest.mark.parametrize("joints", [14, 17])
def test_score_vertices_against_independent_numbers(world, joints):
    regs = {"true": world["j_true"], "other": world["j_other"]}
    scores = jregfix.score(
        world["pred"],
        world["gt17"],
        regs,
        joints=joints,
        actions=world["actions"],
        sequences=world["sequences"],
    )
    assert scores.regressors == ("true", "other") and len(scores.joint_names) == joints
    summary = scores.summary()
    per_joint, per_joint_pa = scores.per_joint()
    for r, name in enumerate(regs):
        e, pa = reference(world["pred"], world["gt17"], regs[name], joints)
        np.testing.assert_allclose(scores.joint_mm[r], e, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(scores.pa_mpjpe_mm[r], pa.mean(1), rtol=1e-7, atol=1e-7)
        assert summary[name]["mpjpe_mm"] == pytest.approx(e.mean(), rel=1e-9)
        assert summary[name]["pa_mpjpe_mm"] == pytest.approx(pa.mean(), rel=1e-7)
        np.testing.assert_allclose(per_joint[r], e.mean(0), rtol=1e-9)
        np.testing.assert_allclose(per_joint_pa[r], pa.mean(0), rtol=1e-7, atol=1e-7)
        for action, v in scores.per_action().items():
            rows = world["actions"] == action
            assert v["frames"] == rows.sum()
            assert v["mpjpe_mm"][r] == pytest.approx(e[rows].mean(1).mean(), rel=1e-9)
    assert summary["true"]["mpjpe_mm"] < summary["other"]["mpjpe_mm"]
    d = scores.differences(resamples=200, seed=1)["mpjpe_mm"]
    assert d.sequences == 4 and d.frames == N
    assert d.difference[0, 1] == pytest.approx(
        summary["other"]["mpjpe_mm"] - summary["true"]["mpjpe_mm"], rel=1e-9
    )
    assert d.lower[0, 1] <= d.difference[0, 1] <= d.upper[0, 1]


def test_exact_vertices_score_zero_and_rows_select_frames(world):
    scores = jregfix.score(
        world["truth"][::2],
        world["gt17"],
        world["j_true"],
        joints=17,
        rows=np.arange(0, N, 2),
        allow_missing=True,
    )
    assert scores.frames == N // 2 and scores.regressors == ("regressor",)
    np.testing.assert_array_equal(scores.missing, np.arange(1, N, 2))
    assert np.abs(scores.joint_mm).max() < 1e-9 and np.abs(scores.joint_pa_mm).max() < 1e-6
    order = np.random.default_rng(0).permutation(N)  # frames in any order, rows say which
    shuffled = jregfix.score(world["truth"][order], world["gt17"], world["j_true"], rows=order)
    np.testing.assert_array_equal(shuffled.rows, order)
    assert np.abs(shuffled.joint_mm).max() < 1e-9
    with pytest.raises(jregfix.JregfixError, match="half.npz: 6 of 12 .*--allow-missing"):
        jregfix.score(
            world["truth"][::2],
            world["gt17"],
            world["j_true"],
            rows=np.arange(0, N, 2),
            name="half.npz",
        )
    # tensors work too
    torch = pytest.importorskip("torch")
    again = jregfix.score(torch.from_numpy(world["truth"]), world["gt17"], world["j_true"])
    assert np.abs(again.joint_mm).max() < 1e-9


def test_score_params_through_a_body_model(smpl_pkl):
    """Pose + betas posed by the body model score exactly like the body's own vertices."""
    import torch

    body = jregfix.load_body_model(smpl_pkl)
    rng = np.random.default_rng(2)
    pose = rng.normal(size=(6, 24, 3)) * 0.2
    betas = rng.normal(size=(6, 10))
    rotmat = torch.from_numpy(_rotmat(pose)).float()
    verts = body.vertices(rotmat, torch.from_numpy(betas).float()).double().numpy()
    j = np.zeros((17, body.num_vertices))
    j[np.arange(17), rng.choice(body.num_vertices, 17, replace=False)] = 1.0
    gt17 = np.einsum("kv,nvc->nkc", j, verts) + rng.normal(size=(6, 17, 3)) * 0.03
    from_params = jregfix.score(
        {"pose": pose.reshape(6, 72), "betas": betas}, gt17, j, body, joints=17
    )
    e, pa = reference(verts, gt17, j, 17)
    np.testing.assert_allclose(from_params.joint_mm[0], e, atol=1e-3)  # float32 body
    np.testing.assert_allclose(from_params.joint_pa_mm[0], pa, atol=1e-3)
    with pytest.raises(jregfix.JregfixError, match="mine.npz: betas have 11 coefficients"):
        jregfix.score(
            {"pose": pose.reshape(6, 72), "betas": np.zeros((6, 11))},
            gt17,
            j,
            body,
            name="mine.npz",
        )


def _rotmat(aa: np.ndarray) -> np.ndarray:
    """Rodrigues, (..., 3) axis-angle -> (..., 3, 3)."""
    theta = np.linalg.norm(aa, axis=-1, keepdims=True)[..., None]
    k = aa / np.maximum(np.linalg.norm(aa, axis=-1, keepdims=True), 1e-12)
    kx = np.zeros(aa.shape + (3,))
    kx[..., 0, 1], kx[..., 0, 2], kx[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    kx = kx - np.swapaxes(kx, -1, -2)
    return np.eye(3) + np.sin(theta) * kx + (1 - np.cos(theta)) * kx @ kx


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(predictions=np.zeros((N, V))), "predictions: vertices must be a real \\(N, V, 3\\)"),
        (dict(predictions=np.full((N, V, 3), np.nan)), "predictions: vertices contain NaN"),
        (dict(predictions=np.zeros((N, V + 1, 3))), "vertices have 61 points"),
        (dict(gt=np.zeros((N, 14, 3))), "gt: joints must be a real \\(M, 17, 3\\)"),
        (dict(gt=np.zeros((N + 1, 17, 3))), "12 frames but the GT has 13 rows"),
        (dict(regressors={"j": np.ones((14, V))}), "regressor 'j': 14 rows, expected 17"),
        (dict(regressors={"j": np.ones((17, V)), "k": np.ones((17, V + 1))}), "different sizes"),
        (dict(joints=16), "joints must be 14 or 17"),
        (dict(protocol="p2"), "selects rows by camera"),
        (dict(rows=np.arange(N) + 1), "outside the GT's 12 rows"),
        (dict(actions=np.zeros(3)), "actions: expected one label per GT row"),
        (
            dict(predictions={"pose": np.zeros((N, 72)), "betas": np.zeros((N, 10))}),
            "a body model .* is needed",
        ),
    ],
)
def test_bad_shapes_are_refused_at_the_door(world, bad, match):
    args = dict(predictions=world["pred"], gt=world["gt17"], regressors=world["j_true"]) | bad
    with pytest.raises(jregfix.JregfixError, match=match):
        jregfix.score(args.pop("predictions"), args.pop("gt"), args.pop("regressors"), **args)


# ----------------------------------------------------------------------------- fit, refine


def test_fit_regressor_recovers_a_planted_world(world):
    rng = np.random.default_rng(8)
    meshes = rng.normal(size=(40, V, 3)) * 0.3
    joints = np.einsum("kv,nvc->nkc", world["j_true"], meshes)
    joints -= joints[:, :1]  # pelvis-centred, as Human3.6M's GT: one unknown shift per frame
    fit = jregfix.fit_regressor(meshes, joints, meshes.mean(0), jregfix.FitConfig(tol=1e-12))
    assert isinstance(fit, jregfix.FitResult)
    assert fit.regressor.shape == (17, V) and (fit.regressor >= 0).all()
    np.testing.assert_allclose(fit.regressor, world["j_true"], atol=1e-6)
    scores = jregfix.score(meshes, joints, {"fitted": fit.regressor}, joints=17)
    assert scores.summary()["fitted"]["mpjpe_mm"] < 1e-3


RN, SIZE = 6, 64  # refine: frames, crop side (px)


@pytest.fixture(scope="module")
def refine_world(smpl_pkl):
    """True SMPL fits of RN frames, a planted J_spin, the GT joints it gives and the masks of
    the true meshes; the initial fits perturb pose, shape and depth."""
    import torch

    # only to draw the planted masks
    from jregfix.geometry.camera import PinholeCamera
    from jregfix.render.silhouette import hard_silhouette
    from tests.conftest import camera_facing_poses, planted_regressor

    body = jregfix.load_body_model(smpl_pkl)
    rng = np.random.default_rng(4)
    aa = camera_facing_poses(rng, RN, 0.2)
    betas = rng.normal(size=(RN, 10)) * 0.5
    cam_t = np.stack(
        [rng.normal(size=RN) * 0.05, 0.1 + rng.normal(size=RN) * 0.05, 45 + rng.normal(size=RN)], 1
    )
    verts = body.vertices(torch.from_numpy(_rotmat(aa)).float(), torch.from_numpy(betas).float())
    j_spin = planted_regressor(rng, 4)
    focal = 5000.0 * SIZE / 224  # SPIN's 5000 px at 224, same field of view at SIZE
    camera = PinholeCamera.spin_crop(RN, focal, SIZE)
    masks = hard_silhouette(
        verts, body.faces, camera, SIZE, cam_t=torch.from_numpy(cam_t).float()
    ).numpy()
    return dict(
        body=body,
        j_spin=j_spin,
        joints=np.einsum("kv,nvc->nkc", j_spin, verts.double().numpy()),
        masks=masks,
        cam_t=cam_t,
        init_pose=(aa + rng.normal(size=aa.shape) * 0.1).reshape(RN, 72),
        init_betas=betas + rng.normal(size=betas.shape) * 0.3,
        init_cam_t=cam_t + np.array([0.04, -0.04, 4.0]),
    )


def _config():
    return jregfix.RefineConfig(iters=30, batch_size=3, image_size=SIZE)


@pytest.fixture(scope="module")
def refined(refine_world):
    import torch

    w = refine_world
    # tensors and arrays mixed, as a notebook would have them
    return jregfix.refine(
        w["body"],
        w["j_spin"],
        torch.from_numpy(w["init_pose"]),
        torch.from_numpy(w["init_betas"]),
        w["init_cam_t"],
        w["joints"],
        torch.from_numpy(w["masks"]),
        _config(),
        seed=3,
    )


def _joint_error_mm(world, rotmat, betas) -> np.ndarray:
    """(RN,) mean root-relative error of J_spin's joints on the posed meshes, in numpy."""
    import torch

    verts = (
        world["body"]
        .vertices(torch.as_tensor(rotmat).float(), torch.as_tensor(betas).float())
        .double()
        .numpy()
    )
    pred = np.einsum("kv,nvc->nkc", world["j_spin"], verts)
    pred, gt = pred - pred[:, :1], world["joints"] - world["joints"][:, :1]
    return 1000 * np.linalg.norm(pred - gt, axis=-1).mean(-1)


@pytest.mark.slow
def test_refine_from_tensors(refine_world, refined):
    w, r = refine_world, refined
    assert isinstance(r, jregfix.RefineResult) and jregfix.refine is jregfix.methods.refine
    assert r.rotmat.shape == (RN, 24, 3, 3) and r.betas.shape == (RN, 10)
    before = _joint_error_mm(w, _rotmat(w["init_pose"].reshape(RN, 24, 3)), w["init_betas"])
    after = _joint_error_mm(w, r.rotmat, r.betas)
    assert after.mean() < 0.5 * before.mean()
    np.testing.assert_allclose(r.metrics["joint_err_after_mm"], after, rtol=1e-3, atol=1e-3)
    # the silhouettes are what move the camera: its depth error shrinks
    dz = np.abs(r.cam_t[:, 2] - w["cam_t"][:, 2]).mean()
    assert dz < 0.85 * np.abs(w["init_cam_t"][:, 2] - w["cam_t"][:, 2]).mean()
    assert r.summary()["iou_after"] > r.summary()["iou_before"]
    # the other layouts: axis-angle by Rodrigues, SPIN's weak camera s = 2 f / (224 tz)
    np.testing.assert_allclose(_rotmat(r.pose.reshape(RN, 24, 3)), r.rotmat, atol=1e-5)
    np.testing.assert_allclose(r.camera[:, 0], 2 * 5000 / (224 * r.cam_t[:, 2]), rtol=1e-6)
    np.testing.assert_allclose(r.camera[:, 1:], r.cam_t[:, :2])


@pytest.mark.slow
def test_refine_equals_the_stage_on_the_same_inputs(refine_world, refined, smpl_pkl, tmp_path):
    """The `refine` command's stage on the same arrays written to files: the same bits."""
    from dataclasses import replace

    from jregfix.io.h36m import h36m_imgname, joints17_to_s24, save_h36m
    from jregfix.io.masks import save_silhouettes
    from jregfix.stages.refine import refine as refine_stage

    w = refine_world
    names = np.array([h36m_imgname("S1", "Walking_1", "54138969", i + 1) for i in range(RN)])
    save_h36m(
        tmp_path / "gt.npz",
        names,
        np.full((RN, 2), 500.0),
        np.full(RN, 2.0),
        joints17_to_s24(w["joints"]),
    )
    save_silhouettes(tmp_path / "sil.npz", w["masks"], np.ones(RN), np.ones(RN, bool), names)
    np.savez(
        tmp_path / "init.npz",
        pose=w["init_pose"],
        betas=w["init_betas"],
        cam_t=w["init_cam_t"],
        imgname=names,
    )
    np.save(tmp_path / "J.npy", w["j_spin"])
    refine_stage(
        tmp_path / "init.npz",
        tmp_path / "gt.npz",
        tmp_path / "sil.npz",
        w["body"],
        tmp_path / "J.npy",
        tmp_path / "out.npz",
        replace(_config(), seed=3),
    )
    with np.load(tmp_path / "out.npz") as out:
        for key in ("pose", "pose_6d", "betas", "cam_t", "camera"):
            np.testing.assert_array_equal(getattr(refined, key), out[key], err_msg=key)
        np.testing.assert_array_equal(refined.rotmat, out["pred_rotmat"])
        for key, value in refined.metrics.items():
            np.testing.assert_array_equal(value, out[key], err_msg=key)
        assert set(out.files) == {
            *refined.metrics,
            "pred_rotmat",
            "pose",
            "pose_6d",
            "betas",
            "cam_t",
            "camera",
            "rows",
            "imgname",
        }


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            dict(joints=np.zeros((RN, 14, 3))),
            "joints: shape \\(6, 14, 3\\), expected \\(N, 17, 3\\)",
        ),
        (dict(betas=np.zeros((RN + 1, 10))), "betas: shape \\(7, 10\\)"),
        (dict(betas=np.zeros((RN, 11))), "betas: 11 coefficients but the body model has 10"),
        (
            dict(pose=np.zeros((RN, 70))),
            "pose: shape \\(6, 70\\) is none of axis-angle \\(N, 72\\)",
        ),
        (dict(masks=np.zeros((RN, 64, 32), bool)), "masks: 64x32 crops, expected square"),
        (dict(cam_t=np.full((RN, 3), np.nan)), "cam_t: contains NaN"),
        (dict(regressor=np.ones((16, 6890))), "regressor: 16 rows, expected 17"),
        (dict(keypoints=np.zeros((RN, 17, 2))), "keypoints need `visible`"),
    ],
)
def test_refine_refuses_bad_inputs_naming_them(refine_world, bad, match):
    w = refine_world
    args = (
        dict(
            regressor=w["j_spin"],
            pose=w["init_pose"],
            betas=w["init_betas"],
            cam_t=w["init_cam_t"],
            joints=w["joints"],
            masks=w["masks"],
        )
        | bad
    )
    with pytest.raises(jregfix.JregfixError, match=match):
        jregfix.refine(w["body"], **args, config=_config())
