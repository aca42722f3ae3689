"""`evaluate`: MPJPE / PA-MPJPE of method output files under several joint regressors (Table I).

The file side of scoring: reads the GT file, each method's output (a SPIN/params npz, or
VIBE/MEVA demo outputs, which reach the GT rows through the video they came from:
:func:`_load_tracks_prediction`, docs/vibe-meva.md) and the regressor files; scores them with
:class:`jregfix.methods.scoring.Scorer` (the protocol: SPIN's eval.py, 14 or 17 joints,
pelvis-centred, PA onto the GT); and writes the JSON document (every protocol choice recorded),
the CSV and the report page.

Differences between regressors come with paired 95 % bootstrap intervals over sequences
(:func:`jregfix.methods.scoring.sequence_labels`, :mod:`jregfix.geometry.intervals`), and every
regressor carries the subjects it was fitted on, as far as its provenance records them
(:func:`training_provenance`): one fitted on an evaluated subject is flagged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from jregfix.body.base import BodyModel
from jregfix.device import device_stage
from jregfix.errors import JregfixError
from jregfix.geometry.crop import square_box
from jregfix.geometry.metrics import box_iou
from jregfix.io.atomic import sha256_file, write_json
from jregfix.io.guard import refuse_overwriting_inputs
from jregfix.io.h36m import H36M17_FROM_J24, H36MData, load_h36m, protocol_mask
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
from jregfix.io.tracks import VideoKey, read_tracks, track_files, video_key
from jregfix.methods.scoring import JOINT_SETS, Scorer
from jregfix.stages.result import Progress, StageResult, Step

METHODS = ("spin", "vibe", "meva", "npz")
FRAME_IDS = ("video", "rows")  # what VIBE/MEVA frame_ids count: video frames or GT rows


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


def load_prediction(
    method: str,
    path: str | Path,
    gt: H36MData,
    frame_ids: str = "video",
    subject: str | None = None,
    keep: np.ndarray | None = None,
) -> Prediction:
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
            raise JregfixError(
                f"{path}: {len(missing)} imgname(s) are not in the GT file, e.g. {missing[0]!r}"
            )
        rows = np.array([index[x] for x in params.imgname], dtype=np.int64)
        uniq, counts = np.unique(rows, return_counts=True)
        if (counts > 1).any():
            raise JregfixError(
                f"{path}: frame {gt_imgname[uniq[counts > 1][0]]!r} appears more "
                "than once; each GT frame may be predicted once"
            )
        by = "imgname"
    else:
        if len(params) != n_gt:
            raise JregfixError(
                f"{path}: {len(params)} frames but the GT file has {n_gt} rows "
                "(and no 'imgname' to align by)"
            )
        rows = np.arange(n_gt)
        by = "position"
    return Prediction(method, str(path), params, rows, [f"rows aligned to GT by {by}"], {"by": by})


def _load_tracks_prediction(
    method: str,
    path: Path,
    gt: H36MData,
    frame_ids: str,
    subject: str | None,
    keep: np.ndarray | None,
) -> Prediction:
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
    parts: list[BodyParams] = []
    row_parts: list[np.ndarray] = []
    videos: dict[VideoKey, Path] = {}
    stats = dict.fromkeys(
        (
            "tracks",
            "track_frames",
            "frames_on_gt_rows",
            "rows_with_several_tracks",
            "rows_only_off_target",
        ),
        0,
    )
    no_rows, no_tracks = [], []
    digests = {}
    for file in files:
        tracks, digests[str(file)] = read_tracks(file)
        if frame_ids == "video":
            key = video_key(file, subject)
            if key in videos:
                raise JregfixError(
                    f"{file}: a second output for video {key} (first: "
                    f"{videos[key]}); keep one file per video"
                )
            videos[key] = file
            action = key.action.replace(" ", "_")
        candidates = []  # per track: (rows, local indices, IoU with the GT box)
        for tid, track in tracks.items():
            p = params_from_arrays(track, f"{file} track {tid}", require_pose=False)
            ids = _frame_ids(track, len(p), f"{file} track {tid}")
            boxes = _boxes(track, len(p), f"{file} track {tid}")
            r = (
                _video_rows(index, key.subject, action, key.camera, ids)
                if frame_ids == "video"
                else _checked_rows(ids, n_gt, file)
            )
            local = np.flatnonzero((r >= 0) & keep[np.maximum(r, 0)])
            iou = (
                np.full(len(local), np.nan)
                if boxes is None
                else box_iou(boxes[local], gt_boxes[r[local]])
            )
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
                row_parts.append(r[pick])
    if not parts:
        raise JregfixError(
            f"{path}: no frame of its {stats['tracks']} track(s) maps to a GT row "
            f"of {gt.path} ({_mapping_hint(frame_ids)})"
        )
    rows = np.concatenate(row_parts)
    dup = np.unique(rows, return_counts=True)
    if (dup[1] > 1).any():  # only possible with --frame-ids rows across files
        raise JregfixError(
            f"{path}: GT row {dup[0][dup[1] > 1][0]} is predicted by two files; "
            "keep one prediction per frame"
        )
    mapping = {"frame_ids": frame_ids, **stats, "rows_covered": int(len(rows)), "files": digests}
    notes = [
        f"{len(files)} file(s), {stats['tracks']} track(s); {_mapping_hint(frame_ids)}",
        (
            f"{stats['rows_with_several_tracks']} row(s) covered by several tracks: the track "
            "whose box overlaps the GT box most was used"
        ),
    ]
    if stats["rows_only_off_target"]:
        notes.append(
            f"{stats['rows_only_off_target']} row(s) only covered by tracks whose box "
            "misses the GT box (another person): not scored"
        )
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
        notes.append(
            "MEVA skips tracks shorter than 90 frames; 'pose' is axis-angle, so its "
            "6D layout does not matter here"
        )
    return Prediction(method, str(path), params, rows, notes, mapping)


def _video_rows(
    index: dict[tuple[str, str, str, int], int],
    subject: str,
    action: str,
    camera: str,
    ids: np.ndarray,
) -> np.ndarray:
    """GT rows (N,) int64 of video frames ``ids`` (N,); -1 where the GT file has no row."""
    return np.array([index.get((subject, action, camera, int(f)), -1) for f in ids], dtype=np.int64)


def _checked_rows(ids: np.ndarray, n_gt: int, file: Path) -> np.ndarray:
    """``ids`` (N,) that already are GT rows (--frame-ids rows), refused if out of range."""
    if len(ids) and (ids.min() < 0 or ids.max() >= n_gt):
        raise JregfixError(
            f"{file}: frame_ids range {ids.min()}..{ids.max()} is "
            f"outside the {n_gt} GT rows (--frame-ids rows)"
        )
    return ids


def _mapping_hint(frame_ids: str) -> str:
    if frame_ids == "rows":
        return "frame_ids index GT rows"
    return (
        "frame_ids are 0-based video frames (50 fps); frame f -> GT image number f "
        "(SPIN's numbering)"
    )


def _frame_ids(track: Mapping, n: int, label: str) -> np.ndarray:
    ids = np.asarray(track["frame_ids"])
    if ids.dtype.kind not in "iu":
        raise JregfixError(
            f"{label}: frame_ids have dtype {ids.dtype}; VIBE/MEVA write integer "
            "frame indices, so this file was changed after the demo wrote it"
        )
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
        raise JregfixError(
            f"{label}: 'bboxes' must be ({n},4) finite (cx, cy, w, h), got shape {b.shape}"
        )
    half = b[:, 2:] / 2
    return np.concatenate([b[:, :2] - half, b[:, :2] + half], 1)


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
        raise JregfixError(
            f"{file}: several tracks cover GT row {several[0]} and not all have "
            "'bboxes' to choose the subject by"
        )
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

    params = BodyParams(cat("pose"), cat("betas"), cat("camera"), None, cat("vertices"), None, path)
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
        j = validate_regressor(
            load_regressor(path), num_vertices, f"regressor '{name}' ({path})", num_joints=17
        )
        digest = sha256_file(path)
        transform = "as stored"
        if digest == HEDLIN_SHA256:
            j = effective_regressor(j)
            transform = "ReLU + rows renormalised (raw Hedlin file)"
        warnings = regressor_warnings(j)
        if warnings:
            warnings.append(
                "used as given; `jregfix regressors convert IN OUT --effective` "
                "writes the ReLU + row-normalised form"
            )
        out[name] = {
            "matrix": j,
            "path": str(Path(path).resolve()),
            "sha256": digest,
            "transform": transform,
            "warnings": warnings,
            "training": training_provenance(path, digest),
            "stats": regressor_stats(j, tol=1e-12),
        }
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
    for doc_path, doc in (
        (f"{Path(path).name}.json", load_provenance(path)),
        (manifest_path(path).name, read_sidecar(path)),
    ):
        if not isinstance(doc, dict):
            continue
        guard, config = (
            part if isinstance(part := doc.get(k), dict) else {}
            for k in ("leakage_guard", "config")
        )
        for key, subjects in (
            ("leakage_guard.subjects", guard.get("subjects")),
            ("subjects", doc.get("subjects")),
            ("config.subjects", config.get("subjects")),
        ):
            if isinstance(subjects, dict | list | tuple) and subjects:
                return {"subjects": sorted(map(str, subjects)), "source": f"{doc_path}: {key}"}
        if isinstance(doc.get("name"), str) and doc["name"] in KNOWN_REGRESSORS:
            return _registry_training(
                doc["name"], f"{doc_path}: name '{doc['name']}' (registry entry)"
            )
    return {"subjects": None, "source": f"no {Path(path).name}.json or manifest beside the file"}


def _registry_training(name: str, source: str) -> dict:
    known = KNOWN_REGRESSORS[name]
    subjects = sorted(known.training_subjects) if known.training_subjects else None
    return {"subjects": subjects, "source": source, "note": known.training_note}


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
    progress: Progress | None = None,
    bootstrap: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    csv_out: str | Path | None = None,
    report_dir: str | Path | None = None,
) -> StageResult:
    """Score each (method, file) under each regressor (:class:`jregfix.methods.scoring.Scorer`).

    Returns a :class:`StageResult` whose ``summary`` is the JSON-able result document (written
    to ``json_out`` too) and whose ``outputs`` name the files written. ``frame_ids`` and
    ``subject`` apply to VIBE/MEVA outputs (see :func:`load_prediction`). Every pair of
    regressors gets the difference of MPJPE and PA-MPJPE with a ``level`` bootstrap interval
    over sequences (``bootstrap`` resamples, ``seed``), in ``doc["differences"]``. ``csv_out``
    and ``report_dir`` (``index.html``, figures embedded) are written from the same document
    (:mod:`jregfix.stages.report`). ``progress`` receives :class:`Step` events counting the
    frames scored over all methods.
    """
    if joints not in JOINT_SETS:
        raise JregfixError(f"--joints must be 14 or 17, got {joints}")
    if not regressors:
        raise JregfixError("give at least one regressor (NAME=PATH)")
    methods = [m for m, _ in predictions]
    if len(set(methods)) != len(methods):
        raise JregfixError(
            f"each method may be given once (got {methods}); evaluate files of the "
            "same method in separate calls"
        )
    _refuse_overwriting_inputs(
        [p for _, p in predictions] + [gt_path, *regressors.values()], json_out, csv_out, report_dir
    )
    gt = load_h36m(gt_path)
    keep = protocol_mask(gt, protocol)
    num_vertices = body.num_vertices if body is not None else None
    preds = [load_prediction(m, p, gt, frame_ids, subject, keep) for m, p in predictions]
    if num_vertices is None:
        with_verts = [p.params.vertices for p in preds if p.params.vertices is not None]
        if len(with_verts) != len(preds):
            raise JregfixError("a body model (--smpl) is needed: some predictions have no vertices")
        num_vertices = with_verts[0].shape[1]
    regs = resolve_regressors(regressors, num_vertices)
    scorer = Scorer({n: r["matrix"] for n, r in regs.items()}, body, joints, chunk_size, device)
    per_action = per_action or report_dir is not None
    index, names = JOINT_SETS[joints]
    gt_index = [H36M17_FROM_J24[i] for i in index]  # the same joints in SPIN's S (J24) order

    total = sum(int(keep[p.rows].sum()) for p in preds)
    results, differences = [], []
    method_info = {}
    scored_subjects: set[str] = set()
    done = 0
    for pred in preds:

        def frames_done(n: int, before: int = done) -> None:
            if progress is not None:
                progress(Step("evaluate", before + n, total))

        scores = scorer(
            pred.params,
            gt,
            rows=pred.rows,
            protocol=protocol,
            allow_missing=allow_missing,
            name=pred.path,
            progress=frames_done,
        )
        done += scores.frames
        scored_subjects |= {gt.keys[r].subject for r in scores.rows}
        boot = scores.differences(bootstrap, seed, level)
        means = scores.summary()
        joint_mm, joint_pa_mm = scores.per_joint()
        actions = scores.per_action() if per_action else {}
        for r, name in enumerate(scores.regressors):
            entry: dict[str, Any] = {
                "method": pred.method,
                "regressor": name,
                **means[name],
                "frames": scores.frames,
                "per_joint_mm": dict(zip(names, joint_mm[r].tolist(), strict=True)),
                "per_joint_pa_mm": dict(zip(names, joint_pa_mm[r].tolist(), strict=True)),
            }
            if per_action:
                entry["per_action"] = {
                    a: {
                        "mpjpe_mm": float(v["mpjpe_mm"][r]),
                        "pa_mpjpe_mm": float(v["pa_mpjpe_mm"][r]),
                        "frames": v["frames"],
                    }
                    for a, v in actions.items()
                }
            entry["sequences"] = boot["mpjpe_mm"].sequences
            results.append(entry)
        differences += _differences(pred.method, list(regs), boot)
        method_info[pred.method] = {
            "path": str(Path(pred.path).resolve()),
            "sha256": sha256_file(pred.path) if Path(pred.path).is_file() else None,
            "vertices": "from file"
            if pred.params.vertices is not None
            else f"{getattr(body, 'name', 'body model')}(pose, betas)",
            "frames_evaluated": scores.frames,
            "frames_missing": int(len(scores.missing)),
            "sequences": boot["mpjpe_mm"].sequences,
            "mapping": pred.mapping,
            "notes": pred.notes,
        }

    for reg in regs.values():
        trained = set(reg["training"]["subjects"] or ())
        reg["training"]["evaluated_subjects_in_training"] = sorted(trained & scored_subjects)
        reg["fitted_on_test_subjects"] = bool(trained & scored_subjects)
    for entry in results:
        entry["fitted_on_test_subjects"] = regs[entry["regressor"]]["fitted_on_test_subjects"]

    doc = {
        "protocol": {
            "gt": {
                "path": str(Path(gt_path).resolve()),
                "sha256": sha256_file(gt_path),
                "rows": len(gt),
            },
            "protocol": protocol,
            "cameras": sorted(set(gt.cameras[keep])),
            "subjects": sorted(set(gt.subjects[keep])),
            "frames": "the GT file's rows (SPIN: every 5th frame of S9/S11)",
            **(
                {"track_frames": _mapping_hint(frame_ids)}
                if {"vibe", "meva"} & set(methods)
                else {}
            ),
            "joints": list(names),
            "prediction_joints": "J @ vertices, rows " + str(list(index)),
            "gt_joints": "S[:, " + str(gt_index) + ", :3] - S[:, 14] (pelvis)",
            "root": "prediction: regressor row 0 (pelvis); GT: pelvis",
            "pa": "similarity Procrustes (rotation with reflection fix, scale, translation) of "
            "prediction onto GT, per frame",
            "averaging": "mean over frames",
            "units": "mm",
            "bootstrap": {
                "resamples": int(bootstrap),
                "seed": int(seed),
                "level": float(level),
                "unit": "sequence: one (subject, action, camera) video, from the GT imgname "
                "S9_Directions_1.54138969_000001.jpg -> S9_Directions_1.54138969",
                "statistic": "difference (regressor - baseline) of the mean over all frames of "
                "the resampled sequences; the same resampled sequences for both "
                "regressors (paired) and both metrics",
                "interval": "percentile of the resampled differences (numpy quantile, linear); "
                "null when a method covers fewer than 2 sequences",
                "draws": "numpy default_rng(seed).integers(0, S, (resamples, S)) over the "
                "method's S sequences sorted by name",
            },
            "regressors": {
                n: {k: v for k, v in r.items() if k != "matrix"} for n, r in regs.items()
            },
            "methods": method_info,
        },
        "results": results,
        "differences": differences,
    }
    outputs = {}
    if json_out is not None:
        write_json(json_out, doc)
        outputs["json"] = Path(json_out)
    if csv_out is not None or report_dir is not None:
        from jregfix.stages import report

        if csv_out is not None:
            report.write_csv(csv_out, doc)
            outputs["csv"] = Path(csv_out)
        if report_dir is not None:
            mesh, mesh_label = _report_mesh(body, preds[0])
            report.write_report(
                report_dir, doc, {n: r["matrix"] for n, r in regs.items()}, mesh, mesh_label
            )
            outputs["report"] = Path(report_dir) / "index.html"
    return StageResult("evaluate", outputs, summary=doc)


def _differences(method: str, names: list[str], boot: Mapping) -> list[dict]:
    """Every pair (baseline a, regressor b), a before b in the given order: b - a per metric,
    with its interval ([lower, upper] or None)."""
    out = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            entry = {
                "method": method,
                "regressor": names[b],
                "baseline": names[a],
                "sequences": boot["mpjpe_mm"].sequences,
                "frames": boot["mpjpe_mm"].frames,
            }
            for metric, res in boot.items():
                interval = (
                    None if res.lower is None else [float(res.lower[a, b]), float(res.upper[a, b])]
                )
                entry[metric] = {"difference": float(res.difference[a, b]), "interval": interval}
            out.append(entry)
    return out


def _report_mesh(body: BodyModel | None, pred: Prediction) -> tuple[np.ndarray, str]:
    """(V, 3) mesh the report places each regressor's joints on: the body model's template
    (rest pose, mean shape), or without a body model the first frame of the first method."""
    if body is not None:
        return (
            body.template.detach().double().cpu().numpy(),
            f"{getattr(body, 'name', 'body model')} template (rest pose, mean shape)",
        )
    # evaluate() refuses to run without a body model unless every prediction has vertices
    vertices = cast(np.ndarray, pred.params.vertices)
    return vertices[0].astype(np.float64), f"first frame of {pred.method} (no body model given)"


def _refuse_overwriting_inputs(inputs: Sequence[str | Path], json_out, csv_out, report_dir) -> None:
    refuse_overwriting_inputs(
        {"--predictions, --gt or --regressor": inputs},
        {
            "--json": json_out,
            "--csv": csv_out,
            "--report": None if report_dir is None else Path(report_dir) / "index.html",
        },
    )
