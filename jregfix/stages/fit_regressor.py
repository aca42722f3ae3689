"""`fit-regressor`: a (K, V) joint regressor fitted by exact NNLS on streamed normal equations.

Data: frames n = 1..N with mesh vertices V_n (V, 3) and ground-truth joints X_n (K, 3); the
regressor W (K, V) predicts joints W V_n. Row j's objective (Hedlin et al.'s paper) is a least
squares fit with w_j >= 0 and a term pulling its sum to one,

    sum_n ||(W V_n - X_n)_j||^2 + lam (1^T w_j - 1)^2,    lam = sum_to_one_weight * N,

(the weight is in m^2 per frame: a row sum off by delta costs as much as a delta-metre error on
every frame), or, with ``exact_sum_to_one``, the constraint 1^T w_j = 1 instead of the term.

Frames (default "root-relative"). H36M ground truth is pelvis-centred while meshes live in their
own frame, so every frame carries an unknown translation t_n shared by all joints. We fit

    sum_n min_{t_n} ||W Vc_n + 1 t_n^T - X_n||_F^2,     Vc_n = V_n - 1 m_n^T,

where m_n is the mean of frame n's V vertices. Minimising over t_n gives t_n = mean_j of the
residual, so the data term is sum_n ||C (W Vc_n - X_n)||_F^2 with C = I - 1 1^T / K, the
centring projector over joints (C^2 = C). Centring the meshes first makes the fit invariant to
mesh translation for every W (W 1 m^T would otherwise leak into C W V_n unless all row sums were
equal); for rows summing to one W Vc_n = W V_n - 1 m_n^T, so nothing changes for an exact
regressor, and the numbers stay well conditioned. The term expands to

    tr(C W G W^T) - 2 tr(C W B^T) + tr(C S),  G = sum_n Vc_n Vc_n^T (V, V),
                                              B = sum_n X_n Vc_n^T (K, V), S = sum_n X_n X_n^T,

a quadratic with Hessian C kron G: one vertex Gram matrix shared by every joint; the rows couple
only through the per-frame joint mean. "absolute" mode (meshes and joints already in one frame)
uses the raw V_n and C = I, so the rows separate. The objective is invariant to W -> W + 1 u^T
(a per-frame translation) in root-relative mode; the sum-to-one term or constraint and w >= 0
remove that freedom (a planted sparse regressor with disjoint rows is the unique minimiser).
Nearby vertices of a skinned body move almost rigidly together, so W itself is only weakly
identified by the data (many sparse rows give nearly the same joints); the joints are what the
fit pins down, and the solver still meets the KKT conditions on such degenerate problems.

Streaming: the (3N x V) matrix is never formed. Chunks of frames give A (U, 3n) with the
chunk's centred vertices; G += A A^T (one symmetric rank-3n update), B += X A^T, S += X X^T,
all float64. Partial sums are additive, so shards (``--shard i/n``) save them and ``--merge``
adds them and solves. Only vertices in the union U of the rows' candidate supports enter G.

Support (default ``knn:128``): row j may use only the 128 template vertices nearest the joint's
template location (``radius:R`` metres, plus the 8 nearest, or ``all``). The location is
``init_regressor @ template`` when a regressor is given (ReLU + row-normalised), otherwise the
solution of a pilot fit on up to ``pilot_frames`` evenly spaced frames over ``pilot_vertices``
farthest-point-sampled vertices. Then U has at most K*128 vertices, so G is a few tens of MB.

Solve: :func:`jregfix.geometry.nnls.solve_nnls` (active set) on (C kron G + lam I kron 1 1^T,
C B + lam), jointly over all rows in root-relative mode, per row in absolute mode, to the KKT
conditions at relative tolerance ``tol``. Residuals per joint are RMS 3D distances (mm) over
frames after the per-frame translation, computed from G, B and S.
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from jregfix.body.base import BodyModel, fit_betas
from jregfix.body.rotations import pose_to_rotmat
from jregfix.distributed import Ranks
from jregfix.errors import JregfixError
from jregfix.geometry.exact_sum import ExactSum
from jregfix.geometry.nnls import BlockGramHessian, solve_nnls
from jregfix.io.atomic import read_npz, save_npz, sha256_file, write_json
from jregfix.io.h36m import H36M17_NAMES, TEST_SUBJECTS, TRAIN_SUBJECTS, load_h36m, subject_mask
from jregfix.io.manifest import manifest_path, read_manifest, stage_record, versions
from jregfix.io.params import BodyParams, load_params
from jregfix.io.regressors import (
    effective_regressor,
    load_regressor,
    provenance_path,
    regressor_stats,
    save_regressor,
    validate_regressor,
)

ROOT_RELATIVE = "root-relative"
ABSOLUTE = "absolute"
RADIUS_MIN_VERTICES = 8
Progress = Callable[[int], None]


@dataclass(frozen=True)
class FitConfig:
    """Everything that decides the result (recorded in provenance and shard files)."""

    mode: str = ROOT_RELATIVE
    sum_to_one_weight: float = 1.0
    exact_sum_to_one: bool = False
    support: str = "knn:128"
    pilot_frames: int = 2000
    pilot_vertices: int = 1024
    chunk_size: int = 512
    tol: float = 1e-10

    def validate(self) -> None:
        if self.mode not in (ROOT_RELATIVE, ABSOLUTE):
            raise JregfixError(f"mode must be '{ROOT_RELATIVE}' or '{ABSOLUTE}', not {self.mode!r}")
        if not self.sum_to_one_weight >= 0:
            raise JregfixError(f"--sum-to-one-weight must be >= 0, got {self.sum_to_one_weight}")
        if self.chunk_size <= 0 or self.pilot_frames <= 0 or self.pilot_vertices <= 0:
            raise JregfixError("chunk size, pilot frames and pilot vertices must be positive")
        parse_support(self.support)


# ----------------------------------------------------------------------------- support


def parse_support(spec: str) -> tuple[str, float]:
    """'all' | 'knn:K' | 'radius:R' (metres) -> (kind, value)."""
    kind, _, value = spec.partition(":")
    try:
        if kind == "all" and not value:
            return "all", 0.0
        if kind == "knn" and int(value) > 0:
            return "knn", float(int(value))
        if kind == "radius" and float(value) > 0:
            return "radius", float(value)
    except ValueError:
        pass
    raise JregfixError(f"--support {spec!r}: use 'all', 'knn:K' (K > 0) or 'radius:R' (metres)")


def candidate_rows(template: np.ndarray, locations: np.ndarray, spec: str) -> list[np.ndarray]:
    """Sorted candidate vertex ids per row: template (V, 3), locations (K, 3)."""
    kind, value = parse_support(spec)
    num_vertices = len(template)
    if kind == "all":
        return [np.arange(num_vertices) for _ in locations]
    rows = []
    for loc in locations:
        dist = np.linalg.norm(template - loc, axis=1)
        order = np.argsort(dist, kind="stable")
        if kind == "knn":
            keep = order[: min(int(value), num_vertices)]
        else:
            keep = np.union1d(np.flatnonzero(dist <= value), order[:RADIUS_MIN_VERTICES])
        rows.append(np.sort(keep))
    return rows


def farthest_points(points: np.ndarray, count: int) -> np.ndarray:
    """Deterministic farthest-point sample of ``count`` indices (starting at index 0), sorted."""
    count = min(count, len(points))
    chosen = np.zeros(count, dtype=np.int64)
    dist = np.linalg.norm(points - points[0], axis=1)
    for i in range(1, count):
        chosen[i] = np.argmax(dist)
        dist = np.minimum(dist, np.linalg.norm(points - points[chosen[i]], axis=1))
    return np.sort(chosen)


# ----------------------------------------------------------------------------- meshes


class MeshSource(Protocol):
    """Random access to per-frame meshes: ``meshes(index (n,)) -> (n, V, 3)`` float array."""

    num_frames: int
    num_vertices: int

    def meshes(self, index: np.ndarray) -> np.ndarray: ...


class ArrayMeshes:
    """Meshes already in memory (N, V, 3)."""

    def __init__(self, vertices: np.ndarray):
        self.vertices = vertices
        self.num_frames, self.num_vertices = vertices.shape[:2]

    def meshes(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.vertices[index])


class BodyMeshes:
    """Meshes posed on demand by a body model from per-frame pose (any layout) and betas."""

    def __init__(self, model: BodyModel, pose: np.ndarray, betas: np.ndarray):
        if len(pose) != len(betas):
            raise JregfixError(f"pose has {len(pose)} rows but betas has {len(betas)}")
        self.model, self.pose, self.betas = model, pose, betas
        self.num_frames, self.num_vertices = len(pose), int(model.num_vertices)

    def meshes(self, index: np.ndarray) -> np.ndarray:
        dtype = self.model.template.dtype
        with torch.no_grad():
            rot = pose_to_rotmat(torch.from_numpy(self.pose[index]).to(dtype),
                                 self.model.num_joints)
            betas = fit_betas(torch.from_numpy(self.betas[index]).to(dtype), self.model.num_betas)
            return self.model.vertices(rot, betas).numpy()


# ----------------------------------------------------------------------------- accumulation


@dataclass
class Accumulator:
    """Additive sufficient statistics over frames (module docstring): G, B, S and N.

    vertices (U,) sorted mesh vertex ids of G's rows; gram G (U, U); cross B (K, U);
    joints_gram S (K, K); centred: meshes were centred per frame (root-relative mode).
    The sums are exact (geometry/exact_sum.py) over per-chunk float64 products, and each
    product runs on one BLAS thread (a multi-threaded GEMM rounds differently), so shards and
    ranks that cover the same chunks give bit-identical sums on any thread count.
    """

    vertices: np.ndarray
    sums: dict[str, ExactSum]
    frames: int = 0
    centred: bool = True

    KEYS = ("gram", "cross", "joints_gram")

    @classmethod
    def empty(cls, vertices: np.ndarray, num_joints: int, centred: bool) -> Accumulator:
        u = len(vertices)
        shapes = {"gram": (u, u), "cross": (num_joints, u), "joints_gram": (num_joints,) * 2}
        return cls(np.asarray(vertices, dtype=np.int64),
                   {k: ExactSum(s) for k, s in shapes.items()}, 0, centred)

    @property
    def gram(self) -> np.ndarray:
        return self.sums["gram"].value()

    @property
    def cross(self) -> np.ndarray:
        return self.sums["cross"].value()

    @property
    def joints_gram(self) -> np.ndarray:
        return self.sums["joints_gram"].value()

    def add(self, meshes: np.ndarray, joints: np.ndarray) -> None:
        """meshes (n, V, 3), joints (n, K, 3): one rank-3n update of every sum."""
        n = len(meshes)
        sub = meshes[:, self.vertices, :].astype(np.float64)
        if self.centred:
            sub -= meshes.mean(axis=1, dtype=np.float64)[:, None, :]
        a = sub.transpose(1, 0, 2).reshape(len(self.vertices), 3 * n)
        x = np.asarray(joints, dtype=np.float64).transpose(1, 0, 2).reshape(joints.shape[1], 3 * n)
        with threadpool_limits(1, user_api="blas"):
            gram, cross, joints_gram = a @ a.T, x @ a.T, x @ x.T  # a @ a.T: a symmetric update
        self.sums["gram"].add(gram)
        self.sums["cross"].add(cross)
        self.sums["joints_gram"].add(joints_gram)
        self.frames += n

    def merge(self, other: Accumulator) -> None:
        if not np.array_equal(self.vertices, other.vertices) or self.centred != other.centred:
            raise JregfixError("partial accumulations use different vertices or modes")
        for key in self.KEYS:
            self.sums[key].merge(other.sums[key])
        self.frames += other.frames

    def all_reduce(self, ranks: Ranks) -> None:
        """Sum the partial accumulations of every rank (exact: the limbs add without rounding)."""
        for key in self.KEYS:
            limbs = torch.from_numpy(self.sums[key].limbs)
            self.sums[key].limbs = ranks.all_reduce_sum(limbs).numpy()
        self.frames = int(ranks.all_reduce_sum(torch.tensor([self.frames], dtype=torch.int64)))


def frame_chunks(index: np.ndarray, chunk_size: int) -> list[np.ndarray]:
    """``index`` cut into chunks of ``chunk_size`` frames: the unit every split is made of."""
    return [index[s:s + chunk_size] for s in range(0, len(index), chunk_size)]


def accumulate(source: MeshSource, joints: np.ndarray, vertices: np.ndarray, centred: bool,
               index: np.ndarray, chunk_size: int = 512, progress: Progress | None = None,
               ranks: Ranks | None = None, shard: tuple[int, int] | None = None) -> Accumulator:
    """Sums over frames ``index`` of ``source`` and ``joints`` (N, K, 3), chunk by chunk.

    ``shard`` (i, n) keeps the i-th of n contiguous blocks of chunks; ``ranks`` splits the
    chunks the same way over a distributed job and all-reduces, so every rank returns the
    sums over all of ``index``. Either way the sums equal the single-process ones bit for bit.
    """
    chunks = frame_chunks(np.asarray(index), chunk_size)
    mine = range(len(chunks))
    if shard is not None:
        mine = np.array_split(np.arange(len(chunks)), shard[1])[shard[0]]
    ranks = ranks or Ranks()
    mine = ranks.split(np.asarray(mine, dtype=np.int64))
    acc = Accumulator.empty(vertices, joints.shape[1], centred)
    for c in mine:
        rows = chunks[c]
        meshes = source.meshes(rows)
        if meshes.shape[1:] != (source.num_vertices, 3):
            raise JregfixError(f"meshes have shape {meshes.shape[1:]}, expected "
                               f"({source.num_vertices}, 3)")
        if not np.isfinite(meshes).all():
            bad = rows[~np.isfinite(meshes.reshape(len(rows), -1)).all(1)]
            raise JregfixError(f"mesh of frame {bad[0]} has NaN/inf vertices (check its pose)")
        acc.add(meshes, joints[rows])
        if progress is not None:
            progress(len(rows))
    acc.all_reduce(ranks)
    return acc


# ----------------------------------------------------------------------------- solve


@dataclass
class Solution:
    """The regressor (K, V) and its diagnostics (JSON-ready)."""

    regressor: np.ndarray
    diagnostics: dict = field(default_factory=dict)


def solve_accumulated(acc: Accumulator, rows: list[np.ndarray], num_vertices: int,
                      config: FitConfig) -> Solution:
    """Solve every row's NNLS from the sums; ``rows[k]`` are mesh vertex ids within acc."""
    gram, cross = acc.gram, acc.cross
    k = cross.shape[0]
    if len(rows) != k:
        raise JregfixError(f"{len(rows)} candidate sets for {k} joints")
    if acc.frames == 0:
        raise JregfixError("no frames were accumulated")
    local = [np.searchsorted(acc.vertices, r) for r in rows]
    for j, (r, loc) in enumerate(zip(rows, local, strict=True)):
        if len(r) == 0 or (loc >= len(acc.vertices)).any() or \
                not np.array_equal(acc.vertices[np.minimum(loc, len(acc.vertices) - 1)], r):
            raise JregfixError(f"row {j}: candidate vertices are not in the accumulated set")
    coupling = _coupling(k, acc.centred)
    penalty = 0.0 if config.exact_sum_to_one else config.sum_to_one_weight * acc.frames
    lin = coupling @ cross
    blocks = [range(k)] if acc.centred else [[j] for j in range(k)]
    w_local = [np.zeros(len(loc)) for loc in local]
    solver_info, iterations = [], 0
    for block in blocks:
        hess = BlockGramHessian(gram, coupling[np.ix_(block, block)],
                                [local[j] for j in block], penalty)
        c = np.concatenate([lin[j, local[j]] for j in block]) + penalty
        res = solve_nnls(hess, c, groups=hess.row_of, exact=config.exact_sum_to_one,
                         tol=config.tol)
        iterations += res.iterations
        d = _reduced_gradient(hess, c, res.w, config.exact_sum_to_one)
        for pos, j in enumerate(block):
            sel = hess.row_of == pos
            w_local[j] = res.w[sel]
            solver_info.append((j, _violation(d[sel], res.w[sel]), res.scale, res.converged))
    regressor = np.zeros((k, num_vertices))
    w_u = np.zeros((k, len(acc.vertices)))
    for j in range(k):
        regressor[j, rows[j]] = w_local[j]
        w_u[j, local[j]] = w_local[j]
    diag = _diagnostics(acc, gram, cross, w_u, coupling, penalty, sorted(solver_info),
                        [len(r) for r in rows])
    diag["solver_iterations"] = iterations
    return Solution(regressor, diag)


def _coupling(k: int, centred: bool) -> np.ndarray:
    return np.eye(k) - (1.0 / k if centred else 0.0)


def _reduced_gradient(hess, c, w, exact):
    g = hess.matvec(w) - c
    if not exact:
        return g
    on = w > 0
    nu = (np.bincount(hess.row_of[on], weights=g[on], minlength=hess.num_rows)
          / np.maximum(np.bincount(hess.row_of[on], minlength=hess.num_rows), 1))
    return g - nu[hess.row_of]


def _violation(d, w):
    on = w > 0
    return max(float(-d[~on].min(initial=0.0)), float(np.abs(d[on]).max(initial=0.0)),
               float(-w.min(initial=0.0)), 0.0)


def _diagnostics(acc, gram, cross, w_u, coupling, penalty, solver_info, candidates) -> dict:
    # sum_n R_n R_n^T with R_n = W Vc_n - X_n, then the per-frame translation removed by C.
    rr = w_u @ gram @ w_u.T - w_u @ cross.T - cross @ w_u.T + acc.joints_gram
    sq = np.maximum(np.diag(coupling @ rr @ coupling), 0.0)
    sums = w_u.sum(1)
    k = len(sums)
    names = H36M17_NAMES if k == len(H36M17_NAMES) else tuple(f"joint {j}" for j in range(k))
    per_joint = []
    for j, viol, scale, _ in solver_info:
        per_joint.append({
            "joint": names[j],
            "rms_mm": float(1000.0 * np.sqrt(sq[j] / acc.frames)),
            "nonzeros": int((w_u[j] > 0).sum()),
            "row_sum": float(sums[j]),
            "candidates": int(candidates[j]),
            "kkt_violation": viol,
            "kkt_relative": viol / scale,
        })
    return {
        "frames": int(acc.frames),
        "objective": float(sq.sum() + penalty * ((sums - 1.0) ** 2).sum()),
        "rms_mm_all_joints": float(1000.0 * np.sqrt(sq.sum() / (acc.frames * k))),
        "lambda": penalty,
        "kkt_relative_max": max(p["kkt_relative"] for p in per_joint),
        "converged": all(info[3] for info in solver_info),
        "union_vertices": int(len(acc.vertices)),
        "per_joint": per_joint,
    }


# ----------------------------------------------------------------------------- in-memory fit


@dataclass
class SupportChoice:
    rows: list[np.ndarray]
    locations: np.ndarray | None
    source: str


def choose_support(source: MeshSource, joints: np.ndarray, template: np.ndarray,
                   index: np.ndarray, config: FitConfig,
                   init_regressor: np.ndarray | None = None,
                   candidates: list[np.ndarray] | None = None,
                   ranks: Ranks | None = None) -> SupportChoice:
    """Candidate vertices per row (module docstring: support); ``candidates`` overrides."""
    k = joints.shape[1]
    if candidates is not None:
        if len(candidates) != k:
            raise JregfixError(f"{len(candidates)} candidate sets for {k} joints")
        return SupportChoice([np.unique(np.asarray(c, dtype=np.int64)) for c in candidates],
                             None, "explicit")
    if parse_support(config.support)[0] == "all":
        return SupportChoice(candidate_rows(template, np.zeros((k, 3)), "all"), None, "all")
    if init_regressor is not None:
        if init_regressor.shape[0] != k:
            raise JregfixError(f"init regressor has {init_regressor.shape[0]} rows for {k} joints")
        locs = effective_regressor(init_regressor) @ template
        return SupportChoice(candidate_rows(template, locs, config.support), locs,
                             "init regressor")
    pick = np.unique(np.linspace(0, len(index) - 1, min(len(index), config.pilot_frames))
                     .round().astype(np.int64))
    coarse = farthest_points(template, config.pilot_vertices)
    acc = accumulate(source, joints, coarse, config.mode == ROOT_RELATIVE, index[pick],
                     config.chunk_size, ranks=ranks)
    pilot = solve_accumulated(acc, [coarse] * k, len(template), config).regressor
    sums = pilot.sum(1, keepdims=True)
    if (sums <= 0).any():
        raise JregfixError("the pilot fit left a joint without weights; pass --init-regressor")
    locs = (pilot / sums) @ template
    return SupportChoice(candidate_rows(template, locs, config.support), locs,
                         f"pilot fit ({len(pick)} frames, {len(coarse)} vertices)")


def fit_regressor(source: MeshSource, joints: np.ndarray, template: np.ndarray,
                  config: FitConfig = FitConfig(), index: np.ndarray | None = None,
                  init_regressor: np.ndarray | None = None,
                  candidates: list[np.ndarray] | None = None,
                  progress: Progress | None = None,
                  ranks: Ranks | None = None) -> tuple[Solution, SupportChoice]:
    """Support, accumulation and solve over frames ``index`` (default: all).

    joints (N, K, 3) metres; template (V, 3) rest vertices (for the support); returns the
    solution (regressor (K, V)) with timing and memory in its diagnostics. With ``ranks`` of a
    distributed job, each rank accumulates its block of chunks, the sums are all-reduced and
    every rank solves the same system: the result is bit-identical to the single-process fit.
    """
    config.validate()
    joints = _check_joints(joints, source.num_frames)
    index = np.arange(source.num_frames) if index is None else np.asarray(index)
    t0 = time.perf_counter()
    support = choose_support(source, joints, template, index, config, init_regressor,
                             candidates, ranks)
    t1 = time.perf_counter()
    union = np.unique(np.concatenate(support.rows))
    acc = accumulate(source, joints, union, config.mode == ROOT_RELATIVE, index,
                     config.chunk_size, progress, ranks)
    t2 = time.perf_counter()
    sol = solve_accumulated(acc, support.rows, len(template), config)
    t3 = time.perf_counter()
    sol.diagnostics["time_s"] = {"support": t1 - t0, "accumulate": t2 - t1, "solve": t3 - t2,
                                 "total": t3 - t0}
    sol.diagnostics["peak_rss_mb"] = peak_rss_mb()
    return sol, support


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _check_joints(joints: np.ndarray, num_frames: int) -> np.ndarray:
    joints = np.asarray(joints, dtype=np.float64)
    if joints.ndim != 3 or joints.shape[2] != 3:
        raise JregfixError(f"GT joints have shape {joints.shape}, expected (N, K, 3)")
    if len(joints) != num_frames:
        raise JregfixError(f"GT joints have {len(joints)} rows but there are {num_frames} meshes")
    if not np.isfinite(joints).all():
        bad = np.flatnonzero(~np.isfinite(joints.reshape(len(joints), -1)).all(1))
        raise JregfixError(f"GT joints have NaN/inf in {len(bad)} frame(s), first at row {bad[0]}")
    return joints


# ----------------------------------------------------------------------------- files


@dataclass
class Inputs:
    """Everything read from disk, aligned and filtered (leakage guard applied)."""

    source: MeshSource
    joints: np.ndarray
    template: np.ndarray
    index: np.ndarray
    subjects: dict
    record: dict
    init_regressor: np.ndarray | None
    candidates: list[np.ndarray] | None = None


def load_inputs(params: str | Path, gt: str | Path, smpl: str | Path | None, out: str | Path,
                config: FitConfig, subjects: list[str] | None = None,
                allow_test_subjects: bool = False,
                init_regressor: str | Path | None = None, body: BodyModel | None = None,
                candidates: list[np.ndarray] | None = None) -> Inputs:
    """Read GT and params, check row alignment, select subjects, guard against leakage.

    Meshes: posed by ``body`` (any BodyModel, e.g. Anny) or the SMPL model file ``smpl`` from
    the params' pose and betas, else the params' own ``vertices`` (then the first frame's mesh
    stands in for the template of the support). ``candidates``: per-joint vertex supports that
    replace the pilot fit (e.g. around a body model's anatomical joints).
    """
    config.validate()
    chosen = list(subjects) if subjects else list(TRAIN_SUBJECTS)
    leaked = sorted(set(chosen) & set(TEST_SUBJECTS))
    if leaked and not allow_test_subjects:
        raise JregfixError(f"subjects {leaked} are Human3.6M test subjects; fitting on them "
                           "leaks into evaluation (pass --allow-test-subjects to do it anyway)")
    _guard_meshes_not_from(params, out)
    data = load_h36m(gt)
    body_params = load_params(params, require_pose=False)
    if len(body_params) != len(data):
        raise JregfixError(f"{params} has {len(body_params)} rows but {gt} has {len(data)}; "
                           "the rows must be the same frames in the same order")
    _check_imgnames(body_params, data.imgname, params, gt)
    mask = subject_mask(data, chosen)
    if not mask.any():
        raise JregfixError(f"{gt}: no frames of subjects {chosen}")
    model = body
    if model is None and smpl is not None:
        from jregfix.body.smpl import SMPLBody

        model = SMPLBody(smpl)
    template = None if model is None else model.template.detach().double().numpy()
    if body_params.pose is not None and model is not None:
        source: MeshSource = BodyMeshes(model, body_params.pose, body_params.betas)
    elif body_params.vertices is not None:
        source = ArrayMeshes(body_params.vertices)
        if template is None:
            template = body_params.vertices[0].astype(np.float64)
    else:
        raise JregfixError(f"{params} has poses but no vertices: pass --smpl MODEL to pose them")
    init = None
    if init_regressor is not None:
        init = validate_regressor(load_regressor(init_regressor), source.num_vertices,
                                  str(init_regressor), num_joints=17)
    index = np.flatnonzero(mask)
    names, counts = np.unique(data.subjects[index], return_counts=True)
    record = stage_record("fit-regressor", {"params": params, "gt": gt, "smpl": smpl,
                                            "init_regressor": init_regressor},
                          {**asdict(config), "subjects": chosen,
                           "body": getattr(model, "name", None)})
    return Inputs(source, data.joints17(), template, index,
                  {str(n): int(c) for n, c in zip(names, counts, strict=True)}, record, init,
                  candidates)


def _guard_meshes_not_from(params: str | Path, out: str | Path) -> None:
    """Refuse meshes whose recorded inputs include the regressor being fitted."""
    out = Path(out).resolve()
    out_hash = sha256_file(out) if out.is_file() else None
    for doc_path in (manifest_path(params), provenance_path(params)):
        doc = read_manifest(doc_path)
        inputs = (doc or {}).get("inputs", {})
        for name, entry in inputs.items() if isinstance(inputs, dict) else ():
            if not isinstance(entry, dict):
                continue
            same_path = entry.get("path") and Path(entry["path"]).resolve() == out
            if same_path or (out_hash is not None and entry.get("sha256") == out_hash):
                raise JregfixError(f"{params} was produced with {out} (input '{name}' in "
                                   f"{doc_path}); a regressor must not be fitted to meshes it "
                                   "helped produce")


def _check_imgnames(body_params: BodyParams, gt_names: np.ndarray, params, gt) -> None:
    if body_params.imgname is None:
        return
    base = np.vectorize(lambda s: str(s).replace("\\", "/").rsplit("/", 1)[-1])
    a, b = base(body_params.imgname), base(gt_names)
    bad = np.flatnonzero(a != b)
    if len(bad):
        i = bad[0]
        raise JregfixError(f"row {i}: {params} has image {a[i]!r} but {gt} has {b[i]!r}; the "
                           "rows must be the same frames in the same order")


def run_fit(inputs: Inputs, out: str | Path, config: FitConfig,
            report_path: str | Path | None = None,
            progress: Progress | None = None, ranks: Ranks | None = None) -> dict:
    """Fit on all selected frames and write the regressor, provenance and report.

    Under a distributed job every rank calls this; rank 0 writes, the others wait for it.
    """
    ranks = ranks or Ranks()
    sol, support = fit_regressor(inputs.source, inputs.joints, inputs.template, config,
                                 inputs.index, inputs.init_regressor, inputs.candidates,
                                 progress=progress, ranks=ranks)
    report = _report(inputs.record, config, sol, support.source, inputs.subjects)
    report["processes"] = {"world_size": ranks.world_size, "backend": ranks.backend}
    if ranks.is_main:
        _write_outputs(out, sol.regressor, report, report_path)
    ranks.barrier()
    return report


def run_shard(inputs: Inputs, out: str | Path, config: FitConfig, shard: tuple[int, int],
              progress: Progress | None = None, ranks: Ranks | None = None) -> dict:
    """Accumulate shard i of n (a contiguous block of chunks) and save the partial sums to
    ``out`` (.npz); ``ranks`` share the shard's chunks (rank 0 writes)."""
    ranks = ranks or Ranks()
    i, n = shard
    if Path(out).suffix != ".npz":
        raise JregfixError(f"{out}: a shard's partial sums are written as .npz")
    config.validate()
    joints = _check_joints(inputs.joints, inputs.source.num_frames)
    support = choose_support(inputs.source, joints, inputs.template, inputs.index, config,
                             inputs.init_regressor, ranks=ranks)
    union = np.unique(np.concatenate(support.rows))
    acc = accumulate(inputs.source, joints, union, config.mode == ROOT_RELATIVE, inputs.index,
                     config.chunk_size, progress, ranks, shard)
    meta = {"record": inputs.record, "config": asdict(config), "shard": [i, n],
            "num_vertices": inputs.source.num_vertices, "subjects": inputs.subjects,
            "support_source": support.source, "frames": acc.frames}
    if ranks.is_main:
        save_npz(out, compressed=False, vertices=acc.vertices, frames=np.int64(acc.frames),
                 centred=np.bool_(acc.centred), rows_flat=np.concatenate(support.rows),
                 rows_offsets=np.cumsum([0] + [len(r) for r in support.rows]),
                 meta=np.array(json.dumps(meta, sort_keys=True)),
                 **{f"{k}_limbs": acc.sums[k].limbs for k in Accumulator.KEYS})
    ranks.barrier()
    return meta


def run_merge(parts: list[str | Path], out: str | Path, report_path: str | Path | None = None,
              num_vertices: int | None = None) -> dict:
    """Add shard files (all of one run, each shard once), solve, write outputs."""
    if not parts:
        raise JregfixError("--merge needs the shard files")
    t0 = time.perf_counter()
    loaded = [_load_part(p) for p in parts]
    meta0, acc, rows = loaded[0]
    for p, (meta, other, other_rows) in zip(parts[1:], loaded[1:], strict=True):
        same = (meta["config"] == meta0["config"] and meta["shard"][1] == meta0["shard"][1]
                and _fingerprint(meta) == _fingerprint(meta0)
                and all(np.array_equal(a, b) for a, b in zip(rows, other_rows, strict=True)))
        if not same:
            raise JregfixError(f"{p} belongs to a different run than {parts[0]} "
                               "(inputs, config or support differ)")
        acc.merge(other)
    n = meta0["shard"][1]
    seen = sorted(m["shard"][0] for m, _, _ in loaded)
    if seen != list(range(n)):
        raise JregfixError(f"--merge needs shards 0..{n - 1} once each; got {seen}")
    if num_vertices is not None and num_vertices != meta0["num_vertices"]:
        raise JregfixError(f"shards were fitted on {meta0['num_vertices']} vertices, but the body "
                           f"model has {num_vertices}")
    config = FitConfig(**meta0["config"])
    t1 = time.perf_counter()
    sol = solve_accumulated(acc, rows, meta0["num_vertices"], config)
    sol.diagnostics["time_s"] = {"load": t1 - t0, "solve": time.perf_counter() - t1}
    sol.diagnostics["peak_rss_mb"] = peak_rss_mb()
    report = _report(meta0["record"], config, sol, meta0["support_source"], meta0["subjects"])
    report["merged_from"] = [{"path": str(Path(p).resolve()), "sha256": sha256_file(p)}
                             for p in parts]
    _write_outputs(out, sol.regressor, report, report_path)
    return report


def _fingerprint(meta: dict) -> dict:
    rec = meta["record"]
    return {k: v["sha256"] for k, v in rec["inputs"].items()} | {"config": rec["config"]}


def _load_part(path) -> tuple[dict, Accumulator, list[np.ndarray]]:
    path = Path(path)
    arrays = read_npz(path, "fit-regressor shard file")
    try:
        meta = json.loads(str(arrays["meta"]))
        vertices = arrays["vertices"]
        k = len(arrays["rows_offsets"]) - 1
        shapes = {"gram": (len(vertices),) * 2, "cross": (k, len(vertices)),
                  "joints_gram": (k, k)}
        sums = {key: ExactSum(shape, arrays[f"{key}_limbs"]) for key, shape in shapes.items()}
        acc = Accumulator(vertices, sums, int(arrays["frames"]), bool(arrays["centred"]))
        offsets = arrays["rows_offsets"]
        rows = [arrays["rows_flat"][a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    except (KeyError, ValueError, OSError, json.JSONDecodeError) as exc:
        raise JregfixError(f"{path}: not a fit-regressor shard file ({exc})") from None
    except JregfixError as exc:
        raise JregfixError(f"{path}: inconsistent shapes in the shard file ({exc})") from None
    return meta, acc, rows


def _report(record: dict, config: FitConfig, sol: Solution, support_source: str,
            subjects: dict) -> dict:
    diag = sol.diagnostics
    return {
        **record,
        "versions": versions(),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": {
            "objective": "min sum_n ||C (W Vc_n - X_n)||^2 + lam sum_j (1^T w_j - 1)^2, W >= 0"
            if config.mode == ROOT_RELATIVE else
            "min sum_n ||W V_n - X_n||^2 + lam sum_j (1^T w_j - 1)^2, W >= 0",
            "frame": config.mode,
            "translation": "per-frame translation eliminated (meshes centred on their vertex "
            "mean, joints compared after removing the per-frame mean residual)"
            if config.mode == ROOT_RELATIVE else "none (meshes and joints share a frame)",
            "sum_to_one": "exact constraint" if config.exact_sum_to_one else
            f"penalty, lam = {config.sum_to_one_weight} * frames",
            "support": config.support,
            "support_locations": support_source,
            "solver": "active-set NNLS on the normal equations (float64)",
            "kkt_tolerance_relative": config.tol,
        },
        # refine refuses regressors whose meshes came from refine (the paper's drift guard)
        "params_stage": _params_stage(record),
        "leakage_guard": {"subjects": subjects, "test_subjects_used": sorted(
            set(subjects) & set(TEST_SUBJECTS))},
        "result": diag,
        "regressor_stats": {k: v for k, v in regressor_stats(sol.regressor).items()
                            if k != "row_sums"},
    }


def _params_stage(record: dict) -> str | None:
    """The stage that wrote the params file (from its manifest), e.g. 'spin' or 'refine'."""
    entry = record.get("inputs", {}).get("params")
    if not entry:
        return None
    doc = read_manifest(manifest_path(entry["path"]))
    return (doc or {}).get("stage")


def _write_outputs(out, regressor, report, report_path) -> None:
    save_regressor(out, regressor, report)
    if report_path is not None:
        write_json(report_path, report)
