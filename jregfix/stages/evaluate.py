"""`evaluate`: MPJPE / PA-MPJPE of method outputs under several joint regressors (Table I).

Protocol (SPIN eval.py, conventions.md §4.5): joints = J @ vertices; the prediction is centred
on regressor row 0 (pelvis); the ground truth is SPIN's pelvis-relative ``S``. With 14 joints
the prediction takes rows ``H36M_TO_J14`` and the GT ``J24_TO_J14``; with 17 joints (Hedlin et
al.) all 17 regressor rows against the GT in the same order, pelvis included. PA-MPJPE aligns
the prediction onto the GT by a similarity transform. Every choice is written to the output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from jregfix.body.base import BodyModel, fit_betas
from jregfix.body.rotations import pose_to_rotmat
from jregfix.errors import JregfixError
from jregfix.geometry.metrics import mpjpe, pa_mpjpe
from jregfix.io.atomic import sha256_file, write_json
from jregfix.io.h36m import (
    H36M17_FROM_J24,
    H36M17_NAMES,
    H36M_TO_J14,
    J24_TO_J14,
    load_h36m,
    protocol_mask,
)
from jregfix.io.params import BodyParams, load_params, params_from_arrays
from jregfix.io.regressors import (
    HEDLIN_SHA256,
    effective_regressor,
    load_regressor,
    regressor_stats,
    validate_regressor,
)
from jregfix.io.tracks import load_tracks

METHODS = ("spin", "vibe", "meva", "npz")
J14_NAMES = tuple(H36M17_NAMES[i] for i in H36M_TO_J14)


@dataclass
class Prediction:
    """A method's per-frame output aligned to GT rows: ``rows[i]`` is the GT row of frame i."""

    method: str
    path: str
    params: BodyParams
    rows: np.ndarray
    notes: list[str] = field(default_factory=list)


def load_prediction(method: str, path: str | Path, gt_imgname: np.ndarray) -> Prediction:
    """Read a method's output file and align its frames with the GT rows."""
    if method not in METHODS:
        raise JregfixError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    path = Path(path)
    n_gt = len(gt_imgname)
    if method in ("vibe", "meva"):
        tracks = load_tracks(path)
        parts, rows = [], []
        for tid, track in tracks.items():
            p = params_from_arrays(track, f"{path} track {tid}", require_pose=False)
            ids = np.asarray(track["frame_ids"]).astype(np.int64).reshape(-1)
            if len(ids) != len(p):
                raise JregfixError(f"{path}: track {tid}: {len(ids)} frame_ids for {len(p)} frames")
            parts.append(p)
            rows.append(ids)
        rows = np.concatenate(rows)
        if rows.min() < 0 or rows.max() >= n_gt:
            raise JregfixError(f"{path}: frame_ids range {rows.min()}..{rows.max()} is outside "
                               f"the {n_gt} GT rows")
        uniq, counts = np.unique(rows, return_counts=True)
        if (counts > 1).any():
            raise JregfixError(f"{path}: GT row {uniq[counts > 1][0]} appears in more than one "
                               "track; keep one track per person")
        params = _concat_params(parts, str(path))
        notes = [f"{len(tracks)} track(s); frame_ids index GT rows"]
        if params.vertices is not None:
            notes.append("vertices taken from the file ('verts')")
        if method == "meva":
            notes.append("MEVA 6D layout is irrelevant here: 'pose' is axis-angle")
        return Prediction(method, str(path), params, rows, notes)
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
        notes = ["rows aligned to GT by imgname"]
    else:
        if len(params) != n_gt:
            raise JregfixError(f"{path}: {len(params)} frames but the GT file has {n_gt} rows "
                               "(and no 'imgname' to align by)")
        rows = np.arange(n_gt)
        notes = ["rows aligned to GT by position"]
    return Prediction(method, str(path), params, rows, notes)


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
    """{name: path} -> {name: {"matrix": (17,V), "path", "sha256", "stats", "transform"}}.

    The raw released Hedlin file (recognised by its sha256) is applied as the authors' code does,
    ReLU + row renormalisation; any other file is applied exactly as stored.
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
        out[name] = {"matrix": j, "path": str(Path(path).resolve()), "sha256": digest,
                     "transform": transform, "stats": regressor_stats(j, tol=1e-12)}
    return out


def evaluate(
    predictions: Sequence[tuple[str, str | Path]],
    gt_path: str | Path,
    regressors: Mapping[str, str | Path],
    body: BodyModel | None = None,
    protocol: str = "p1",
    joints: int = 14,
    per_action: bool = False,
    allow_missing: bool = False,
    chunk_size: int = 256,
    device: str = "cpu",
    json_out: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Score each (method, file) under each regressor; returns the JSON-able result document."""
    if joints not in (14, 17):
        raise JregfixError(f"--joints must be 14 or 17, got {joints}")
    if not regressors:
        raise JregfixError("give at least one regressor (NAME=PATH)")
    methods = [m for m, _ in predictions]
    if len(set(methods)) != len(methods):
        raise JregfixError(f"each method may be given once (got {methods}); evaluate files of the "
                           "same method in separate calls")
    gt = load_h36m(gt_path)
    keep = protocol_mask(gt, protocol)
    num_vertices = body.num_vertices if body is not None else None
    preds = [load_prediction(m, p, gt.imgname) for m, p in predictions]
    if num_vertices is None:
        with_verts = [p for p in preds if p.params.vertices is not None]
        if len(with_verts) != len(preds):
            raise JregfixError("a body model (--smpl) is needed: some predictions have no vertices")
        num_vertices = with_verts[0].params.vertices.shape[1]
    regs = resolve_regressors(regressors, num_vertices)
    stacked = torch.from_numpy(np.concatenate([r["matrix"] for r in regs.values()])).to(device)

    if joints == 14:
        pred_idx, gt_idx, names = list(H36M_TO_J14), list(J24_TO_J14), J14_NAMES
    else:
        pred_idx, gt_idx, names = list(range(17)), list(H36M17_FROM_J24), H36M17_NAMES
    gt_pelvis = gt.S[:, 14:15, :3]
    gt_joints = gt.S[:, gt_idx, :3] - gt_pelvis  # no-op on SPIN files (already pelvis-relative)

    results = []
    method_info = {}
    for pred in preds:
        in_protocol = keep[pred.rows]
        frames = np.flatnonzero(in_protocol)
        wanted = np.flatnonzero(keep)
        missing = np.setdiff1d(wanted, pred.rows[frames])
        if len(missing) and not allow_missing:
            raise JregfixError(f"{pred.path}: {len(missing)} of {len(wanted)} protocol frames have "
                               f"no prediction (first GT row {missing[0]}); pass --allow-missing "
                               "to score only the covered frames")
        if len(frames) == 0:
            raise JregfixError(f"{pred.path}: no frame of protocol {protocol} is covered")
        joints_all = _regress(pred.params, frames, body, stacked, chunk_size, device, progress)
        rows = pred.rows[frames]
        gt_sel = gt_joints[rows]
        offset = 0
        for name, reg in regs.items():
            k = reg["matrix"].shape[0]
            pj = joints_all[:, offset:offset + k]
            offset += k
            pj = pj[:, pred_idx] - pj[:, :1]
            e = mpjpe(pj, gt_sel) * 1000.0
            pa = pa_mpjpe(pj, gt_sel) * 1000.0
            entry = {"method": pred.method, "regressor": name, "mpjpe_mm": float(e.mean()),
                     "pa_mpjpe_mm": float(pa.mean()), "frames": int(len(frames)),
                     "per_joint_mm": dict(zip(names, (np.linalg.norm(pj - gt_sel, axis=-1)
                                                      .mean(0) * 1000).tolist(), strict=True))}
            if per_action:
                acts = gt.actions[rows]
                entry["per_action"] = {
                    a: {"mpjpe_mm": float(e[acts == a].mean()),
                        "pa_mpjpe_mm": float(pa[acts == a].mean()),
                        "frames": int((acts == a).sum())}
                    for a in sorted(set(acts))}
            results.append(entry)
        method_info[pred.method] = {
            "path": str(Path(pred.path).resolve()), "sha256": sha256_file(pred.path),
            "vertices": "from file" if pred.params.vertices is not None
            else f"{getattr(body, 'name', 'body model')}(pose, betas)",
            "frames_evaluated": int(len(frames)), "frames_missing": int(len(missing)),
            "notes": pred.notes}

    doc = {
        "protocol": {
            "gt": {"path": str(Path(gt_path).resolve()), "sha256": sha256_file(gt_path),
                   "rows": len(gt)},
            "protocol": protocol,
            "cameras": sorted(set(gt.cameras[keep])),
            "subjects": sorted(set(gt.subjects[keep])),
            "frames": "the GT file's rows (SPIN: every 5th frame of S9/S11)",
            "joints": list(names),
            "prediction_joints": "J @ vertices, rows " + str(pred_idx),
            "gt_joints": "S[:, " + str(gt_idx) + ", :3] - S[:, 14] (pelvis)",
            "root": "prediction: regressor row 0 (pelvis); GT: pelvis",
            "pa": "similarity Procrustes (rotation with reflection fix, scale, translation) of "
                  "prediction onto GT, per frame",
            "averaging": "mean over frames",
            "units": "mm",
            "regressors": {n: {k: v for k, v in r.items() if k != "matrix"}
                           for n, r in regs.items()},
            "methods": method_info,
        },
        "results": results,
    }
    if json_out is not None:
        write_json(json_out, doc)
    return doc


def _regress(params: BodyParams, frames: np.ndarray, body: BodyModel | None,
             stacked: torch.Tensor, chunk_size: int, device: str,
             progress: Callable[[int], None] | None) -> np.ndarray:
    """(len(frames), K_total, 3) joints of all regressors, vertices computed chunk by chunk."""
    out = np.empty((len(frames), stacked.shape[0], 3))
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
                verts = body.vertices(rot, betas).to(torch.float64)
            if verts.shape[1] != stacked.shape[1]:
                raise JregfixError(f"{params.path}: vertices have {verts.shape[1]} points, the "
                                   f"regressors expect {stacked.shape[1]}")
            out[start:start + len(idx)] = torch.einsum("kv,nvc->nkc", stacked, verts).cpu().numpy()
            if progress is not None:
                progress(len(idx))
    return out
