"""End-to-end `evaluate` on a synthetic world whose answer is computed independently."""

import json
import pickle

import joblib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from jregfix.cli import main
from jregfix.io.h36m import h36m_imgname, joints17_to_s24, save_h36m
from jregfix.stages.evaluate import evaluate
from tests.conftest import camera_facing_poses, planted_regressor
from tests.test_metrics import reference_pa
from tests.test_smpl import numpy_lbs

H36M_TO_J14 = [6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10]
N = 24


@pytest.fixture(scope="module")
def world(smpl_like_model, tmp_path_factory):
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("eval")
    aa = camera_facing_poses(rng, N, 0.25)
    betas = rng.normal(size=(N, 10))
    rot = Rotation.from_rotvec(aa.reshape(-1, 3)).as_matrix().reshape(N, 24, 3, 3)
    verts = np.stack([numpy_lbs(smpl_like_model, rot[i], betas[i]) for i in range(N)])
    j_true = planted_regressor(rng, 5)
    j_other = np.roll(j_true, 37, axis=1)
    np.save(root / "J_true.npy", j_true)
    np.save(root / "J_other.npy", j_other)
    gt17 = np.einsum("kv,nvc->nkc", j_true, verts)
    subjects = ["S9", "S11"]
    cams = ["54138969", "60457274"]
    names = [h36m_imgname(subjects[i % 2], ["Walking_1", "Sitting 2"][(i // 2) % 2],
                          cams[(i // 4) % 2], i + 1) for i in range(N)]
    save_h36m(root / "gt.npz", names, np.full((N, 2), 500.0), np.full(N, 2.0),
              joints17_to_s24(gt17))
    pred_aa = aa + rng.normal(size=aa.shape) * 0.05
    pred_betas = betas + rng.normal(size=betas.shape) * 0.3
    np.savez(root / "spin.npz", pose=pred_aa.reshape(N, 72), betas=pred_betas,
             camera=np.tile([0.9, 0, 0], (N, 1)))
    pred_rot = Rotation.from_rotvec(pred_aa.reshape(-1, 3)).as_matrix().reshape(N, 24, 3, 3)
    pred_verts = np.stack([numpy_lbs(smpl_like_model, pred_rot[i], pred_betas[i])
                           for i in range(N)])
    return dict(root=root, j_true=j_true, j_other=j_other, gt17=gt17, names=names,
                pred_aa=pred_aa, pred_betas=pred_betas, pred_verts=pred_verts, aa=aa,
                betas=betas)


def independent_errors(world, regressor, rows, joints=14):
    pred = np.einsum("kv,nvc->nkc", regressor, world["pred_verts"][rows])
    gt = world["gt17"][rows] - world["gt17"][rows, :1]
    pred = pred - pred[:, :1]
    if joints == 14:
        pred, gt = pred[:, H36M_TO_J14], gt[:, H36M_TO_J14]
    e = np.linalg.norm(pred - gt, axis=-1).mean(-1)
    pa = np.array([reference_pa(p, g) for p, g in zip(pred, gt, strict=True)])
    return 1000 * e.mean(), 1000 * pa.mean()


def test_spin_npz_against_independent_numbers(world, smpl_body):
    r = world["root"]
    doc = evaluate([("spin", r / "spin.npz")], r / "gt.npz",
                   {"true": r / "J_true.npy", "other": r / "J_other.npy"}, body=smpl_body)
    got = {x["regressor"]: x for x in doc["results"]}
    for name, j in (("true", world["j_true"]), ("other", world["j_other"])):
        e, pa = independent_errors(world, j, np.arange(N))
        assert got[name]["mpjpe_mm"] == pytest.approx(e, abs=1e-2)
        assert got[name]["pa_mpjpe_mm"] == pytest.approx(pa, abs=1e-2)
        assert got[name]["frames"] == N
    assert got["true"]["mpjpe_mm"] < got["other"]["mpjpe_mm"]
    p = doc["protocol"]
    assert p["protocol"] == "p1" and p["subjects"] == ["S11", "S9"]
    assert len(p["joints"]) == 14 and "pred onto GT" not in p["pa"]


def test_exact_prediction_scores_zero(world, smpl_body, tmp_path):
    r = world["root"]
    np.savez(tmp_path / "exact.npz", pose=world["aa"].reshape(N, 72), betas=world["betas"])
    doc = evaluate([("npz", tmp_path / "exact.npz")], r / "gt.npz", {"true": r / "J_true.npy"},
                   body=smpl_body, joints=17)
    assert doc["results"][0]["mpjpe_mm"] < 0.05  # float32 LBS round-off only
    assert doc["results"][0]["per_joint_mm"]["Pelvis"] == 0.0


def test_protocol_p2_and_per_action(world, smpl_body):
    r = world["root"]
    doc = evaluate([("spin", r / "spin.npz")], r / "gt.npz", {"true": r / "J_true.npy"},
                   body=smpl_body, protocol="p2", per_action=True)
    rows = np.array([i for i, n in enumerate(world["names"]) if ".60457274_" in n])
    res = doc["results"][0]
    assert res["frames"] == len(rows)
    e, pa = independent_errors(world, world["j_true"], rows)
    assert res["mpjpe_mm"] == pytest.approx(e, abs=1e-2)
    assert set(res["per_action"]) == {"Walking", "Sitting"}
    assert sum(a["frames"] for a in res["per_action"].values()) == len(rows)


@pytest.mark.parametrize("writer", ["joblib", "joblib-compressed", "pickle"])
def test_vibe_and_meva_pickles(world, smpl_body, tmp_path, writer):
    r = world["root"]
    order = np.random.default_rng(0).permutation(N)
    tracks = {}
    for tid, ids in enumerate(np.array_split(order, 2)):
        tracks[tid + 1] = {"pose": world["pred_aa"].reshape(N, 72)[ids],
                           "betas": world["pred_betas"][ids], "frame_ids": ids,
                           "verts": world["pred_verts"][ids].astype(np.float32),
                           "pred_cam": np.zeros((len(ids), 3)), "joints2d": None}
    path = tmp_path / "vibe_output.pkl"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(tracks))
    else:
        joblib.dump(tracks, path, compress=3 if writer.endswith("compressed") else 0)
    meva = {k: {kk: vv for kk, vv in t.items() if kk != "verts"} for k, t in tracks.items()}
    joblib.dump(meva, tmp_path / "meva_output.pkl")
    doc = evaluate([("vibe", path), ("meva", tmp_path / "meva_output.pkl")], r / "gt.npz",
                   {"true": r / "J_true.npy"}, body=smpl_body)
    e, pa = independent_errors(world, world["j_true"], np.arange(N))
    for res in doc["results"]:
        assert res["mpjpe_mm"] == pytest.approx(e, abs=1e-2)
        assert res["pa_mpjpe_mm"] == pytest.approx(pa, abs=1e-2)
    assert doc["protocol"]["methods"]["vibe"]["vertices"] == "from file"


def test_missing_frames_need_allow_missing(world, smpl_body, tmp_path):
    r = world["root"]
    ids = np.arange(0, N, 2)
    joblib.dump({1: {"pose": world["pred_aa"].reshape(N, 72)[ids],
                     "betas": world["pred_betas"][ids], "frame_ids": ids}}, tmp_path / "v.pkl")
    from jregfix.errors import JregfixError

    with pytest.raises(JregfixError, match="allow-missing"):
        evaluate([("vibe", tmp_path / "v.pkl")], r / "gt.npz", {"t": r / "J_true.npy"},
                 body=smpl_body)
    doc = evaluate([("vibe", tmp_path / "v.pkl")], r / "gt.npz", {"t": r / "J_true.npy"},
                   body=smpl_body, allow_missing=True)
    assert doc["results"][0]["frames"] == len(ids)
    assert doc["protocol"]["methods"]["vibe"]["frames_missing"] == N - len(ids)


def test_cli_writes_json_and_table(world, smpl_pkl, tmp_path, capsys):
    r = world["root"]
    out = tmp_path / "res.json"
    code = main(["evaluate", "--method", "spin", "--predictions", str(r / "spin.npz"),
                 "--gt", str(r / "gt.npz"), "--smpl", str(smpl_pkl), "--regressor",
                 f"true={r / 'J_true.npy'}", "--regressor", f"other={r / 'J_other.npy'}",
                 "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert {x["regressor"] for x in doc["results"]} == {"true", "other"}
    assert "PA-MPJPE" in capsys.readouterr().out


def _run_fail(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.endswith(errors[0])  # the last line, and only one
    return errors[0]


def test_bad_inputs_give_one_line_errors(world, smpl_pkl, tmp_path, capsys):
    r = world["root"]
    base = ["evaluate", "--method", "spin", "--smpl", str(smpl_pkl)]
    good_reg = ["--regressor", f"t={r / 'J_true.npy'}"]
    # truncated npz
    raw = (r / "spin.npz").read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    err = _run_fail(base + ["--predictions", str(tmp_path / "trunc.npz"), "--gt",
                            str(r / "gt.npz")] + good_reg, capsys)
    assert "trunc.npz" in err
    # wrong regressor shape
    np.save(tmp_path / "small.npy", np.ones((17, 100)) / 100)
    err = _run_fail(base + ["--predictions", str(r / "spin.npz"), "--gt", str(r / "gt.npz"),
                            "--regressor", f"s={tmp_path / 'small.npy'}"], capsys)
    assert "6890" in err
    # pickle with a disallowed global
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({1: Evil()}))
    err = _run_fail(["evaluate", "--method", "vibe", "--smpl", str(smpl_pkl), "--predictions",
                     str(tmp_path / "evil.pkl"), "--gt", str(r / "gt.npz")] + good_reg, capsys)
    assert "not allowed" in err
    # NaN poses
    pose = world["pred_aa"].reshape(N, 72).copy()
    pose[3, 5] = np.nan
    np.savez(tmp_path / "nan.npz", pose=pose, betas=world["pred_betas"])
    err = _run_fail(base + ["--predictions", str(tmp_path / "nan.npz"), "--gt",
                            str(r / "gt.npz")] + good_reg, capsys)
    assert "NaN" in err and "row 3" in err
    # empty GT
    save_h36m(tmp_path / "empty.npz", [], np.zeros((0, 2)), np.zeros(0), np.zeros((0, 24, 4)))
    err = _run_fail(base + ["--predictions", str(r / "spin.npz"), "--gt",
                            str(tmp_path / "empty.npz")] + good_reg, capsys)
    assert "no frames" in err
    # row-count mismatch
    np.savez(tmp_path / "short.npz", pose=world["pred_aa"].reshape(N, 72)[:5],
             betas=world["pred_betas"][:5])
    err = _run_fail(base + ["--predictions", str(tmp_path / "short.npz"), "--gt",
                            str(r / "gt.npz")] + good_reg, capsys)
    assert "5 frames" in err


def test_debug_shows_traceback(world, smpl_pkl, tmp_path):
    from jregfix.errors import JregfixError

    with pytest.raises(JregfixError):
        main(["--debug", "evaluate", "--method", "spin", "--predictions",
              str(tmp_path / "nope.npz"), "--gt", str(world["root"] / "gt.npz"),
              "--regressor", "t=x.npy"])


def test_tracks_protocol5_and_truncated_files(world, tmp_path):
    from jregfix.errors import JregfixError
    from jregfix.io.tracks import load_tracks

    tracks = {1: {"pose": world["pred_aa"].reshape(N, 72), "betas": world["pred_betas"],
                  "frame_ids": np.arange(N)}}
    data = pickle.dumps(tracks, protocol=5)
    (tmp_path / "p5.pkl").write_bytes(data)
    np.testing.assert_array_equal(load_tracks(tmp_path / "p5.pkl")[1]["betas"],
                                  world["pred_betas"])
    for cut in (7, len(data) // 2):
        (tmp_path / "cut.pkl").write_bytes(data[:cut])
        with pytest.raises(JregfixError):
            load_tracks(tmp_path / "cut.pkl")


def test_duplicate_methods_and_frames_are_refused(world, smpl_body, tmp_path):
    from jregfix.errors import JregfixError

    r = world["root"]
    with pytest.raises(JregfixError, match="once"):
        evaluate([("npz", r / "spin.npz"), ("npz", r / "spin.npz")], r / "gt.npz",
                 {"t": r / "J_true.npy"}, body=smpl_body)
    names = np.array(world["names"])
    names[1] = names[0]
    np.savez(tmp_path / "dup.npz", pose=world["pred_aa"].reshape(N, 72),
             betas=world["pred_betas"], imgname=names)
    with pytest.raises(JregfixError, match="more than once"):
        evaluate([("npz", tmp_path / "dup.npz")], r / "gt.npz", {"t": r / "J_true.npy"},
                 body=smpl_body)
