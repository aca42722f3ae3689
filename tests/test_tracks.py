"""VIBE / MEVA outputs laid out and written the way their demos write them, scored on the right
GT rows.

What the demos write (mkocabas/VIBE demo.py, ZhengyiLuo/MEVA scripts/run_meva_on_video.py, read
for these fixtures): one ``joblib.dump`` per video into ``<output_folder>/<video name without
.mp4>/vibe_output.pkl`` (``meva_output.pkl``) of ``{person_id: track}``; person ids are the
SORT tracker's ints (from 1), ``frame_ids`` the tracker's ``np.array`` of Python ints (int64),
``bboxes`` its float64 (cx, cy, w, h) squares, the network outputs float32 from
``tensor.cpu().numpy()``, ``orig_cam`` float64, ``joints2d`` None with box tracking. VIBE pins
joblib 0.14.1 on Python 3.7: pickle protocol 3 and no alignment padding before the array bytes
(joblib <= 1.1); MEVA pins no joblib, so its files are written here by today's joblib.
"""

import json
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import joblib
import numpy as np
import pytest
from joblib import numpy_pickle

from jregfix.cli import main
from jregfix.errors import JregfixError
from jregfix.io.h36m import joints17_to_s24, save_h36m
from jregfix.io.tracks import VideoKey, load_tracks, video_key
from jregfix.stages.evaluate import evaluate
from tests.conftest import planted_regressor
from tests.test_metrics import reference_pa

H36M_TO_J14 = [6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10]
V = 6890
FRAMES = 40  # video frames 0..39 at 50 fps
SUBJECTS = ("S9", "S11")
ACTIONS = ("Directions 1", "Sitting Down 2")
CAMERAS = ("54138969", "60457274")


@contextmanager
def joblib_0_14():
    """joblib.dump as joblib <= 1.1 wrote it: wrappers without alignment, no padding bytes."""
    original = numpy_pickle.NumpyPickler._create_array_wrapper

    def old_wrapper(self, array):
        wrapper = original(self, array)
        del wrapper.numpy_array_alignment_bytes
        return wrapper

    with mock.patch.object(numpy_pickle.NumpyPickler, "_create_array_wrapper", old_wrapper):
        yield


def vibe_dump(results: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "vibe_output.pkl"
    with joblib_0_14():
        joblib.dump(results, path, protocol=3)
    return path


def demo_track(
    verts: np.ndarray, frames: list[int], boxes: np.ndarray, rng, meva: bool = False
) -> dict:
    """One person's entry of ``vibe_results`` with the demo's keys, order and dtypes."""
    n = len(frames)
    pred_cam = rng.normal(size=(n, 3)).astype(np.float32)
    h = boxes[:, 2]
    orig_cam = np.stack(
        [pred_cam[:, 0] / (1000 / h), pred_cam[:, 0] / (1002 / h), pred_cam[:, 1], pred_cam[:, 2]]
    ).T  # float64, as VIBE's helper returns
    track = {
        "pred_cam": pred_cam,
        "orig_cam": orig_cam,
        "verts": verts.astype(np.float32),
        "pose": rng.normal(size=(n, 72)).astype(np.float32),
        "betas": rng.normal(size=(n, 10)).astype(np.float32),
        "joints3d": rng.normal(size=(n, 49, 3)).astype(np.float32),
        "joints2d": None,
    }
    if not meva:
        track["joints2d_img_coord"] = rng.normal(size=(n, 49, 2)).astype(np.float32)
    track["bboxes"] = boxes.astype(np.float64)
    track["frame_ids"] = np.array(list(frames))
    return track


def square(cx, cy, side, n):
    return np.tile([cx, cy, side, side], (n, 1)).astype(np.float64)


@pytest.fixture(scope="module")
def h36m(tmp_path_factory):
    """GT rows for 2 subjects x 2 actions x 2 cameras, SPIN's numbering, shuffled row order;
    per video the subject's predicted meshes for every video frame."""
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("tracks")
    base = rng.normal(size=(V, 3)) * 0.3
    j_reg = planted_regressor(rng, 4)
    np.save(root / "J.npy", j_reg)
    names, centers, gt17, video_of_row = [], [], [], []
    subject_verts = {}
    for s in SUBJECTS:
        for a in ACTIONS:
            for c in CAMERAS:
                subject_verts[(s, a, c)] = base + rng.normal(size=(FRAMES, V, 3)) * 0.02
                # SPIN: loop index i over mocap frames, image number k = i + 1, rows i % 5 == 0
                for k in range(1, FRAMES, 5):
                    names.append(f"images/{s}_{a.replace(' ', '_')}.{c}_{k:06d}.jpg")
                    centers.append([480 + 10 * len(names) % 40, 500])
                    gt17.append(rng.normal(size=(17, 3)) * 0.3)
                    video_of_row.append((s, a, c, k))
    order = rng.permutation(len(names))
    names = [names[i] for i in order]
    centers = np.array(centers, float)[order]
    gt17 = np.array(gt17)[order]
    video_of_row = [video_of_row[i] for i in order]
    save_h36m(root / "gt.npz", names, centers, np.full(len(names), 2.0), joints17_to_s24(gt17))
    return dict(
        root=root,
        j=j_reg,
        gt17=gt17,
        centers=centers,
        video_of_row=video_of_row,
        subject_verts=subject_verts,
        rng=rng,
    )


def expected(h36m, covered) -> tuple[float, float, int]:
    """MPJPE / PA-MPJPE (mm, 14 joints) over GT rows whose video frame ``covered`` lists;
    GT row of image k <- the subject's mesh at video frame k (written out from the protocol)."""
    errs, pas = [], []
    for row, (s, a, c, k) in enumerate(h36m["video_of_row"]):
        if (s, a, c, k) not in covered:
            continue
        pred = h36m["j"] @ h36m["subject_verts"][(s, a, c)][k].astype(np.float32)
        pred = (pred - pred[0])[H36M_TO_J14]
        gt = (h36m["gt17"][row] - h36m["gt17"][row, 0])[H36M_TO_J14]
        errs.append(np.linalg.norm(pred - gt, axis=-1).mean())
        pas.append(reference_pa(pred, gt))
    return 1000 * np.mean(errs), 1000 * np.mean(pas), len(errs)


def write_vibe_folders(h36m, out: Path) -> set:
    """Four per-video folders (2 videos x 2 cameras). In each: a distractor listed first whose
    box half-overlaps the subject, the subject split over two tracks, and in one video the
    subject lost for frames 30..39 while only a far-away person is tracked there.
    Returns the (subject, action, camera, frame) the subject is tracked in."""
    rng = np.random.default_rng(5)
    covered = set()
    for s, a in (("S9", "Directions 1"), ("S11", "Sitting Down 2")):
        for c in CAMERAS:
            verts = h36m["subject_verts"][(s, a, c)]
            lost = s == "S11" and c == CAMERAS[1]
            part1, part2 = list(range(25)), list(range(25, 30 if lost else FRAMES))
            other = list(range(3, 30 if lost else 38))  # else it would win k = 31, 36
            results = {
                # SORT ids; the distractor comes first so "first track wins" would pick it
                2: demo_track(
                    rng.normal(size=(len(other), V, 3)),
                    other,
                    square(700, 500, 444, len(other)),
                    rng,
                ),
                5: demo_track(verts[part1], part1, square(500, 500, 444, len(part1)), rng),
                7: demo_track(verts[part2], part2, square(500, 505, 444, len(part2)), rng),
            }
            if lost:
                far = list(range(30, FRAMES))
                results[9] = demo_track(
                    rng.normal(size=(len(far), V, 3)), far, square(1500, 500, 300, len(far)), rng
                )
            vibe_dump(results, out / s / f"{a}.{c}")
            covered |= {(s, a, c, f) for f in part1 + part2}
    return covered


def test_vibe_folders_score_exactly_the_right_rows(h36m, tmp_path):
    root = h36m["root"]
    covered = write_vibe_folders(h36m, tmp_path / "vibe")
    raw = (tmp_path / "vibe" / "S9" / "Directions 1.54138969" / "vibe_output.pkl").read_bytes()
    assert raw[:2] == b"\x80\x03" and b"numpy_array_alignment_bytes" not in raw  # joblib 0.14
    doc = evaluate(
        [("vibe", tmp_path / "vibe")], root / "gt.npz", {"J": root / "J.npy"}, allow_missing=True
    ).summary
    e, pa, n = expected(h36m, covered)
    res = doc["results"][0]
    assert res["frames"] == n == 4 * 8 - 2  # rows k = 31, 36 of the lost video are not scored
    assert res["mpjpe_mm"] == pytest.approx(e, rel=1e-6)
    assert res["pa_mpjpe_mm"] == pytest.approx(pa, rel=1e-6)
    info = doc["protocol"]["methods"]["vibe"]
    assert info["frames_missing"] == 64 - n
    m = info["mapping"]
    assert m["videos"] == 4 and m["tracks"] == 13 and m["videos_without_gt_rows"] == []
    assert m["rows_with_several_tracks"] == 3 * 7 + 5  # distractor covers k = 6..36 (..26)
    assert m["rows_only_off_target"] == 2
    assert len(m["files"]) == 4 and all(len(d) == 64 for d in m["files"].values())
    assert "frame f -> GT image number f" in doc["protocol"]["track_frames"]


def test_missing_rows_are_an_error_without_allow_missing(h36m, tmp_path):
    root = h36m["root"]
    write_vibe_folders(h36m, tmp_path / "vibe")
    with pytest.raises(JregfixError, match=r"34 of 64 protocol frames .*--allow-missing"):
        evaluate([("vibe", tmp_path / "vibe")], root / "gt.npz", {"J": root / "J.npy"})


def test_meva_nested_layout_and_empty_output(h36m, tmp_path):
    """MEVA: today's joblib, no joints2d_img_coord; a video whose tracks were all < 90 frames
    leaves MEVA writing ``{}``. Its rows count as missing."""
    root = h36m["root"]
    rng = np.random.default_rng(8)
    out = tmp_path / "meva"
    frames = list(range(FRAMES))
    covered = set()
    for c in CAMERAS:
        verts = h36m["subject_verts"][("S9", "Directions 1", c)]
        folder = out / "S9" / f"Directions 1.{c}"
        folder.mkdir(parents=True)
        joblib.dump(
            {1: demo_track(verts, frames, square(500, 500, 444, FRAMES), rng, meva=True)},
            folder / "meva_output.pkl",
        )
        covered |= {("S9", "Directions 1", c, f) for f in frames}
    empty = out / "S9" / "Sitting Down 2.54138969" / "meva_output.pkl"
    empty.parent.mkdir()
    joblib.dump({}, empty)
    elsewhere = out / "S9" / "Walking 1.54138969"  # a video the GT file does not hold
    elsewhere.mkdir()
    joblib.dump(
        {1: demo_track(verts, frames, square(500, 500, 444, FRAMES), rng, meva=True)},
        elsewhere / "meva_output.pkl",
    )
    doc = evaluate(
        [("meva", out)], root / "gt.npz", {"J": root / "J.npy"}, allow_missing=True
    ).summary
    e, pa, n = expected(h36m, covered)
    assert doc["results"][0]["frames"] == n == 16
    assert doc["results"][0]["mpjpe_mm"] == pytest.approx(e, rel=1e-6)
    assert doc["results"][0]["pa_mpjpe_mm"] == pytest.approx(pa, rel=1e-6)
    m = doc["protocol"]["methods"]["meva"]["mapping"]
    assert m["videos"] == 4 and m["videos_without_gt_rows"] == ["S9/Walking 1.54138969"]
    assert m["files_without_tracks"] == [str(empty)]
    assert doc["protocol"]["methods"]["meva"]["frames_missing"] == 64 - 16


def test_cli_takes_a_folder_and_a_subject(h36m, tmp_path, capsys):
    """Folders straight under the output folder (no S9/ above): the subject comes from
    --subject; the JSON records the mapping."""
    root = h36m["root"]
    rng = np.random.default_rng(9)
    verts = h36m["subject_verts"][("S9", "Sitting Down 2", CAMERAS[0])]
    frames = list(range(FRAMES))
    vibe_dump(
        {1: demo_track(verts, frames, square(500, 500, 444, FRAMES), rng)},
        tmp_path / "out" / f"Sitting Down 2.{CAMERAS[0]}",
    )
    args = [
        "evaluate",
        "--method",
        "vibe",
        "--predictions",
        str(tmp_path / "out"),
        "--gt",
        str(root / "gt.npz"),
        "--regressor",
        f"J={root / 'J.npy'}",
        "--allow-missing",
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert main(args) == 1
    assert "--subject" in capsys.readouterr().err
    assert main(args + ["--subject", "S9"]) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    e, _, n = expected(h36m, {("S9", "Sitting Down 2", CAMERAS[0], f) for f in frames})
    assert doc["results"][0]["frames"] == n == 8
    assert doc["results"][0]["mpjpe_mm"] == pytest.approx(e, rel=1e-6)


def test_video_key_from_path():
    assert video_key("out/S9/Directions 1.54138969/vibe_output.pkl") == VideoKey(
        "S9", "Directions 1", "54138969"
    )
    assert video_key("x/S11/vibe/Directions.60457274/vibe_output.pkl") == VideoKey(
        "S11", "Directions", "60457274"
    )
    assert video_key("o/S9_Walking 1.55011271/v.pkl").subject == "S9"
    assert video_key("o/Walking 1.55011271/v.pkl", subject="S11").subject == "S11"
    assert (
        VideoKey("S9", "Sitting Down 2", "58860488").imgname(6)
        == "images/S9_Sitting_Down_2.58860488_000006.jpg"
    )
    for path, kw, match in (
        ("o/Walking 1.55011271/v.pkl", {}, "--subject"),
        ("o/S9/Walking 1.55011271/v.pkl", {"subject": "S11"}, "S9"),
        ("o/S9/results/v.pkl", {}, "not a Human3.6M video"),
    ):
        with pytest.raises(JregfixError, match=match):
            video_key(path, **kw)


def test_bad_tracks_are_refused(h36m, tmp_path):
    root = h36m["root"]
    rng = np.random.default_rng(4)
    verts = h36m["subject_verts"][("S9", "Directions 1", CAMERAS[0])][:10]
    track = demo_track(verts, list(range(10)), square(500, 500, 444, 10), rng)
    folder = tmp_path / "S9" / f"Directions 1.{CAMERAS[0]}"
    cases = {
        "float64": ("frame_ids", track["frame_ids"].astype(np.float64)),
        "appears twice": ("frame_ids", np.r_[0, np.arange(9)]),
        "bboxes": ("bboxes", track["bboxes"][:, :3]),
    }
    for match, (key, value) in cases.items():
        vibe_dump({1: {**track, key: value}}, folder)
        with pytest.raises(JregfixError, match=match):
            evaluate(
                [("vibe", tmp_path)], root / "gt.npz", {"J": root / "J.npy"}, allow_missing=True
            )
    vibe_dump({1: track}, folder)
    copy = tmp_path / "copy" / "S9" / f"Directions 1.{CAMERAS[0]}"
    vibe_dump({1: track}, copy)
    with pytest.raises(JregfixError, match="second output for video"):
        evaluate([("vibe", tmp_path)], root / "gt.npz", {"J": root / "J.npy"}, allow_missing=True)
    with pytest.raises(JregfixError, match="meva_output.pkl.*is --method right"):
        evaluate([("meva", tmp_path)], root / "gt.npz", {"J": root / "J.npy"})


def test_hostile_pickles_execute_nothing(h36m, tmp_path):
    root = h36m["root"]
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "S9" / f"Directions 1.{CAMERAS[0]}"
    folder.mkdir(parents=True)
    track = {"frame_ids": np.arange(3), "verts": np.zeros((3, V, 3), np.float32)}
    for payload in (pickle.dumps({1: Evil()}, protocol=2), None):
        path = folder / "vibe_output.pkl"
        if payload is None:  # inside a real joblib stream, next to the array wrappers
            joblib.dump({1: {**track, "joints2d": Evil()}}, path)
        else:
            path.write_bytes(payload)
        with pytest.raises(JregfixError, match="not allowed"):
            evaluate([("vibe", tmp_path)], root / "gt.npz", {"J": root / "J.npy"})
        with pytest.raises(JregfixError, match="not allowed"):
            load_tracks(path)
    assert not marker.exists()
