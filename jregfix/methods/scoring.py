"""Scoring: MPJPE / PA-MPJPE of a method's bodies against Human3.6M joints, per regressor.

Arrays in, arrays out: no files. :func:`score` (or a reusable :class:`Scorer`) takes a method's
per-frame bodies — vertices (N, V, 3), or SMPL parameters (pose, betas) and a body model — the
ground-truth joints and one or more joint regressors (17, V), and returns a :class:`Scores`
holding every frame's per-joint error under every regressor; means, per-joint and per-action
tables and paired bootstrap differences are views of it.

The protocol is the one SPIN's evaluation and Hedlin et al. use:

* Units: vertices and joints in metres; errors in millimetres.
* Predicted joints are ``J @ vertices`` for each regressor ``J`` (17, V), rows in the Human3.6M
  17-joint order (:data:`jregfix.io.h36m.H36M17_NAMES`: pelvis first). The ground truth is
  given in the same order (``H36MData.joints17()``).
* Both are centred on their pelvis (regressor row 0; the GT's pelvis joint).
* 17 joints (Hedlin et al.): all rows, pelvis included (its error is 0 before alignment).
  14 joints (SPIN, HMR): the rows :data:`jregfix.io.h36m.H36M_TO_J14` of both.
* PA-MPJPE aligns the prediction onto the GT per frame with a similarity transform
  (:func:`jregfix.geometry.metrics.similarity_align`).
* Means are over frames (every frame weighs the same); protocol 1 keeps all four cameras,
  protocol 2 only camera 60457274.

Bodies from parameters are never skinned in full: :func:`jregfix.body.base.joint_regression`
evaluates only what the regressors read (exact up to rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from jregfix.body.base import BodyModel, fit_betas, joint_regression
from jregfix.body.rotations import pose_to_rotmat
from jregfix.errors import JregfixError
from jregfix.geometry.intervals import PairedIntervals, paired_bootstrap
from jregfix.geometry.metrics import joint_errors, pa_joint_errors
from jregfix.io.h36m import H36M17_NAMES, H36M_TO_J14, FrameKey, H36MData, protocol_mask
from jregfix.io.params import BodyParams, params_from_arrays
from jregfix.io.regressors import checked_regressor, validate_regressor

J14_NAMES = tuple(H36M17_NAMES[i] for i in H36M_TO_J14)
# joints -> (rows of the 17-joint order scored, their names)
JOINT_SETS: dict[int, tuple[tuple[int, ...], tuple[str, ...]]] = {
    14: (tuple(H36M_TO_J14), J14_NAMES),
    17: (tuple(range(17)), H36M17_NAMES),
}
METRICS = ("mpjpe_mm", "pa_mpjpe_mm")

Predictions = np.ndarray | torch.Tensor | Mapping | BodyParams


@dataclass
class Scores:
    """Errors of one method's frames under each regressor, in millimetres.

    ``regressors`` (R,) names and ``joint_names`` (K,) in order; ``rows`` (N,) the GT row of
    each scored frame; ``missing`` GT rows of the protocol without a prediction;
    ``joint_mm`` / ``joint_pa_mm`` (R, N, K) the distance of each joint of each frame before /
    after Procrustes alignment; ``actions`` and ``sequences`` (N,) the frames' action family
    and video (None when the GT did not say).
    """

    regressors: tuple[str, ...]
    joint_names: tuple[str, ...]
    rows: np.ndarray
    missing: np.ndarray
    joint_mm: np.ndarray
    joint_pa_mm: np.ndarray
    actions: np.ndarray | None = None
    sequences: np.ndarray | None = None

    @property
    def frames(self) -> int:
        return len(self.rows)

    @property
    def mpjpe_mm(self) -> np.ndarray:
        """(R, N) MPJPE of each frame."""
        return self.joint_mm.mean(-1)

    @property
    def pa_mpjpe_mm(self) -> np.ndarray:
        """(R, N) PA-MPJPE of each frame."""
        return self.joint_pa_mm.mean(-1)

    def frame_errors(self, metric: str) -> np.ndarray:
        """(R, N) per-frame errors of ``metric`` ('mpjpe_mm' or 'pa_mpjpe_mm')."""
        if metric not in METRICS:
            raise JregfixError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
        return self.mpjpe_mm if metric == "mpjpe_mm" else self.pa_mpjpe_mm

    def summary(self) -> dict[str, dict[str, float]]:
        """{regressor: {"mpjpe_mm", "pa_mpjpe_mm"}}: means over frames (Table I's cells)."""
        e, pa = self.mpjpe_mm, self.pa_mpjpe_mm
        return {
            name: {"mpjpe_mm": float(e[r].mean()), "pa_mpjpe_mm": float(pa[r].mean())}
            for r, name in enumerate(self.regressors)
        }

    def per_joint(self) -> tuple[np.ndarray, np.ndarray]:
        """(R, K) mean error of each joint over frames, before and after alignment."""
        return (
            np.stack([j.mean(0) for j in self.joint_mm]),
            np.stack([j.mean(0) for j in self.joint_pa_mm]),
        )

    def per_action(self) -> dict[str, dict]:
        """{action: {"mpjpe_mm": (R,), "pa_mpjpe_mm": (R,), "frames": int}}, actions sorted."""
        if self.actions is None:
            raise JregfixError(
                "per-action errors need the frames' actions: pass the GT as an "
                "H36MData (jregfix.load_h36m) or actions="
            )
        e, pa = self.mpjpe_mm, self.pa_mpjpe_mm
        out = {}
        for action in sorted(set(self.actions)):
            mask = self.actions == action
            # one regressor at a time: a 1-D mean sums in numpy's pairwise order
            out[str(action)] = {
                "mpjpe_mm": np.array([x[mask].mean() for x in e]),
                "pa_mpjpe_mm": np.array([x[mask].mean() for x in pa]),
                "frames": int(mask.sum()),
            }
        return out

    def differences(
        self, resamples: int = 2000, seed: int = 0, level: float = 0.95
    ) -> dict[str, PairedIntervals]:
        """Per metric, every pairwise difference of regressors with its ``level`` paired
        bootstrap interval over sequences (:func:`jregfix.geometry.intervals.paired_bootstrap`:
        whole videos are resampled, the same draws for every regressor)."""
        if self.sequences is None:
            raise JregfixError(
                "bootstrap intervals need the frames' sequences: pass the GT as "
                "an H36MData (jregfix.load_h36m) or sequences="
            )
        return {
            metric: paired_bootstrap(
                np.stack(list(self.frame_errors(metric)), 1), self.sequences, resamples, seed, level
            )
            for metric in METRICS
        }


def sequence_labels(keys: Sequence[FrameKey]) -> np.ndarray:
    """(N,) str: the video of each GT row, ``S9_Directions_1.54138969`` for image
    ``images/S9_Directions_1.54138969_000001.jpg`` (subject, action, camera; the bootstrap's
    unit). Every GT row has one: :func:`jregfix.io.h36m.load_h36m` refuses image names not of
    that form, and the synthetic world of `jregfix demo` writes them the same way."""
    return np.array([f"{k.subject}_{k.action}.{k.camera}" for k in keys])


class Scorer:
    """Scores predictions through a fixed set of regressors (reusable across methods).

    Args:
        regressors: {name: (17, V) array} (or one (17, V) array, named "regressor"), rows in
            the Human3.6M 17-joint order, applied exactly as given.
        body: a :class:`~jregfix.body.base.BodyModel` (e.g. ``SMPLBody``); needed only for
            predictions given as parameters.
        joints: 14 (SPIN/HMR) or 17 (Hedlin et al.).
        chunk_size: frames per batch of the body model.
        device: where joints are computed (``"cpu"``, ``"cuda"``, ...).
    """

    def __init__(
        self,
        regressors: Mapping[str, np.ndarray] | np.ndarray,
        body: BodyModel | None = None,
        joints: int = 14,
        chunk_size: int = 256,
        device: str | torch.device = "cpu",
    ):
        if joints not in JOINT_SETS:
            raise JregfixError(f"joints must be 14 or 17 (--joints), got {joints}")
        if chunk_size < 1:
            raise JregfixError(f"chunk_size (--batch-size) must be at least 1, got {chunk_size}")
        if not isinstance(regressors, Mapping):
            regressors = {"regressor": regressors}
        if not regressors:
            raise JregfixError("give at least one regressor")
        self.body = body
        self.joints = joints
        self.chunk_size = chunk_size
        self.device = torch.device(device)
        self.regressors: dict[str, np.ndarray] = {}
        for name, matrix in regressors.items():
            label = f"regressor '{name}'"
            j = checked_regressor(_to_numpy(matrix), label)
            num_vertices = body.num_vertices if body is not None else j.shape[1]
            self.regressors[str(name)] = validate_regressor(j, num_vertices, label, num_joints=17)
        widths = {j.shape[1] for j in self.regressors.values()}
        if len(widths) > 1:
            raise JregfixError(
                f"the regressors read meshes of different sizes {sorted(widths)}; "
                "they must share one body model"
            )
        self.num_vertices = widths.pop()
        self.stacked = torch.from_numpy(np.concatenate(list(self.regressors.values()))).to(
            self.device
        )
        self._joints_of: Callable | None = None

    def __call__(
        self,
        predictions: Predictions,
        gt: H36MData | np.ndarray,
        *,
        rows: np.ndarray | None = None,
        protocol: str = "p1",
        actions: np.ndarray | None = None,
        sequences: np.ndarray | None = None,
        allow_missing: bool = False,
        name: str = "predictions",
        progress: Callable[[int], None] | None = None,
    ) -> Scores:
        """Score one method's frames (see :func:`score` for the arguments)."""
        params = self.as_params(predictions, name)
        gt17, labels = _ground_truth(gt, actions, sequences)
        rows = _rows(rows, len(params), len(gt17), name)
        keep = _protocol_rows(gt, protocol, len(gt17))
        frames = np.flatnonzero(keep[rows])
        wanted = np.flatnonzero(keep)
        missing = np.setdiff1d(wanted, rows[frames])
        if len(missing) and not allow_missing:
            first = f"GT row {missing[0]}" + (
                f", {gt.imgname[missing[0]]}" if isinstance(gt, H36MData) else ""
            )
            raise JregfixError(
                f"{name}: {len(missing)} of {len(wanted)} protocol frames have no "
                f"prediction (first: {first}); pass --allow-missing "
                "(allow_missing=True) to score only the covered frames"
            )
        if len(frames) == 0:
            raise JregfixError(f"{name}: no frame of protocol {protocol} is covered")
        joints_all = self.regress(params, frames, progress)
        rows = rows[frames]
        index, names = JOINT_SETS[self.joints]
        # select joints, centre, then rows: the memory layout numpy's means reduce over, and
        # so every last digit, stays what earlier releases wrote
        gt_rel = (gt17[:, list(index)] - gt17[:, :1])[rows]
        errors, errors_pa = [], []
        offset = 0
        for j in self.regressors.values():
            pj = joints_all[:, offset : offset + len(j)]
            offset += len(j)
            pj = pj[:, list(index)] - pj[:, :1]
            errors.append(joint_errors(pj, gt_rel) * 1000.0)
            errors_pa.append(pa_joint_errors(pj, gt_rel) * 1000.0)
        return Scores(
            tuple(self.regressors),
            names,
            rows,
            missing,
            np.stack(errors),
            np.stack(errors_pa),
            *(None if a is None else a[rows] for a in labels),
        )

    def as_params(self, predictions: Predictions, name: str) -> BodyParams:
        """Validated :class:`BodyParams` of ``predictions`` (vertices or pose + betas)."""
        if isinstance(predictions, BodyParams):
            params = predictions
        elif isinstance(predictions, Mapping):
            params = params_from_arrays(
                {k: _to_numpy(v) for k, v in predictions.items()},
                name,
                num_joints=getattr(self.body, "num_joints", 24),
                require_pose=False,
            )
        else:
            verts = _to_numpy(predictions)
            if verts.ndim != 3 or verts.shape[-1] != 3 or verts.dtype.kind not in "biuf":
                raise JregfixError(
                    f"{name}: vertices must be a real (N, V, 3) array, got shape "
                    f"{verts.shape} ({verts.dtype})"
                )
            if not np.isfinite(verts).all():
                raise JregfixError(f"{name}: vertices contain NaN or inf")
            params = BodyParams(None, None, vertices=verts, path=name)
        if params.vertices is not None:
            if params.vertices.shape[1] != self.num_vertices:
                raise JregfixError(
                    f"{name}: vertices have {params.vertices.shape[1]} points, "
                    f"the regressors expect {self.num_vertices}"
                )
            return params
        if params.pose is None or params.betas is None:
            raise JregfixError(f"{name}: neither vertices nor pose and betas")
        if self.body is None:
            raise JregfixError(
                f"{name}: no vertices; a body model (--smpl) is needed to pose the parameters"
            )
        if params.betas.shape[1] > self.body.num_betas:
            raise JregfixError(
                f"{name}: betas have {params.betas.shape[1]} coefficients but the "
                f"body model has {self.body.num_betas}"
            )
        return params

    def regress(
        self, params: BodyParams, frames: np.ndarray, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """(len(frames), 17 R, 3) float64 joints of every regressor, stacked in order, for the
        given frames of ``params``; ``progress(done)`` after each chunk."""
        body, pose, betas, vertices = self.body, params.pose, params.betas, params.vertices
        if vertices is not None:

            def joints_of(idx: np.ndarray) -> torch.Tensor:
                verts = torch.from_numpy(vertices[idx]).to(self.device, torch.float64)
                return torch.einsum("kv,nvc->nkc", self.stacked, verts)
        elif body is not None and pose is not None and betas is not None:
            posed = self._posed_joints(body)
            dtype = body.template.dtype

            def joints_of(idx: np.ndarray) -> torch.Tensor:
                rot = pose_to_rotmat(
                    torch.from_numpy(pose[idx]).to(self.device, dtype), body.num_joints
                )
                return posed(
                    rot,
                    fit_betas(torch.from_numpy(betas[idx]).to(self.device, dtype), body.num_betas),
                )
        else:
            raise JregfixError(
                f"{params.path}: no vertices, and no body model with pose and betas to make them"
            )
        out = np.empty((len(frames), self.stacked.shape[0], 3))
        with torch.no_grad():
            for start in range(0, len(frames), self.chunk_size):
                idx = frames[start : start + self.chunk_size]
                out[start : start + len(idx)] = joints_of(idx).cpu().numpy()
                if progress is not None:
                    progress(start + len(idx))
        return out

    def _posed_joints(self, body: BodyModel) -> Callable:
        """rotmat, betas -> (N, 17 R, 3) joints straight from the body, built once (it plans
        which vertices or (joint, bone) pairs each regressor needs)."""
        if self._joints_of is None:
            self._joints_of = joint_regression(
                body, self.stacked, [len(j) for j in self.regressors.values()]
            )
        return self._joints_of


def score(
    predictions: Predictions,
    gt: H36MData | np.ndarray,
    regressors: Mapping[str, np.ndarray] | np.ndarray,
    body: BodyModel | None = None,
    *,
    joints: int = 14,
    protocol: str = "p1",
    rows: np.ndarray | None = None,
    actions: np.ndarray | None = None,
    sequences: np.ndarray | None = None,
    allow_missing: bool = False,
    chunk_size: int = 256,
    device: str | torch.device = "cpu",
    name: str = "predictions",
    progress: Callable[[int], None] | None = None,
) -> Scores:
    """MPJPE / PA-MPJPE (mm) of a method's frames under each regressor (Table I's numbers).

    Args:
        predictions: vertices (N, V, 3) in metres (numpy or torch); or a mapping with ``pose``
            ((N, 72) axis-angle, (N, 24, 3, 3) rotations or 6D, SMPL's 24 joints, global
            orientation first) and ``betas`` (N, S) with S <= ``body.num_betas`` (or
            ``vertices``); or a :class:`~jregfix.io.params.BodyParams`.
        gt: ground-truth joints (M, 17, 3) in metres, Human3.6M 17-joint order (pelvis first);
            or an :class:`~jregfix.io.h36m.H36MData` (``jregfix.load_h36m``), which also gives
            cameras (protocol 2), actions and sequences.
        regressors: {name: (17, V)} (or one (17, V) array).
        body: body model that poses parameter predictions (e.g. ``jregfix.SMPLBody``).
        joints: 14 (SPIN/HMR subset) or 17 (all, Hedlin et al.).
        protocol: ``"p1"`` (every row) or ``"p2"`` (camera 60457274; needs an H36MData).
        rows: (N,) GT row of each prediction (default: prediction i is GT row i, N == M).
        actions, sequences: (M,) labels of the GT rows when ``gt`` is an array (per-action
            tables; bootstrap intervals over sequences).
        allow_missing: score only covered frames when some protocol rows have no prediction.
        name: how error messages name the predictions (e.g. their file).
        progress: called with the number of frames done after each chunk.

    Returns:
        :class:`Scores`: (R, N, K) per-joint errors; ``summary()``, ``per_joint()``,
        ``per_action()``, ``differences()`` reduce them.
    """
    return Scorer(regressors, body, joints, chunk_size, device)(
        predictions,
        gt,
        rows=rows,
        protocol=protocol,
        actions=actions,
        sequences=sequences,
        allow_missing=allow_missing,
        name=name,
        progress=progress,
    )


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _ground_truth(
    gt: H36MData | np.ndarray, actions, sequences
) -> tuple[np.ndarray, tuple[np.ndarray | None, np.ndarray | None]]:
    """(M, 17, 3) GT joints and the rows' (actions, sequences) labels."""
    if isinstance(gt, H36MData):
        if actions is not None or sequences is not None:
            raise JregfixError(
                "actions= and sequences= are for GT arrays; an H36MData carries its own"
            )
        return gt.joints17(), (gt.actions, sequence_labels(gt.keys))
    gt17 = _to_numpy(gt)
    if gt17.ndim != 3 or gt17.shape[1:] != (17, 3) or gt17.dtype.kind not in "biuf":
        raise JregfixError(
            f"gt: joints must be a real (M, 17, 3) array in the Human3.6M "
            f"17-joint order, got shape {gt17.shape} ({gt17.dtype})"
        )
    if not np.isfinite(gt17).all():
        raise JregfixError("gt: joints contain NaN or inf")
    labels = []
    for key, a in (("actions", actions), ("sequences", sequences)):
        if a is not None:
            a = np.asarray(a)
            if a.shape != (len(gt17),):
                raise JregfixError(
                    f"{key}: expected one label per GT row ({len(gt17)},), got shape {a.shape}"
                )
        labels.append(a)
    return gt17.astype(np.float64), tuple(labels)


def _rows(rows, n: int, m: int, name: str) -> np.ndarray:
    """(N,) int64 GT row of each prediction, each row at most once."""
    if rows is None:
        if n != m:
            raise JregfixError(
                f"{name}: {n} frames but the GT has {m} rows; pass rows= (the GT row of each frame)"
            )
        return np.arange(m)
    rows = np.asarray(rows)
    if rows.shape != (n,) or rows.dtype.kind not in "iu":
        raise JregfixError(
            f"{name}: rows must be ({n},) integers, got shape {rows.shape} ({rows.dtype})"
        )
    rows = rows.astype(np.int64)
    if n and (rows.min() < 0 or rows.max() >= m):
        raise JregfixError(f"{name}: rows {rows.min()}..{rows.max()} outside the GT's {m} rows")
    if len(np.unique(rows)) != n:
        raise JregfixError(f"{name}: a GT row appears twice in rows; each frame is scored once")
    return rows


def _protocol_rows(gt: H36MData | np.ndarray, protocol: str, m: int) -> np.ndarray:
    """(M,) bool: the GT rows the protocol scores."""
    if isinstance(gt, H36MData):
        return protocol_mask(gt, protocol)
    if protocol != "p1":
        raise JregfixError(
            f"protocol {protocol!r} selects rows by camera: pass the GT as an "
            "H36MData (jregfix.load_h36m), or select the rows yourself and use p1"
        )
    return np.ones(m, dtype=bool)
