"""`jregfix check`: what it reports about files written the way their tools write them, the
one-frame runs, and one-line problems for broken or hostile files (nothing executed)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import joblib
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from jregfix.cli import main
from jregfix.io.h36m import h36m_imgname, joints17_to_s24
from jregfix.io.smpl_write import write_npz
from tests.conftest import camera_facing_poses, planted_regressor, shared_fixture
from tests.test_smpl import numpy_lbs
from tests.test_tracks import demo_track, vibe_dump

VIDEO = ("S9", "Directions 1", "54138969")
IMAGE_NUMBERS = (1, 6, 11)  # SPIN's rows: every 5th frame, image numbers 1 mod 5
CENTER, SCALE = (50.0, 60.0), 0.5


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(smpl_like_model, smpl_pkl, tmp_path_factory):
    """GT rows of one video, its images, a regressor, and VIBE's per-video output whose meshes
    equal the GT meshes exactly on the GT rows' frames (and are scaled elsewhere)."""
    root = tmp_path_factory.mktemp("check")
    rng = np.random.default_rng(3)
    n = len(IMAGE_NUMBERS)
    aa = camera_facing_poses(rng, n, 0.3)
    rot = Rotation.from_rotvec(aa.reshape(-1, 3)).as_matrix().reshape(n, 24, 3, 3)
    verts = np.stack([numpy_lbs(smpl_like_model, rot[i], np.zeros(10)) for i in range(n)])
    j = planted_regressor(rng, 4)
    np.save(root / "J_h36m.npy", j)
    names = [h36m_imgname(*VIDEO, k) for k in IMAGE_NUMBERS]
    # as SPIN's h36m_extract saves it: np.savez of a list of str and float64 arrays; rows in
    # another order than the video's frames, so a row number is never a frame's position
    order = [2, 0, 1]
    np.savez(
        root / "h36m_valid.npz",
        imgname=[names[i] for i in order],
        center=np.tile(CENTER, (n, 1)),
        scale=np.full(n, SCALE),
        S=joints17_to_s24(np.einsum("kv,nvc->nkc", j, verts[order])),
    )
    (root / "h36m" / "images").mkdir(parents=True)
    for name in names:
        noise = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
        Image.fromarray(noise).resize((100, 120)).save(root / "h36m" / name, quality=90)
    frames = list(range(13))
    track_verts = np.stack(
        [
            verts[IMAGE_NUMBERS.index(f)] if f in IMAGE_NUMBERS else 1.2 * verts[min(f // 5, n - 1)]
            for f in frames
        ]
    )
    boxes = np.tile([*CENTER, 100.0, 100.0], (len(frames), 1))
    vibe_dump(
        {1: demo_track(track_verts, frames, boxes, rng)},
        root / "vibe" / VIDEO[0] / f"{VIDEO[1]}.{VIDEO[2]}",
    )
    # SPIN's own output for the same frames: exact poses, meshes made by the SMPL model
    np.savez(root / "spin.npz", pose=aa.reshape(n, 72), betas=np.zeros((n, 10)), imgname=names)
    write_npz(root / "SMPL_NEUTRAL.npz", smpl_like_model)
    return root


def run(args, capsys, monkeypatch, json_path=None):
    monkeypatch.setenv("COLUMNS", "200")
    code = main(["check", *map(str, args)] + (["--json", str(json_path)] if json_path else []))
    captured = capsys.readouterr()
    doc = json.loads(json_path.read_text()) if json_path and json_path.exists() else None
    return code, captured, doc


def by_role(doc, role):
    return next(f for f in doc["files"] if f["role"] == role)


def test_good_files_are_described_and_pass(files, smpl_pkl, tmp_path, capsys, monkeypatch):
    r = files
    before = sorted((p, p.stat().st_mtime_ns) for p in r.rglob("*"))
    code, out, doc = run(
        [
            "--smpl",
            smpl_pkl,
            "--smpl",
            r / "SMPL_NEUTRAL.npz",
            "--h36m",
            r / "h36m_valid.npz",
            "--images",
            r / "h36m",
            "--regressor",
            f"h36m={r / 'J_h36m.npy'}",
            "--predictions",
            r / "vibe",
            "--predictions",
            f"spin={r / 'spin.npz'}",
        ],
        capsys,
        monkeypatch,
        tmp_path / "check.json",
    )
    assert code == 0, out.err
    assert doc["ok"] and doc["problems"] == []
    assert sorted((p, p.stat().st_mtime_ns) for p in r.rglob("*")) == before  # wrote nothing

    pkl = doc["files"][0]
    assert pkl["format"] == "SMPL chumpy pickle (Python 2, protocol 2)"
    assert pkl["sha256"] == sha(smpl_pkl)
    assert pkl["shapes"]["v_template"] == [6890, 3]
    assert pkl["shapes"]["shapedirs"] == [6890, 3, 10]
    assert pkl["shapes"]["J_regressor"] == [24, 6890]
    npz = doc["files"][1]
    assert npz["format"] == "smplx npz" and npz["sha256"] == sha(r / "SMPL_NEUTRAL.npz")
    gt = by_role(doc, "gt")
    assert gt["format"].startswith("SPIN H36M npz, 3 rows: S9")
    assert gt["shapes"]["S"] == [3, 24, 4] and gt["sha256"] == sha(r / "h36m_valid.npz")
    images = by_role(doc, "images")
    assert "3/3 images" in images["format"] and images["sha256"] is None
    reg = by_role(doc, "regressor h36m")
    assert reg["format"] == "npy float64 C order" and reg["shapes"]["J"] == [17, 6890]
    assert reg["sha256"] == sha(r / "J_h36m.npy") and reg["official"] is None
    assert reg["notes"] == []  # non-negative rows summing to 1: nothing to flag
    pred = by_role(doc, "predictions vibe")
    assert "VIBE output, 1 per-video files, 1 track(s)" in pred["format"]
    assert "3/3 GT rows covered" in pred["format"]
    assert pred["shapes"]["verts"] == [13, 6890, 3] and pred["shapes"]["frame_ids"] == [13]

    stages = {(s["stage"], s["inputs"][0]): s for s in doc["stages"]}
    assert all(s["status"] == "ok" for s in doc["stages"])
    assert (
        "224x224 crop, side 100 px" in stages[("image → crop", str(r / "h36m_valid.npz"))]["detail"]
    )
    for smpl in (smpl_pkl, r / "SMPL_NEUTRAL.npz"):
        assert "-> 17 joints, all on the body" in stages[("LBS → joints", str(smpl))]["detail"]
    # video frame 1 is image number 1 (SPIN's numbering): the exact mesh, so zero error
    score = stages[("score one frame", str(r / "vibe"))]["detail"]
    assert score == f"{h36m_imgname(*VIDEO, 1)}: MPJPE / PA-MPJPE (17 joints) h36m 0.0 / 0.0 mm"
    spin = stages[("score one frame", str(r / "spin.npz"))]["detail"]  # LBS by the SMPL file
    assert spin == f"{h36m_imgname(*VIDEO, 1)}: MPJPE / PA-MPJPE (17 joints) h36m 0.0 / 0.0 mm"
    assert by_role(doc, "predictions spin")["shapes"] == {"pose": [3, 72], "betas": [3, 10]}
    assert pkl["sha256"][:12] in out.out and "all usable" in out.err


@pytest.mark.parametrize("variant", ["released-protocol-1", "clean_ch"])
def test_smpl_pickle_variants(variant, smpl_like_model, tmp_path, capsys, monkeypatch):
    from jregfix.io.smpl_write import write_cleaned_pickle, write_released_style_pickle

    path = tmp_path / "basicmodel_m_lbs_10_207_0_v1.1.0.pkl"
    if variant == "clean_ch":
        write_cleaned_pickle(path, smpl_like_model, gender="male")
        expected = "SMPL pickle without chumpy (Python 2, protocol 0/1)"
    else:
        write_released_style_pickle(path, smpl_like_model, gender="male", protocol=1)
        expected = "SMPL chumpy pickle (Python 2, protocol 0/1)"
    code, out, doc = run(["--smpl", path], capsys, monkeypatch, tmp_path / "c.json")
    assert code == 0, out.err
    assert doc["files"][0]["format"] == expected
    assert doc["stages"][0]["status"] == "ok"  # LBS with the model's own 24-joint regressor
    assert doc["stages"][0]["detail"].endswith("-> 24 joints, all on the body")


def test_spin_training_npz(tmp_path, capsys, monkeypatch):
    """h36m_train.py's layout: training subjects, 2D joints (part) and OpenPose keypoints."""
    rng = np.random.default_rng(1)
    names = [h36m_imgname(s, "Walking 1", "55011271", k) for s in ("S1", "S8") for k in (1, 6)]
    np.savez(
        tmp_path / "h36m_train.npz",
        imgname=names,
        center=rng.uniform(400, 600, (4, 2)),
        scale=rng.uniform(3, 5, 4),
        part=rng.uniform(0, 1000, (4, 24, 3)),
        S=rng.normal(size=(4, 24, 4)),
        openpose=rng.uniform(0, 1000, (4, 25, 3)),
    )
    code, out, doc = run(
        ["--gt", tmp_path / "h36m_train.npz"], capsys, monkeypatch, tmp_path / "c.json"
    )
    assert code == 0, out.err
    gt = doc["files"][0]
    assert gt["format"] == "SPIN H36M npz, 4 rows: S1,S8, 1 camera(s)"
    assert gt["shapes"] == {
        "imgname": [4],
        "center": [4, 2],
        "scale": [4],
        "S": [4, 24, 4],
        "part": [4, 24, 3],
        "openpose": [4, 25, 3],
    }
    assert gt["notes"] == []  # image numbers 1 and 6 follow SPIN's every-5th-frame rule


def test_known_official_files(tmp_path, capsys, monkeypatch):
    hedlin = shared_fixture("retrained_J_Regressor.pt")
    means = shared_fixture("smpl_mean_params.npz")
    code, out, doc = run(
        ["--regressor", hedlin, "--mean-params", means], capsys, monkeypatch, tmp_path / "c.json"
    )
    assert code == 0, out.err
    reg, mean = doc["files"][1], doc["files"][0]
    assert reg["sha256"] == sha(hedlin) and reg["official"].startswith("Hedlin et al.")
    assert reg["format"].startswith("torch zip tensor") and "CUDA storages" in reg["format"]
    assert "negative weight(s)" in reg["notes"][0]  # flagged, yet usable
    assert mean["official"] == "SPIN data/smpl_mean_params.npz"
    assert mean["shapes"] == {"pose": [144], "shape": [10], "cam": [3]}


def test_flagged_regressor_is_usable_but_noted(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    raw = planted_regressor(rng, 5) * 1.5
    raw[0, :3] = -0.05
    np.save(tmp_path / "raw.npy", np.asfortranarray(raw))
    code, out, doc = run(
        ["--regressor", tmp_path / "raw.npy"], capsys, monkeypatch, tmp_path / "c.json"
    )
    assert code == 0
    reg = doc["files"][0]
    assert reg["format"] == "npy float64 Fortran order"
    assert "3 negative weight(s)" in reg["notes"][0] and "--effective" in reg["notes"][0]
    assert f"note: {tmp_path / 'raw.npy'}: 3 negative" in out.err


def _one_problem(out, path) -> str:
    problems = [line for line in out.err.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1, out.err
    assert str(path) in problems[0] and "Traceback" not in out.err
    return problems[0]


@pytest.mark.parametrize(
    "case", ["smpl-truncated", "gt-truncated", "regressor-shape", "images-missing"]
)
def test_bad_files_give_one_line_naming_the_file(
    case, files, smpl_pkl, tmp_path, capsys, monkeypatch
):
    if case == "smpl-truncated":
        bad = tmp_path / "SMPL_FEMALE.pkl"
        bad.write_bytes(smpl_pkl.read_bytes()[:100_000])
        args = ["--smpl", bad]
    elif case == "gt-truncated":
        bad = tmp_path / "h36m_valid_protocol1.npz"
        raw = (files / "h36m_valid.npz").read_bytes()
        bad.write_bytes(raw[: len(raw) // 2])
        args = ["--gt", bad]
    elif case == "regressor-shape":
        bad = tmp_path / "J_small.npy"
        np.save(bad, np.full((17, 100), 0.01))
        args = ["--regressor", f"small={bad}"]
    else:
        bad = tmp_path / "h36m"
        bad.mkdir()
        args = ["--gt", files / "h36m_valid.npz", "--images", bad]
    code, out, doc = run(args, capsys, monkeypatch, tmp_path / "c.json")
    assert code == 1
    line = _one_problem(out, bad)
    assert doc["problems"] == [line.removeprefix("problem: ")]
    if case == "regressor-shape":
        assert "(17, 6890)" in line
    if case == "images-missing":
        assert "3 of 3 images" in line and "--skip-missing" in line


def test_corrupt_download_of_torchvision_weights(tmp_path, capsys, monkeypatch):
    # torchvision names its files after the first hex digits of their sha256
    bad = tmp_path / "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth"
    bad.write_bytes(b"PK\x03\x04 cut short")
    code, out, doc = run(["--weights", bad], capsys, monkeypatch)
    assert code == 1
    problems = [line for line in out.err.splitlines() if line.startswith("problem: ")]
    assert problems[0] == (
        f"problem: {bad}: sha256 {sha(bad)[:12]}… does not start with "
        "bf2d0c1e as its file name says: a corrupt or partial download; "
        "fetch it again"
    )
    assert all(str(bad) in p for p in problems)


class Evil:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "role", ["smpl", "checkpoint-legacy", "checkpoint-zip", "predictions", "regressor"]
)
def test_hostile_pickles_execute_nothing(role, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    evil = Evil()
    evil.marker = marker
    if role == "smpl":
        path = tmp_path / "SMPL_NEUTRAL.pkl"
        path.write_bytes(pickle.dumps({"v_template": evil}, protocol=2))
        args = ["--smpl", path]
    elif role.startswith("checkpoint"):
        path = tmp_path / "model_checkpoint.pt"
        torch.save(
            {"model": {"conv1.weight": torch.zeros(1)}, "evil": evil},
            path,
            _use_new_zipfile_serialization=role.endswith("zip"),
        )
        args = ["--checkpoint", path]
    elif role == "predictions":
        folder = tmp_path / "vibe" / "S9" / "Directions 1.54138969"
        folder.mkdir(parents=True)
        path = folder / "vibe_output.pkl"
        joblib.dump({1: {"frame_ids": np.arange(3), "pose": evil}}, path)
        args = ["--predictions", path]
    else:
        path = tmp_path / "J.pt"
        torch.save(evil, path)
        args = ["--regressor", path]
    code, out, _ = run(args, capsys, monkeypatch)
    assert code == 1
    _one_problem(out, path)
    assert not marker.exists()


def test_json_may_not_overwrite_an_input(files, capsys, monkeypatch):
    target = files / "J_h36m.npy"
    before = target.read_bytes()
    code, out, _ = run(["--regressor", target, "--json", target], capsys, monkeypatch)
    assert code == 1
    assert out.err.strip().splitlines()[-1].startswith(f"error: --json {target} is one of")
    assert target.read_bytes() == before


def test_nothing_to_check(capsys, monkeypatch):
    code, out, _ = run([], capsys, monkeypatch)
    assert code == 1 and "nothing to check" in out.err


@pytest.mark.slow
def test_spin_checkpoint_runs_one_crop_through_hmr(files, tmp_path, capsys, monkeypatch):
    from jregfix.geometry.crop import crop_image
    from jregfix.io.images import read_image
    from jregfix.models.hmr import build_hmr, normalize_images
    from tests.legacy_torch import save_legacy_cuda, spin_trainer_checkpoint
    from tests.test_hmr import random_hmr_state, write_mean_params

    state = random_hmr_state(4)
    for key in ("init_pose", "init_shape", "init_cam"):
        del state[key]
    ckpt = tmp_path / "model_checkpoint.pt"
    save_legacy_cuda(spin_trainer_checkpoint(state), ckpt)
    means = tmp_path / "smpl_mean_params.npz"
    write_mean_params(means)
    code, out, doc = run(
        [
            "--checkpoint",
            ckpt,
            "--mean-params",
            means,
            "--gt",
            files / "h36m_valid.npz",
            "--images",
            files / "h36m",
        ],
        capsys,
        monkeypatch,
        tmp_path / "c.json",
    )
    assert code == 0, out.err
    found = by_role(doc, "checkpoint")
    assert found["sha256"] == sha(ckpt)
    assert found["format"].startswith(
        "legacy torch checkpoint (Python 2, protocol 2, CUDA storages, "
    )
    # one INT per parameter id in the optimizer's state and one in its param group
    assert "CUDA storages, 338 64-bit INT opcodes)" in found["format"]
    assert "state_dict of 328 tensors" in found["format"]
    assert found["shapes"]["fc1.weight"] == [1024, 2205]
    mean = by_role(doc, "mean-params")
    assert mean["official"] is None and mean["sha256"] == sha(means)

    model, _ = build_hmr(ckpt, means)
    gt = np.load(files / "h36m_valid.npz")
    crop = crop_image(
        read_image(files / "h36m" / str(gt["imgname"][0])), gt["center"][0], gt["scale"][0]
    )
    with torch.no_grad():
        s = float(model(normalize_images(torch.tensor(crop[None]))).camera[0, 0])
    hmr = next(st for st in doc["stages"] if st["stage"] == "crop → HMR")
    assert hmr["status"] == "ok" and f"camera s {s:.3f}" in hmr["detail"]
    assert "init_cam" in hmr["detail"]  # filled from the mean parameters


@pytest.mark.slow
def test_maskrcnn_release_runs_on_one_image(files, tmp_path, capsys, monkeypatch):
    from tests.test_maskrcnn_weights import release_state

    legacy, _ = release_state()
    path = tmp_path / "maskrcnn_coco.pth"
    torch.save(legacy, path, _use_new_zipfile_serialization=False)
    code, out, doc = run(
        ["--weights", path, "--gt", files / "h36m_valid.npz", "--images", files / "h36m"],
        capsys,
        monkeypatch,
        tmp_path / "c.json",
    )
    assert code == 0, out.err
    found = by_role(doc, "weights")
    assert found["format"].startswith("legacy torch state_dict (Python 3, protocol 2)")
    assert "307 tensors laid out as the v1 release" in found["format"]
    assert found["sha256"] == sha(path) and found["official"] is None
    stage = next(st for st in doc["stages"] if st["stage"] == "Mask R-CNN")
    assert stage["status"] == "ok"
    assert stage["detail"].startswith(str(files / "h36m" / h36m_imgname(*VIDEO, 11)))
    path.unlink()


def test_library_call_returns_a_stage_result_and_reports_steps(files, tmp_path):
    """run_check: one Step per file read or stage run, and the --json document as summary."""
    from jregfix.stages.check import CheckInputs, run_check

    steps = []
    inputs = CheckInputs(
        gt=[files / "h36m_valid.npz"],
        images=files / "h36m",
        regressors=[("h36m", files / "J_h36m.npy")],
    )
    result = run_check(inputs, device="cpu", json_out=tmp_path / "c.json", progress=steps.append)
    assert result.stage == "check" and not result.skipped
    assert result.outputs == {"json": tmp_path / "c.json"}
    assert result.summary == json.loads((tmp_path / "c.json").read_text())
    assert result.summary["ok"] and [f["role"] for f in result.summary["files"]] == [
        "gt",
        "images",
        "regressor h36m",
    ]
    assert [s.done for s in steps] == list(range(1, len(steps) + 1))
    assert {(s.stage, s.unit, s.total) for s in steps} == {("check", "steps", None)}
    assert [s.message for s in steps] == [
        f"reading {files / 'h36m_valid.npz'}",
        f"reading {files / 'h36m'}",
        f"reading {files / 'J_h36m.npy'}",
        "reading one frame",
    ]
