"""End-to-end `evaluate` on a synthetic world whose answer is computed independently."""

import hashlib
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
    names = [
        h36m_imgname(
            subjects[i % 2], ["Walking_1", "Sitting 2"][(i // 2) % 2], cams[(i // 4) % 2], i + 1
        )
        for i in range(N)
    ]
    save_h36m(
        root / "gt.npz", names, np.full((N, 2), 500.0), np.full(N, 2.0), joints17_to_s24(gt17)
    )
    pred_aa = aa + rng.normal(size=aa.shape) * 0.05
    pred_betas = betas + rng.normal(size=betas.shape) * 0.3
    np.savez(
        root / "spin.npz",
        pose=pred_aa.reshape(N, 72),
        betas=pred_betas,
        camera=np.tile([0.9, 0, 0], (N, 1)),
    )
    pred_rot = Rotation.from_rotvec(pred_aa.reshape(-1, 3)).as_matrix().reshape(N, 24, 3, 3)
    pred_verts = np.stack(
        [numpy_lbs(smpl_like_model, pred_rot[i], pred_betas[i]) for i in range(N)]
    )
    return dict(
        root=root,
        j_true=j_true,
        j_other=j_other,
        gt17=gt17,
        names=names,
        pred_aa=pred_aa,
        pred_betas=pred_betas,
        pred_verts=pred_verts,
        aa=aa,
        betas=betas,
    )


def independent_errors(world, regressor, rows, joints=14):
    """MPJPE and PA-MPJPE (mm), means over frames, numpy only."""
    e, pa = independent_frame_errors(world, regressor, rows, joints)
    return e.mean(), pa.mean()


def evaluate_spin(root, smpl) -> list[str]:
    """`evaluate` of the world's SPIN predictions against its GT (add --regressor ...)."""
    return [
        "evaluate",
        "--method",
        "spin",
        "--predictions",
        str(root / "spin.npz"),
        "--gt",
        str(root / "gt.npz"),
        "--smpl",
        str(smpl),
    ]


def test_spin_npz_against_independent_numbers(world, smpl_body):
    r = world["root"]
    doc = evaluate(
        [("spin", r / "spin.npz")],
        r / "gt.npz",
        {"true": r / "J_true.npy", "other": r / "J_other.npy"},
        body=smpl_body,
    ).summary
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
    doc = evaluate(
        [("npz", tmp_path / "exact.npz")],
        r / "gt.npz",
        {"true": r / "J_true.npy"},
        body=smpl_body,
        joints=17,
    ).summary
    assert doc["results"][0]["mpjpe_mm"] < 0.05  # float32 LBS round-off only
    assert doc["results"][0]["per_joint_mm"]["Pelvis"] == 0.0


def test_protocol_p2_and_per_action(world, smpl_body):
    r = world["root"]
    doc = evaluate(
        [("spin", r / "spin.npz")],
        r / "gt.npz",
        {"true": r / "J_true.npy"},
        body=smpl_body,
        protocol="p2",
        per_action=True,
    ).summary
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
        tracks[tid + 1] = {
            "pose": world["pred_aa"].reshape(N, 72)[ids],
            "betas": world["pred_betas"][ids],
            "frame_ids": ids,
            "verts": world["pred_verts"][ids].astype(np.float32),
            "pred_cam": np.zeros((len(ids), 3)),
            "joints2d": None,
        }
    path = tmp_path / "vibe_output.pkl"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(tracks))
    else:
        joblib.dump(tracks, path, compress=3 if writer.endswith("compressed") else 0)
    meva = {k: {kk: vv for kk, vv in t.items() if kk != "verts"} for k, t in tracks.items()}
    joblib.dump(meva, tmp_path / "meva_output.pkl")
    doc = evaluate(
        [("vibe", path), ("meva", tmp_path / "meva_output.pkl")],
        r / "gt.npz",
        {"true": r / "J_true.npy"},
        body=smpl_body,
        frame_ids="rows",
    ).summary
    e, pa = independent_errors(world, world["j_true"], np.arange(N))
    for res in doc["results"]:
        assert res["mpjpe_mm"] == pytest.approx(e, abs=1e-2)
        assert res["pa_mpjpe_mm"] == pytest.approx(pa, abs=1e-2)
    assert doc["protocol"]["methods"]["vibe"]["vertices"] == "from file"


def test_missing_frames_need_allow_missing(world, smpl_body, tmp_path):
    r = world["root"]
    ids = np.arange(0, N, 2)
    joblib.dump(
        {
            1: {
                "pose": world["pred_aa"].reshape(N, 72)[ids],
                "betas": world["pred_betas"][ids],
                "frame_ids": ids,
            }
        },
        tmp_path / "v.pkl",
    )
    from jregfix.errors import JregfixError

    with pytest.raises(JregfixError, match="allow-missing"):
        evaluate(
            [("vibe", tmp_path / "v.pkl")],
            r / "gt.npz",
            {"t": r / "J_true.npy"},
            body=smpl_body,
            frame_ids="rows",
        )
    doc = evaluate(
        [("vibe", tmp_path / "v.pkl")],
        r / "gt.npz",
        {"t": r / "J_true.npy"},
        body=smpl_body,
        allow_missing=True,
        frame_ids="rows",
    ).summary
    assert doc["results"][0]["frames"] == len(ids)
    assert doc["protocol"]["methods"]["vibe"]["frames_missing"] == N - len(ids)


def test_cli_writes_json_and_table(world, smpl_pkl, tmp_path, capsys):
    r = world["root"]
    out = tmp_path / "res.json"
    code = main(
        [
            *evaluate_spin(r, smpl_pkl),
            "--regressor",
            f"true={r / 'J_true.npy'}",
            "--regressor",
            f"other={r / 'J_other.npy'}",
            "--json",
            str(out),
        ]
    )
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
    err = _run_fail(
        base + ["--predictions", str(tmp_path / "trunc.npz"), "--gt", str(r / "gt.npz")] + good_reg,
        capsys,
    )
    assert "trunc.npz" in err
    # wrong regressor shape
    np.save(tmp_path / "small.npy", np.ones((17, 100)) / 100)
    err = _run_fail(
        base
        + [
            "--predictions",
            str(r / "spin.npz"),
            "--gt",
            str(r / "gt.npz"),
            "--regressor",
            f"s={tmp_path / 'small.npy'}",
        ],
        capsys,
    )
    assert "6890" in err

    # pickle with a disallowed global
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({1: Evil()}))
    err = _run_fail(
        [
            "evaluate",
            "--method",
            "vibe",
            "--smpl",
            str(smpl_pkl),
            "--predictions",
            str(tmp_path / "evil.pkl"),
            "--gt",
            str(r / "gt.npz"),
        ]
        + good_reg,
        capsys,
    )
    assert "not allowed" in err
    # NaN poses
    pose = world["pred_aa"].reshape(N, 72).copy()
    pose[3, 5] = np.nan
    np.savez(tmp_path / "nan.npz", pose=pose, betas=world["pred_betas"])
    err = _run_fail(
        base + ["--predictions", str(tmp_path / "nan.npz"), "--gt", str(r / "gt.npz")] + good_reg,
        capsys,
    )
    assert "NaN" in err and "row 3" in err
    # empty GT
    save_h36m(tmp_path / "empty.npz", [], np.zeros((0, 2)), np.zeros(0), np.zeros((0, 24, 4)))
    err = _run_fail(
        base
        + ["--predictions", str(r / "spin.npz"), "--gt", str(tmp_path / "empty.npz")]
        + good_reg,
        capsys,
    )
    assert "no frames" in err
    # row-count mismatch
    np.savez(
        tmp_path / "short.npz",
        pose=world["pred_aa"].reshape(N, 72)[:5],
        betas=world["pred_betas"][:5],
    )
    err = _run_fail(
        base + ["--predictions", str(tmp_path / "short.npz"), "--gt", str(r / "gt.npz")] + good_reg,
        capsys,
    )
    assert "5 frames" in err


def test_debug_shows_traceback(world, smpl_pkl, tmp_path):
    from jregfix.errors import JregfixError

    with pytest.raises(JregfixError):
        main(
            [
                "--debug",
                "evaluate",
                "--method",
                "spin",
                "--predictions",
                str(tmp_path / "nope.npz"),
                "--gt",
                str(world["root"] / "gt.npz"),
                "--regressor",
                "t=x.npy",
            ]
        )


def test_tracks_protocol5_and_truncated_files(world, tmp_path):
    from jregfix.errors import JregfixError
    from jregfix.io.tracks import load_tracks

    tracks = {
        1: {
            "pose": world["pred_aa"].reshape(N, 72),
            "betas": world["pred_betas"],
            "frame_ids": np.arange(N),
        }
    }
    data = pickle.dumps(tracks, protocol=5)
    (tmp_path / "p5.pkl").write_bytes(data)
    np.testing.assert_array_equal(load_tracks(tmp_path / "p5.pkl")[1]["betas"], world["pred_betas"])
    for cut in (7, len(data) // 2):
        (tmp_path / "cut.pkl").write_bytes(data[:cut])
        with pytest.raises(JregfixError):
            load_tracks(tmp_path / "cut.pkl")


def test_duplicate_methods_and_frames_are_refused(world, smpl_body, tmp_path):
    from jregfix.errors import JregfixError

    r = world["root"]
    with pytest.raises(JregfixError, match="once"):
        evaluate(
            [("npz", r / "spin.npz"), ("npz", r / "spin.npz")],
            r / "gt.npz",
            {"t": r / "J_true.npy"},
            body=smpl_body,
        )
    names = np.array(world["names"])
    names[1] = names[0]
    np.savez(
        tmp_path / "dup.npz",
        pose=world["pred_aa"].reshape(N, 72),
        betas=world["pred_betas"],
        imgname=names,
    )
    with pytest.raises(JregfixError, match="more than once"):
        evaluate(
            [("npz", tmp_path / "dup.npz")], r / "gt.npz", {"t": r / "J_true.npy"}, body=smpl_body
        )


def test_suspicious_regressor_is_used_as_given_but_flagged(
    world, smpl_body, smpl_pkl, tmp_path, capsys, monkeypatch
):
    """A re-saved raw (negative, unnormalised) regressor is applied as stored and flagged in
    the JSON and the table; the raw Hedlin file, known by its sha256, is made effective."""
    import jregfix.stages.evaluate as E

    r = world["root"]
    raw = world["j_true"] * 1.3
    outside = np.flatnonzero(~world["j_true"].any(0))[:40]
    raw[:, outside] = -0.01  # negative weights outside the support, as the released file has
    np.save(tmp_path / "raw.npy", raw)
    regs = {"true": r / "J_true.npy", "raw": tmp_path / "raw.npy"}
    doc = evaluate([("spin", r / "spin.npz")], r / "gt.npz", regs, body=smpl_body).summary
    info = doc["protocol"]["regressors"]
    assert info["true"]["warnings"] == [] and info["raw"]["transform"] == "as stored"
    assert info["raw"]["warnings"][0] == f"{17 * 40} negative weight(s)"
    assert "--effective" in info["raw"]["warnings"][-1]
    got = {x["regressor"]: x["mpjpe_mm"] for x in doc["results"]}
    assert got["raw"] == pytest.approx(independent_errors(world, raw, np.arange(N))[0], abs=1e-2)
    assert (
        main(
            [
                *evaluate_spin(r, smpl_pkl),
                "--regressor",
                f"raw={tmp_path / 'raw.npy'}",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "raw (!)" in out and "negative weight(s)" in out

    np.save(tmp_path / "hedlin.npy", raw)
    monkeypatch.setattr(
        E, "HEDLIN_SHA256", hashlib.sha256((tmp_path / "hedlin.npy").read_bytes()).hexdigest()
    )
    doc = evaluate(
        [("spin", r / "spin.npz")], r / "gt.npz", {"h": tmp_path / "hedlin.npy"}, body=smpl_body
    ).summary
    info = doc["protocol"]["regressors"]["h"]
    assert info["transform"].startswith("ReLU") and info["warnings"] == []
    pos = np.maximum(raw, 0)
    e, _ = independent_errors(world, pos / pos.sum(1, keepdims=True), np.arange(N))
    assert doc["results"][0]["mpjpe_mm"] == pytest.approx(e, abs=1e-2)


# ----------------------------------------------------------------------------- intervals, flags


def independent_frame_errors(world, regressor, rows, joints=17):
    """(len(rows),) MPJPE and PA-MPJPE per frame (mm), numpy only."""
    pred = np.einsum("kv,nvc->nkc", regressor, world["pred_verts"][rows])
    gt = world["gt17"][rows] - world["gt17"][rows, :1]
    pred = pred - pred[:, :1]
    if joints == 14:
        pred, gt = pred[:, H36M_TO_J14], gt[:, H36M_TO_J14]
    e = np.linalg.norm(pred - gt, axis=-1).mean(-1)
    pa = np.array([reference_pa(p, g) for p, g in zip(pred, gt, strict=True)])
    return 1000 * e, 1000 * pa


def test_paired_differences_against_an_independent_bootstrap(world, smpl_body, tmp_path):
    """Differences and intervals from per-frame errors computed here, sequences parsed here
    from the image names, and the slow loop of tests/test_intervals.py on the same draws.
    An identical regressor under another name differs by exactly 0 (the resampling is
    paired)."""
    import re

    from tests.test_intervals import slow_reference

    r = world["root"]
    np.savez(tmp_path / "J_same.npz", J_regressor=world["j_true"])
    regs = {"true": r / "J_true.npy", "other": r / "J_other.npy", "same": tmp_path / "J_same.npz"}
    doc = evaluate(
        [("spin", r / "spin.npz")],
        r / "gt.npz",
        regs,
        body=smpl_body,
        joints=17,
        bootstrap=300,
        seed=3,
    ).summary
    labels = [re.fullmatch(r"images/(S\d+_.+\.\d+)_\d+\.jpg", n).group(1) for n in world["names"]]
    assert len(set(labels)) == 8
    frame = {
        name: independent_frame_errors(world, j, np.arange(N))
        for name, j in (
            ("true", world["j_true"]),
            ("other", world["j_other"]),
            ("same", world["j_true"]),
        )
    }
    got = {(d["baseline"], d["regressor"]): d for d in doc["differences"]}
    assert set(got) == {("true", "other"), ("true", "same"), ("other", "same")}
    for m, metric in enumerate(("mpjpe_mm", "pa_mpjpe_mm")):
        values = np.stack([frame[n][m] for n in ("true", "other", "same")], 1)
        lo, hi = slow_reference(values, labels, 300, 3, 0.95)
        for (a, b), d in got.items():
            i, j = ["true", "other", "same"].index(a), ["true", "other", "same"].index(b)
            assert d["sequences"] == 8 and d["frames"] == N
            assert d[metric]["difference"] == pytest.approx(
                values[:, j].mean() - values[:, i].mean(), abs=2e-2
            )
            assert d[metric]["interval"] == pytest.approx([lo[i, j], hi[i, j]], abs=2e-2)
    same = got[("true", "same")]["mpjpe_mm"]  # unpaired draws would spread by millimetres
    assert same["difference"] == pytest.approx(0, abs=1e-9)
    assert same["interval"] == pytest.approx([0, 0], abs=1e-9)
    other = got[("true", "other")]["mpjpe_mm"]
    assert 0 < other["interval"][0] <= other["difference"] <= other["interval"][1]
    assert all(x["sequences"] == 8 for x in doc["results"])
    b = doc["protocol"]["bootstrap"]
    assert (b["resamples"], b["seed"], b["level"]) == (300, 3, 0.95)
    for x in doc["results"]:  # per-joint PA errors average to the PA-MPJPE
        assert np.mean(list(x["per_joint_pa_mm"].values())) == pytest.approx(x["pa_mpjpe_mm"])


def test_training_data_flags(world, smpl_body, smpl_pkl, tmp_path, capsys, monkeypatch):
    """Provenance beside the file (fit-regressor's report, a world-style record, a registry
    download) or the raw Hedlin sha256 names the training subjects; a regressor fitted on a
    scored subject is flagged in the JSON and the table."""
    import jregfix.stages.evaluate as E

    r = world["root"]
    paths = {}
    for name, provenance in (
        (
            "fit",
            {"leakage_guard": {"subjects": {"S1": 40, "S9": 12}, "test_subjects_used": ["S9"]}},
        ),
        ("held_out", {"subjects": ["S1", "S5"], "stage": "world"}),
        ("download", {"name": "hedlin", "source": "file:///x"}),
        ("unknown", None),
    ):
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], world["j_true"])
        if provenance is not None:
            (tmp_path / f"{name}.npy.json").write_text(json.dumps(provenance))
    doc = evaluate(
        [("spin", r / "spin.npz")], r / "gt.npz", paths, body=smpl_body, bootstrap=50
    ).summary
    info = doc["protocol"]["regressors"]
    assert info["fit"]["training"]["subjects"] == ["S1", "S9"]
    assert info["fit"]["training"]["evaluated_subjects_in_training"] == ["S9"]
    assert info["held_out"]["training"]["subjects"] == ["S1", "S5"]
    assert info["download"]["training"]["subjects"] == ["S11", "S9"]
    assert "validation" in info["download"]["training"]["note"]
    assert info["unknown"]["training"]["subjects"] is None
    flags = {n: i["fitted_on_test_subjects"] for n, i in info.items()}
    assert flags == {"fit": True, "held_out": False, "download": True, "unknown": False}
    assert {x["regressor"]: x["fitted_on_test_subjects"] for x in doc["results"]} == flags

    np.save(tmp_path / "raw.npy", world["j_true"] * 1.1)
    monkeypatch.setattr(
        E, "HEDLIN_SHA256", hashlib.sha256((tmp_path / "raw.npy").read_bytes()).hexdigest()
    )
    assert (
        main(
            [
                *evaluate_spin(r, smpl_pkl),
                "--regressor",
                f"ok={paths['held_out']}",
                "--regressor",
                f"raw={tmp_path / 'raw.npy'}",
                "--bootstrap",
                "50",
                "--per-joint",
                "--per-action",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "raw (†)" in out and "ok (†)" not in out
    assert "fitted on test subjects (S11, S9; registry entry 'hedlin'" in out.replace("\n", " ")
    assert "L Knee" in out and "per joint" in out  # --per-joint table
    assert "per action" in out  # --per-action table


def test_outputs_never_replace_inputs(world, smpl_body, tmp_path):
    from jregfix.errors import JregfixError

    r = world["root"]
    before = (r / "gt.npz").read_bytes()
    for kwargs in ({"json_out": r / "gt.npz"}, {"csv_out": r / "J_true.npy"}):
        with pytest.raises(JregfixError, match="one of the inputs"):
            evaluate(
                [("spin", r / "spin.npz")],
                r / "gt.npz",
                {"t": r / "J_true.npy"},
                body=smpl_body,
                **kwargs,
            )
    assert (r / "gt.npz").read_bytes() == before


def test_betas_of_another_shape_space_fail_in_one_line(world, smpl_pkl, tmp_path, capsys):
    """(N, 11) betas against a 10-beta model: one line naming the file, not a traceback or the
    boundary's generic wording."""
    r = world["root"]
    np.savez(
        tmp_path / "b11.npz",
        pose=world["pred_aa"].reshape(N, 72),
        betas=np.c_[world["pred_betas"], np.zeros(N)],
    )
    err = _run_fail(
        [
            "evaluate",
            "--method",
            "spin",
            "--predictions",
            str(tmp_path / "b11.npz"),
            "--gt",
            str(r / "gt.npz"),
            "--smpl",
            str(smpl_pkl),
            "--regressor",
            f"t={r / 'J_true.npy'}",
        ],
        capsys,
    )
    assert err == (
        f"error: {tmp_path / 'b11.npz'}: betas have 11 coefficients but the body model has 10"
    )


def test_stage_result_and_progress_steps(world, smpl_body, tmp_path):
    from jregfix.stages.result import StageResult

    r = world["root"]
    steps = []
    result = evaluate(
        [("spin", r / "spin.npz"), ("npz", r / "spin.npz")],
        r / "gt.npz",
        {"t": r / "J_true.npy"},
        body=smpl_body,
        protocol="p2",
        chunk_size=5,
        json_out=tmp_path / "e.json",
        csv_out=tmp_path / "e.csv",
        progress=steps.append,
        bootstrap=20,
    )
    assert isinstance(result, StageResult) and result.stage == "evaluate"
    assert result.outputs == {"json": tmp_path / "e.json", "csv": tmp_path / "e.csv"}
    assert json.loads((tmp_path / "e.json").read_text()) == json.loads(json.dumps(result.summary))
    p2 = sum(".60457274_" in n for n in world["names"])
    one = [min(k, p2) for k in range(5, p2 + 5, 5)]  # chunks of 5 frames
    assert [s.done for s in steps] == one + [p2 + k for k in one]  # cumulative over methods
    assert {(s.stage, s.total, s.unit) for s in steps} == {("evaluate", 2 * p2, "frames")}


def test_box_iou_broadcasts_pairs_and_one_against_many():
    """The track choice compares box i with box i; the detector's choice many with one."""
    from jregfix.geometry.metrics import box_iou

    def iou(a, b):  # from areas, one pair at a time
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union

    rng = np.random.default_rng(4)
    lo = rng.uniform(0, 50, size=(2, 30, 2))
    a, b = (np.concatenate([x, x + rng.uniform(1, 40, size=(30, 2))], 1) for x in lo)
    np.testing.assert_allclose(box_iou(a, b), [iou(x, y) for x, y in zip(a, b, strict=True)])
    np.testing.assert_allclose(box_iou(a, b[0]), [iou(x, b[0]) for x in a])
    assert box_iou(a[:1], a[0] + [100, 100, 100, 100])[0] == 0.0
