"""`evaluate`: MPJPE / PA-MPJPE of method outputs under several joint regressors (Table I).

Protocol (nkolot/SPIN eval.py): joints = J @ vertices; the prediction is centred
on regressor row 0 (pelvis); the ground truth is SPIN's pelvis-relative ``S``. With 14 joints
the prediction takes rows ``H36M_TO_J14`` and the GT ``J24_TO_J14``; with 17 joints (Hedlin et
al.) all 17 regressor rows against the GT in the same order, pelvis included. PA-MPJPE aligns
the prediction onto the GT by a similarity transform. Every choice is written to the output.
VIBE/MEVA demo outputs reach the GT rows through the video they came from
(:func:`_load_tracks_prediction`, docs/vibe-meva.md).

Differences between regressors come with paired 95 % bootstrap intervals over sequences
(:func:`sequence_labels`, :mod:`jregfix.geometry.intervals`), and every regressor carries the
subjects it was fitted on, as far as its provenance records them (:func:`training_provenance`):
one fitted on an evaluated subject is flagged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from jregfix.body.base import BodyModel, fit_betas, joint_regression
from jregfix.body.rotations import pose_to_rotmat
from jregfix.device import device_stage
from jregfix.errors import JregfixError
from jregfix.geometry.crop import square_box
from jregfix.geometry.intervals import paired_bootstrap
from jregfix.geometry.metrics import similarity_align
from jregfix.io.atomic import sha256_file, write_json
from jregfix.io.guard import refuse_overwriting_inputs
from jregfix.io.h36m import (
    H36M17_FROM_J24,
    H36M17_NAMES,
    H36M_TO_J14,
    J24_TO_J14,
    FrameKey,
    H36MData,
    load_h36m,
    protocol_mask,
)
from jregfix.io.lock import locks_output
from jregfix.io.manifest import manifest_path, read_sidecar
from jregfix.io.params import BodyParams, load_params, params_from_arrays
from jregfix.io.regressors import (
    HEDLIN_SHA256,
    KNOWN_REGRESSORS,
    effective_regressor,
    load_provenance,
    load_regressor,
    regressor_stats,
    regressor_warnings,
    validate_regressor,
)
from jregfix.io.tracks import read_tracks, track_files, video_key
from jregfix.stages.silhouettes import box_iou

METHODS = ("spin", "vibe", "meva", "npz")
FRAME_IDS = ("video", "rows")  # what VIBE/MEVA frame_ids count: video frames or GT rows
J14_NAMES = tuple(H36M17_NAMES[i] for i in H36M_TO_J14)


@dataclass
class Prediction:
    """A method's per-frame output aligned to GT rows: ``rows[i]`` is the GT row of frame i.
    ``mapping`` says how frames were matched to rows (written to the JSON)."""

    method: str
    path: str
    params: BodyParams
    rows: np.ndarray
    notes: list[str] = field(default_factory=list)
    mapping: dict = field(default_factory=dict)


def load_prediction(method: str, path: str | Path, gt: H36MData, frame_ids: str = "video",
                    subject: str | None = None, keep: np.ndarray | None = None) -> Prediction:
    """Read a method's output (a file, or for VIBE/MEVA a folder of per-video files) and align
    its frames with the GT rows; ``keep`` (N,) bool drops frames of other GT rows early."""
    if method not in METHODS:
        raise JregfixError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    path = Path(path)
    if method in ("vibe", "meva"):
        return _load_tracks_prediction(method, path, gt, frame_ids, subject, keep)
    gt_imgname = gt.imgname
    n_gt = len(gt_imgname)
    params = load_params(path, require_pose=False)
    if params.imgname is not None and len(params.imgname):
        index = {name: i for i, name in enumerate(gt_imgname)}
        missing = [x for x in params.imgname if x not in index]
        if missing:
            raise JregfixError(f"{path}: {len(missing)} imgname(s) are not in the GT file, "
                               f"e.g. {missing[0]!r}")
        rows = np.array([index[x] for x in params.imgname], dtype=np.int64)
        uniq, counts = np.unique(rows, return_counts=True)
        if (counts > 1).any():
            raise JregfixError(f"{path}: frame {gt_imgname[uniq[counts > 1][0]]!r} appears more "
                               "than once; each GT frame may be predicted once")
        by = "imgname"
    else:
        if len(params) != n_gt:
            raise JregfixError(f"{path}: {len(params)} frames but the GT file has {n_gt} rows "
                               "(and no 'imgname' to align by)")
        rows = np.arange(n_gt)
        by = "position"
    return Prediction(method, str(path), params, rows, [f"rows aligned to GT by {by}"],
                      {"by": by})


def _load_tracks_prediction(method: str, path: Path, gt: H36MData, frame_ids: str,
                            subject: str | None, keep: np.ndarray | None) -> Prediction:
    """VIBE/MEVA tracks -> one prediction per GT row.

    ``frame_ids="video"`` (what the demos write): a track of the file
    ``S9/Directions 1.54138969/vibe_output.pkl`` holds 0-based frames f of that 50 fps video.
    SPIN's Human3.6M preprocessing reads video frame 0 before its loop, so its image numbered k
    shows video frame k while the row's labels (S, box) come from frame k-1; rows exist for
    k = 1, 6, 11, ... (every 5th frame). Frame f is therefore scored against the row of image
    ``images/S9_Directions_1.54138969_{f:06d}.jpg``, which keeps SPIN's image/label pairing
    (and its one-frame label offset); frames without such a row are not scored.
    ``frame_ids="rows"``: ``frame_ids`` are row numbers of the GT file (files made for it).

    Where several tracks cover a row, the one whose box overlaps the GT box (the square of side
    200*scale around ``center``) most is used; tracks whose box misses it entirely are never
    used (another person). The choices are counted in ``mapping``.
    """
    if frame_ids not in FRAME_IDS:
        raise JregfixError(f"--frame-ids must be one of {', '.join(FRAME_IDS)}, got {frame_ids!r}")
    files = track_files(path, method)
    n_gt = len(gt)
    keep = np.ones(n_gt, bool) if keep is None else keep
    if frame_ids == "video":
        index = {(k.subject, k.action, k.camera, k.frame): i for i, k in enumerate(gt.keys)}
        gt_videos = {key[:3] for key in index}
    gt_boxes = square_box(gt.center, gt.scale)
    parts, rows, videos = [], [], {}
    stats = dict.fromkeys(("tracks", "track_frames", "frames_on_gt_rows",
                           "rows_with_several_tracks", "rows_only_off_target"), 0)
    no_rows, no_tracks = [], []
    digests = {}
    for file in files:
        tracks, digests[str(file)] = read_tracks(file)
        if frame_ids == "video":
            key = video_key(file, subject)
            if key in videos:
                raise JregfixError(f"{file}: a second output for video {key} (first: "
                                   f"{videos[key]}); keep one file per video")
            videos[key] = file
            action = key.action.replace(" ", "_")
            def to_rows(ids, key=key, action=action):
                return np.array([index.get((key.subject, action, key.camera, int(f)), -1)
                                 for f in ids], dtype=np.int64)
        else:
            def to_rows(ids, file=file):
                if len(ids) and (ids.min() < 0 or ids.max() >= n_gt):
                    raise JregfixError(f"{file}: frame_ids range {ids.min()}..{ids.max()} is "
                                       f"outside the {n_gt} GT rows (--frame-ids rows)")
                return ids
        candidates = []  # per track: (rows, local indices, IoU with the GT box)
        for tid, track in tracks.items():
            p = params_from_arrays(track, f"{file} track {tid}", require_pose=False)
            ids = _frame_ids(track, len(p), f"{file} track {tid}")
            boxes = _boxes(track, len(p), f"{file} track {tid}")
            r = to_rows(ids)
            local = np.flatnonzero((r >= 0) & keep[np.maximum(r, 0)])
            iou = (np.full(len(local), np.nan) if boxes is None else
                   _paired_iou(boxes[local], gt_boxes[r[local]]))
            candidates.append((p, r[local], local, iou, tid))
            stats["tracks"] += 1
            stats["track_frames"] += len(p)
            stats["frames_on_gt_rows"] += len(local)
        if frame_ids == "video" and (key.subject, action, key.camera) not in gt_videos:
            no_rows.append(str(key))
        if not tracks:
            no_tracks.append(str(file))
        chosen = _choose_tracks(candidates, file, stats)
        for (p, r, local, _iou, _tid), pick in zip(candidates, chosen, strict=True):
            if pick.any():
                parts.append(p.select(local[pick]))
                rows.append(r[pick])
    if not parts:
        raise JregfixError(f"{path}: no frame of its {stats['tracks']} track(s) maps to a GT row "
                           f"of {gt.path} ({_mapping_hint(frame_ids)})")
    rows = np.concatenate(rows)
    dup = np.unique(rows, return_counts=True)
    if (dup[1] > 1).any():  # only possible with --frame-ids rows across files
        raise JregfixError(f"{path}: GT row {dup[0][dup[1] > 1][0]} is predicted by two files; "
                           "keep one prediction per frame")
    mapping = {"frame_ids": frame_ids, **stats, "rows_covered": int(len(rows)),
               "files": digests}
    notes = [f"{len(files)} file(s), {stats['tracks']} track(s); {_mapping_hint(frame_ids)}",
             f"{stats['rows_with_several_tracks']} row(s) covered by several tracks: the track "
             "whose box overlaps the GT box most was used"]
    if stats["rows_only_off_target"]:
        notes.append(f"{stats['rows_only_off_target']} row(s) only covered by tracks whose box "
                     "misses the GT box (another person): not scored")
    mapping["files_without_tracks"] = no_tracks
    if no_tracks:
        notes.append(f"{len(no_tracks)} file(s) hold no track, e.g. {no_tracks[0]}")
    if frame_ids == "video":
        mapping["videos"] = len(videos)
        mapping["videos_without_gt_rows"] = no_rows
        if no_rows:
            notes.append(f"{len(no_rows)} video(s) have no row in the GT file, e.g. {no_rows[0]}")
    params = _concat_params(parts, str(path))
    if params.vertices is not None:
        notes.append("vertices taken from the file ('verts')")
    if method == "meva":
        notes.append("MEVA skips tracks shorter than 90 frames; 'pose' is axis-angle, so its "
                     "6D layout does not matter here")
    return Prediction(method, str(path), params, rows, notes, mapping)


def _mapping_hint(frame_ids: str) -> str:
    if frame_ids == "rows":
        return "frame_ids index GT rows"
    return ("frame_ids are 0-based video frames (50 fps); frame f -> GT image number f "
            "(SPIN's numbering)")


def _frame_ids(track: Mapping, n: int, label: str) -> np.ndarray:
    ids = np.asarray(track["frame_ids"])
    if ids.dtype.kind not in "iu":
        raise JregfixError(f"{label}: frame_ids have dtype {ids.dtype}; VIBE/MEVA write integer "
                           "frame indices, so this file was changed after the demo wrote it")
    ids = ids.reshape(-1).astype(np.int64)
    if len(ids) != n:
        raise JregfixError(f"{label}: {len(ids)} frame_ids for {n} frames")
    if len(np.unique(ids)) != n:
        raise JregfixError(f"{label}: a frame appears twice in one track's frame_ids")
    return ids


def _boxes(track: Mapping, n: int, label: str) -> np.ndarray | None:
    """(n,4) x0, y0, x1, y1 from the demo's (cx, cy, w, h), or None without 'bboxes'."""
    b = track.get("bboxes")
    if b is None:
        return None
    b = np.asarray(b, dtype=np.float64)
    if b.shape != (n, 4) or not np.isfinite(b).all():
        raise JregfixError(f"{label}: 'bboxes' must be ({n},4) finite (cx, cy, w, h), got "
                           f"shape {b.shape}")
    half = b[:, 2:] / 2
    return np.concatenate([b[:, :2] - half, b[:, :2] + half], 1)


def _paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a[i] with box b[i] (both (n,4) x0, y0, x1, y1)."""
    return np.array([box_iou(a[i:i + 1], b[i])[0] for i in range(len(a))])


def _choose_tracks(candidates: list, file: Path, stats: dict) -> list[np.ndarray]:
    """Per track, a mask over its candidate frames: for each GT row the best-overlapping track
    (ties: the earlier track in the file); tracks with zero overlap are dropped."""
    if not candidates:
        return []
    rows = np.concatenate([c[1] for c in candidates])
    iou = np.concatenate([c[3] for c in candidates])
    owner = np.concatenate([np.full(len(c[1]), i) for i, c in enumerate(candidates)])
    unique_rows, counts = np.unique(rows, return_counts=True)
    several = unique_rows[counts > 1]
    if len(several) and np.isnan(iou[np.isin(rows, several)]).any():
        raise JregfixError(f"{file}: several tracks cover GT row {several[0]} and not all have "
                           "'bboxes' to choose the subject by")
    usable = ~(iou <= 0)  # NaN (no boxes, single track) stays usable
    stats["rows_with_several_tracks"] += int(len(several))
    stats["rows_only_off_target"] += int(len(np.setdiff1d(unique_rows, rows[usable])))
    order = np.lexsort((owner, -np.nan_to_num(iou, nan=1.0), rows))
    order = order[usable[order]]
    first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]] if len(order) else order
    win = np.zeros(len(rows), bool)
    win[first] = True
    bounds = np.cumsum([0] + [len(c[1]) for c in candidates])
    return [win[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _concat_params(parts: Sequence[BodyParams], path: str) -> BodyParams:
    def cat(attr):
        arrays = [getattr(p, attr) for p in parts]
        if any(a is None for a in arrays):
            return None
        return np.concatenate(arrays)

    params = BodyParams(cat("pose"), cat("betas"), cat("camera"), None, cat("vertices"),
                        None, path)
    if params.vertices is None and params.pose is None:
        raise JregfixError(f"{path}: tracks carry neither 'pose'+'betas' nor 'verts'")
    return params


def resolve_regressors(specs: Mapping[str, str | Path], num_vertices: int) -> dict[str, dict]:
    """{name: path} -> {name: {"matrix": (17,V), "path", "sha256", "stats", "transform",
    "warnings"}}.

    The raw released Hedlin file (recognised by its sha256) is applied as the authors' code does,
    ReLU + row renormalisation; any other file is applied exactly as stored. A regressor with
    negative weights or rows not summing to 1 (e.g. the raw Hedlin parameter re-saved as .npy)
    is used as given but flagged in ``warnings``.
    """
    out = {}
    for name, path in specs.items():
        j = validate_regressor(load_regressor(path), num_vertices, f"regressor '{name}' ({path})",
                               num_joints=17)
        digest = sha256_file(path)
        transform = "as stored"
        if digest == HEDLIN_SHA256:
            j = effective_regressor(j)
            transform = "ReLU + rows renormalised (raw Hedlin file)"
        warnings = regressor_warnings(j)
        if warnings:
            warnings.append("used as given; `jregfix regressors convert IN OUT --effective` "
                            "writes the ReLU + row-normalised form")
        out[name] = {"matrix": j, "path": str(Path(path).resolve()), "sha256": digest,
                     "transform": transform, "warnings": warnings,
                     "training": training_provenance(path, digest),
                     "stats": regressor_stats(j, tol=1e-12)}
    return out


def training_provenance(path: str | Path, digest: str) -> dict:
    """{"subjects": [...] or None, "source": where that came from} of a regressor file.

    Looked up, first match wins: the released Hedlin file by its sha256 (registry entry);
    ``<file>.json`` written beside it (fit-regressor's report: ``leakage_guard.subjects``;
    other writers: ``subjects`` or ``config.subjects``; a registry download: its ``name``);
    ``<file>.manifest.json``. Nothing found: subjects None ("unknown"), never flagged.
    """
    if digest == HEDLIN_SHA256:
        return _registry_training("hedlin", "registry entry 'hedlin' (raw file, by sha256)")
    for doc_path, doc in ((f"{Path(path).name}.json", load_provenance(path)),
                          (manifest_path(path).name, read_sidecar(path))):
        if not isinstance(doc, dict):
            continue
        guard, config = (doc.get(k) if isinstance(doc.get(k), dict) else {}
                         for k in ("leakage_guard", "config"))
        for key, subjects in (("leakage_guard.subjects", guard.get("subjects")),
                              ("subjects", doc.get("subjects")),
                              ("config.subjects", config.get("subjects"))):
            if isinstance(subjects, dict | list | tuple) and subjects:
                return {"subjects": sorted(map(str, subjects)), "source": f"{doc_path}: {key}"}
        if isinstance(doc.get("name"), str) and doc["name"] in KNOWN_REGRESSORS:
            return _registry_training(doc["name"], f"{doc_path}: name '{doc['name']}' "
                                      "(registry entry)")
    return {"subjects": None, "source": f"no {Path(path).name}.json or manifest beside the "
            "file"}


def _registry_training(name: str, source: str) -> dict:
    known = KNOWN_REGRESSORS[name]
    subjects = sorted(known.training_subjects) if known.training_subjects else None
    return {"subjects": subjects, "source": source, "note": known.training_note}


def sequence_labels(keys: Sequence[FrameKey]) -> np.ndarray:
    """(N,) str: the video of each GT row, ``S9_Directions_1.54138969`` for image
    ``images/S9_Directions_1.54138969_000001.jpg`` (subject, action, camera; the bootstrap's
    unit). Every GT row has one: :func:`load_h36m` refuses image names not of that form, and
    the synthetic world of `jregfix demo` writes them the same way."""
    return np.array([f"{k.subject}_{k.action}.{k.camera}" for k in keys])


@locks_output("json_out")  # one writer per --json
@device_stage()  # 'auto' resolved; on CUDA IEEE fp32 matmuls (no TF32), deterministic kernels
def evaluate(
    predictions: Sequence[tuple[str, str | Path]],
    gt_path: str | Path,
    regressors: Mapping[str, str | Path],
    body: BodyModel | None = None,
    protocol: str = "p1",
    joints: int = 14,
    per_action: bool = False,
    allow_missing: bool = False,
    frame_ids: str = "video",
    subject: str | None = None,
    chunk_size: int = 256,
    device: str = "cpu",
    json_out: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    bootstrap: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    csv_out: str | Path | None = None,
    report_dir: str | Path | None = None,
) -> dict:
    """Score each (method, file) under each regressor; returns the JSON-able result document.

    ``frame_ids`` and ``subject`` apply to VIBE/MEVA outputs (see :func:`load_prediction`).
    Every pair of regressors gets the difference of MPJPE and PA-MPJPE with a ``level``
    bootstrap interval over sequences (``bootstrap`` resamples, ``seed``), in
    ``doc["differences"]``. ``csv_out`` and ``report_dir`` (``index.html``, figures embedded)
    are written from the same document (:mod:`jregfix.stages.report`).
    """
    if joints not in (14, 17):
        raise JregfixError(f"--joints must be 14 or 17, got {joints}")
    if not regressors:
        raise JregfixError("give at least one regressor (NAME=PATH)")
    methods = [m for m, _ in predictions]
    if len(set(methods)) != len(methods):
        raise JregfixError(f"each method may be given once (got {methods}); evaluate files of the "
                           "same method in separate calls")
    _refuse_overwriting_inputs([p for _, p in predictions] + [gt_path, *regressors.values()],
                               json_out, csv_out, report_dir)
    gt = load_h36m(gt_path)
    keep = protocol_mask(gt, protocol)
    num_vertices = body.num_vertices if body is not None else None
    preds = [load_prediction(m, p, gt, frame_ids, subject, keep) for m, p in predictions]
    if num_vertices is None:
        with_verts = [p for p in preds if p.params.vertices is not None]
        if len(with_verts) != len(preds):
            raise JregfixError("a body model (--smpl) is needed: some predictions have no vertices")
        num_vertices = with_verts[0].params.vertices.shape[1]
    regs = resolve_regressors(regressors, num_vertices)
    stacked = torch.from_numpy(np.concatenate([r["matrix"] for r in regs.values()])).to(device)
    # Joints straight from pose and shape, skinning only what the regressors read (exact).
    joints_of = (joint_regression(body, stacked, [len(r["matrix"]) for r in regs.values()])
                 if body is not None and any(p.params.vertices is None for p in preds) else None)
    per_action = per_action or report_dir is not None

    if joints == 14:
        pred_idx, gt_idx, names = list(H36M_TO_J14), list(J24_TO_J14), J14_NAMES
    else:
        pred_idx, gt_idx, names = list(range(17)), list(H36M17_FROM_J24), H36M17_NAMES
    gt_pelvis = gt.S[:, 14:15, :3]
    gt_joints = gt.S[:, gt_idx, :3] - gt_pelvis  # no-op on SPIN files (already pelvis-relative)
    sequences = sequence_labels(gt.keys)

    results, differences = [], []
    method_info = {}
    scored_subjects: set[str] = set()
    for pred in preds:
        in_protocol = keep[pred.rows]
        frames = np.flatnonzero(in_protocol)
        wanted = np.flatnonzero(keep)
        missing = np.setdiff1d(wanted, pred.rows[frames])
        if len(missing) and not allow_missing:
            raise JregfixError(f"{pred.path}: {len(missing)} of {len(wanted)} protocol frames have "
                               f"no prediction (first: GT row {missing[0]}, "
                               f"{gt.imgname[missing[0]]}); pass --allow-missing to score only "
                               "the covered frames")
        if len(frames) == 0:
            raise JregfixError(f"{pred.path}: no frame of protocol {protocol} is covered")
        joints_all = _regress(pred.params, frames, body, joints_of, stacked, chunk_size, device,
                              progress)
        rows = pred.rows[frames]
        scored_subjects |= {gt.keys[r].subject for r in rows}
        gt_sel = gt_joints[rows]
        offset = 0
        errors = {"mpjpe_mm": [], "pa_mpjpe_mm": []}  # per regressor: (N,) per-frame errors
        method_results = []
        for name, reg in regs.items():
            k = reg["matrix"].shape[0]
            pj = joints_all[:, offset:offset + k]
            offset += k
            pj = pj[:, pred_idx] - pj[:, :1]
            joint_err = np.linalg.norm(pj - gt_sel, axis=-1) * 1000.0  # (N, K)
            joint_pa = np.linalg.norm(similarity_align(pj, gt_sel) - gt_sel, axis=-1) * 1000.0
            e, pa = joint_err.mean(1), joint_pa.mean(1)
            errors["mpjpe_mm"].append(e)
            errors["pa_mpjpe_mm"].append(pa)
            entry = {"method": pred.method, "regressor": name, "mpjpe_mm": float(e.mean()),
                     "pa_mpjpe_mm": float(pa.mean()), "frames": int(len(frames)),
                     "per_joint_mm": dict(zip(names, joint_err.mean(0).tolist(), strict=True)),
                     "per_joint_pa_mm": dict(zip(names, joint_pa.mean(0).tolist(),
                                                 strict=True))}
            if per_action:
                acts = gt.actions[rows]
                entry["per_action"] = {
                    a: {"mpjpe_mm": float(e[acts == a].mean()),
                        "pa_mpjpe_mm": float(pa[acts == a].mean()),
                        "frames": int((acts == a).sum())}
                    for a in sorted(set(acts))}
            method_results.append(entry)
        boot = {metric: paired_bootstrap(np.stack(cols, 1), sequences[rows], bootstrap, seed,
                                         level) for metric, cols in errors.items()}
        for entry in method_results:
            entry["sequences"] = boot["mpjpe_mm"].sequences
        results += method_results
        differences += _differences(pred.method, list(regs), boot)
        method_info[pred.method] = {
            "path": str(Path(pred.path).resolve()),
            "sha256": sha256_file(pred.path) if Path(pred.path).is_file() else None,
            "vertices": "from file" if pred.params.vertices is not None
            else f"{getattr(body, 'name', 'body model')}(pose, betas)",
            "frames_evaluated": int(len(frames)), "frames_missing": int(len(missing)),
            "sequences": boot["mpjpe_mm"].sequences,
            "mapping": pred.mapping, "notes": pred.notes}

    for reg in regs.values():
        trained = set(reg["training"]["subjects"] or ())
        reg["training"]["evaluated_subjects_in_training"] = sorted(trained & scored_subjects)
        reg["fitted_on_test_subjects"] = bool(trained & scored_subjects)
    for entry in results:
        entry["fitted_on_test_subjects"] = regs[entry["regressor"]]["fitted_on_test_subjects"]

    doc = {
        "protocol": {
            "gt": {"path": str(Path(gt_path).resolve()), "sha256": sha256_file(gt_path),
                   "rows": len(gt)},
            "protocol": protocol,
            "cameras": sorted(set(gt.cameras[keep])),
            "subjects": sorted(set(gt.subjects[keep])),
            "frames": "the GT file's rows (SPIN: every 5th frame of S9/S11)",
            **({"track_frames": _mapping_hint(frame_ids)}
               if {"vibe", "meva"} & set(methods) else {}),
            "joints": list(names),
            "prediction_joints": "J @ vertices, rows " + str(pred_idx),
            "gt_joints": "S[:, " + str(gt_idx) + ", :3] - S[:, 14] (pelvis)",
            "root": "prediction: regressor row 0 (pelvis); GT: pelvis",
            "pa": "similarity Procrustes (rotation with reflection fix, scale, translation) of "
                  "prediction onto GT, per frame",
            "averaging": "mean over frames",
            "units": "mm",
            "bootstrap": {
                "resamples": int(bootstrap), "seed": int(seed), "level": float(level),
                "unit": "sequence: one (subject, action, camera) video, from the GT imgname "
                        "S9_Directions_1.54138969_000001.jpg -> S9_Directions_1.54138969",
                "statistic": "difference (regressor - baseline) of the mean over all frames of "
                             "the resampled sequences; the same resampled sequences for both "
                             "regressors (paired) and both metrics",
                "interval": "percentile of the resampled differences (numpy quantile, linear); "
                            "null when a method covers fewer than 2 sequences",
                "draws": "numpy default_rng(seed).integers(0, S, (resamples, S)) over the "
                         "method's S sequences sorted by name"},
            "regressors": {n: {k: v for k, v in r.items() if k != "matrix"}
                           for n, r in regs.items()},
            "methods": method_info,
        },
        "results": results,
        "differences": differences,
    }
    if json_out is not None:
        write_json(json_out, doc)
    if csv_out is not None or report_dir is not None:
        from jregfix.stages import report

        if csv_out is not None:
            report.write_csv(csv_out, doc)
        if report_dir is not None:
            mesh, mesh_label = _report_mesh(body, preds[0])
            report.write_report(report_dir, doc, {n: r["matrix"] for n, r in regs.items()},
                                mesh, mesh_label)
    return doc


def _differences(method: str, names: list[str], boot: Mapping) -> list[dict]:
    """Every pair (baseline a, regressor b), a before b in the given order: b - a per metric,
    with its interval ([lower, upper] or None)."""
    out = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            entry = {"method": method, "regressor": names[b], "baseline": names[a],
                     "sequences": boot["mpjpe_mm"].sequences, "frames": boot["mpjpe_mm"].frames}
            for metric, res in boot.items():
                interval = None if res.lower is None else [float(res.lower[a, b]),
                                                           float(res.upper[a, b])]
                entry[metric] = {"difference": float(res.difference[a, b]),
                                 "interval": interval}
            out.append(entry)
    return out


def _report_mesh(body: BodyModel | None, pred: Prediction) -> tuple[np.ndarray, str]:
    """(V, 3) mesh the report places each regressor's joints on: the body model's template
    (rest pose, mean shape), or without a body model the first frame of the first method."""
    if body is not None:
        return body.template.detach().double().cpu().numpy(), \
            f"{getattr(body, 'name', 'body model')} template (rest pose, mean shape)"
    return pred.params.vertices[0].astype(np.float64), \
        f"first frame of {pred.method} (no body model given)"


def _refuse_overwriting_inputs(inputs: Sequence[str | Path], json_out, csv_out,
                               report_dir) -> None:
    refuse_overwriting_inputs(
        {"--predictions, --gt or --regressor": inputs},
        {"--json": json_out, "--csv": csv_out,
         "--report": None if report_dir is None else Path(report_dir) / "index.html"})


def _regress(params: BodyParams, frames: np.ndarray, body: BodyModel | None,
             joints_of: Callable | None, stacked: torch.Tensor, chunk_size: int, device: str,
             progress: Callable[[int], None] | None) -> np.ndarray:
    """(len(frames), K_total, 3) joints of all regressors, chunk by chunk: ``stacked`` @ the
    file's vertices, or ``joints_of(rotmat, betas)`` (:func:`joint_regression`)."""
    out = np.empty((len(frames), stacked.shape[0], 3))
    if params.vertices is None and body is not None and params.betas.shape[1] > body.num_betas:
        raise JregfixError(f"{params.path}: betas have {params.betas.shape[1]} coefficients but "
                           f"the body model has {body.num_betas}")
    with torch.no_grad():
        for start in range(0, len(frames), chunk_size):
            idx = frames[start:start + chunk_size]
            if params.vertices is not None:
                verts = torch.from_numpy(params.vertices[idx]).to(device, torch.float64)
            else:
                if body is None:
                    raise JregfixError(f"{params.path}: no vertices; a body model is needed")
                dtype = body.template.dtype
                rot = pose_to_rotmat(torch.from_numpy(params.pose[idx]).to(device, dtype),
                                     body.num_joints)
                betas = fit_betas(torch.from_numpy(params.betas[idx]).to(device, dtype),
                                  body.num_betas)
                out[start:start + len(idx)] = joints_of(rot, betas).cpu().numpy()
            if params.vertices is not None:
                if verts.shape[1] != stacked.shape[1]:
                    raise JregfixError(f"{params.path}: vertices have {verts.shape[1]} points, "
                                       f"the regressors expect {stacked.shape[1]}")
                out[start:start + len(idx)] = torch.einsum("kv,nvc->nkc", stacked,
                                                           verts).cpu().numpy()
            if progress is not None:
                progress(len(idx))
    return out
