"""A (K, V) joint regressor fitted to meshes and joints by exact NNLS on streamed normal equations.

Arrays in, arrays out: :func:`fit_regressor` takes meshes (N, V, 3) (or a :class:`MeshSource`
that produces them chunk by chunk), joints (N, K, 3) in metres and a rest template (V, 3), and
returns a :class:`FitResult`. The `fit-regressor` stage (``jregfix.stages.fit_regressor``) reads
the files, shards and merges around it.

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
uses the raw V_n and C = I, so the rows separate.

Identifiability (root-relative mode). Two changes of W leave every measured number unchanged:
W -> W + a 1^T (1^T Vc_n = 0), which only the sum-to-one term or constraint fixes, and
W -> W + 1 D^T for any D (V,) with 1^T D = 0: it adds the same vector D^T Vc_n to every joint
of frame n (a translation, removed by C) and keeps every row sum. Non-negativity pins D down
only when the rows' supports are disjoint (then D >= 0 everywhere, so D = 0); rows that share
vertices, as the global optimum's often do, can trade weight along D. What the fit determines
is therefore the joints up to one translation per frame -- the root-relative joints
C W Vc_n, equivalently W V_n minus its pelvis row -- plus the row sums. Nothing downstream
uses the undetermined part: evaluate, refine and the figures subtract the regressed pelvis (D
cancels exactly), the report's residuals apply C, and the support (from a location W @
template, which does depend on D) only steers where the certified search starts. Absolute
joint positions W V_n are not determined by root-relative data; "absolute" mode determines
them. Besides, nearby vertices of a skinned body move almost rigidly together, so W is only
weakly identified even where it is unique (many sparse rows give nearly the same joints).

Streaming: the (3N x V) matrix is never formed. Chunks of frames give A (U, 3n) with the
chunk's centred vertices; G += A A^T (one symmetric rank-3n update), B += X A^T, S += X X^T,
all float64 and summed exactly (order-free, ``geometry/exact_sum.py``). Partial sums are
additive, so shards (the stage's ``--shard i/n``) save them and ``--merge`` adds them and
solves. Only vertices in the union U of the rows' candidate supports enter G.

Support (default ``knn:128``): row j starts from the 128 template vertices nearest the joint's
template location (``radius:R`` metres, plus the 8 nearest, or ``all``). The location is
``init_regressor @ template`` when a regressor is given (ReLU + row-normalised), otherwise the
solution of a pilot fit on up to ``pilot_frames`` evenly spaced frames over ``pilot_vertices``
farthest-point-sampled vertices. Then U has at most K*128 vertices, so G is a few tens of MB.

Solve: :func:`jregfix.geometry.nnls.solve_nnls` (active set) on (C kron G + lam I kron 1 1^T,
C B + lam), jointly over all rows in root-relative mode, per row in absolute mode, to the KKT
conditions at relative tolerance ``tol``. Residuals per joint are RMS 3D distances (mm) over
frames after the per-frame translation, computed from G, B and S.

Certification (``certify``, default on): the support is a guess, so the solution is then
checked against all V vertices. One streamed pass computes the objective's gradient for every
(row, vertex): per chunk the residuals R = C (W A_S - X) (K, 3n) on the used vertices S and the
product R A^T (K x 3n x V), summed exactly over chunks (= C (W G - B) over all V, without G),
plus lam (1^T w_j - 1). With the reduced gradient d (minus the row's multiplier in exact mode)
and the problem scale s = max(|C B + lam|, diag H) over all V, the KKT conditions over all V
are d >= -tol s off the support and |d| <= tol s on it (``nnls.kkt_violation_from``). Any
vertex outside a row's candidates with d < -tol s is a violation: then every row is allowed
all of U, the steepest violators outside U (up to ``max_new_per_row`` per row, ranked by
d / sqrt(diag H), ``new_vertex_spacing`` apart on the template) are summed into G by the next
pass -- the same pass that prices the new solution -- and the problem is re-solved from the
warm start (column generation). It stops when no vertex violates (``kkt_global_relative_max``
<= tol): the regressor is then the optimum over all V vertices, not only inside the guess.
Every pass is exact and order-free like the accumulation, so ranks, shards and ``--merge`` take
the same steps and give the same bits; ``--merge`` has only the sums over U, so it needs the
shards' inputs to stream the frames for the certification passes (``certify=False``, the CLI's
``--no-certify``, solves on the candidates only and says so).

Cost: a pass streams (and poses) every frame again, at about half the accumulation's cost per
frame (its product is K x 3n x V instead of the union's U x 3n x U), so the certified fit costs
the support-only fit plus (rounds + 1) passes and the re-solves. The rounds depend on the data:
when the first support holds the optimum, one pass confirms it; when the optimum reaches beyond
it -- a planted world's far vertices, or the noise-fitting vertices a noisy world's exact
optimum picks up -- each round's re-solve moves W and tips further vertices over, typically 5
to 10 rounds (the diagnostics' ``certification_time_s`` splits passes and re-solves).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from jregfix.body.base import BodyModel, batch_vertices
from jregfix.distributed import Ranks
from jregfix.errors import JregfixError
from jregfix.geometry.exact_sum import ExactSum
from jregfix.geometry.nnls import (
    BlockGramHessian,
    kkt_violation_from,
    reduced_gradient,
    solve_nnls,
)
from jregfix.io.h36m import H36M17_NAMES
from jregfix.io.regressors import effective_regressor

ROOT_RELATIVE = "root-relative"
ABSOLUTE = "absolute"
RADIUS_MIN_VERTICES = 8
POSE_BATCH = 64  # frames posed at once by BodyMeshes
MESH_CACHE_MB = 768  # posed meshes kept between a fit's passes (the first chunks of each rank)
FrameCounter = Callable[[int], None]  # called with the frame count of each chunk streamed


@dataclass(frozen=True)
class FitConfig:
    """Everything that decides the result (recorded in provenance and shard files).

    mode: "root-relative" (one unknown translation per frame is eliminated) or "absolute"
    (meshes and joints share a frame); sum_to_one_weight: lam / N in m^2 per frame, or
    exact_sum_to_one: rows constrained to sum to one; support: each row's first candidates,
    "knn:K", "radius:R" (metres) or "all"; pilot_frames, pilot_vertices: the pilot fit that
    places the support without an init regressor; chunk_size: frames per streamed chunk (the
    unit of the exact sums, shards and ranks); tol: KKT tolerance relative to the problem's
    scale; certify: check (and reach) the optimum over all V vertices, in at most max_rounds
    rounds adding at most max_new_per_row vertices per row, new_vertex_spacing metres apart.
    """

    mode: str = ROOT_RELATIVE
    sum_to_one_weight: float = 1.0
    exact_sum_to_one: bool = False
    support: str = "knn:128"
    pilot_frames: int = 2000
    pilot_vertices: int = 1024
    chunk_size: int = 512
    tol: float = 1e-10
    certify: bool = True
    max_rounds: int = 30
    max_new_per_row: int = 16
    new_vertex_spacing: float = 0.02

    def validate(self) -> None:
        if self.mode not in (ROOT_RELATIVE, ABSOLUTE):
            raise JregfixError(f"mode must be '{ROOT_RELATIVE}' or '{ABSOLUTE}', not {self.mode!r}")
        if not 0 <= self.sum_to_one_weight < float("inf"):
            raise JregfixError(
                "sum_to_one_weight (--sum-to-one-weight) must be a finite "
                "number >= 0, got "
                f"{self.sum_to_one_weight}"
            )
        if self.chunk_size <= 0 or self.pilot_frames <= 0 or self.pilot_vertices <= 0:
            raise JregfixError("chunk size, pilot frames and pilot vertices must be positive")
        if self.max_rounds < 0 or self.max_new_per_row <= 0 or not self.new_vertex_spacing >= 0:
            raise JregfixError(
                "certification needs max_rounds >= 0, max_new_per_row > 0 and "
                "new_vertex_spacing >= 0"
            )
        parse_support(self.support)


# ----------------------------------------------------------------------------- support


@dataclass
class SupportChoice:
    """Where each row's search starts: ``rows`` (K arrays of sorted vertex ids), the joints'
    template ``locations`` (K, 3) they surround (None when given explicitly or 'all'), and
    ``source``, how they were chosen (e.g. "pilot fit (2000 frames, 1024 vertices)")."""

    rows: list[np.ndarray]
    locations: np.ndarray | None
    source: str


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
    raise JregfixError(
        f"support (--support) {spec!r}: use 'all', 'knn:K' (K > 0) or 'radius:R' (metres)"
    )


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
    """Meshes already in memory: vertices (N, V, 3), any float dtype (summed in float64)."""

    def __init__(self, vertices: np.ndarray):
        self.vertices = vertices
        self.num_frames, self.num_vertices = vertices.shape[:2]

    def meshes(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.vertices[index])


class BodyMeshes:
    """Meshes posed on demand by a body model: pose (N, ...) in any layout
    :func:`jregfix.body.base.batch_vertices` accepts, betas (N, S') with S' <= the model's."""

    posed = True  # expensive to produce: a fit's passes keep what fits in MESH_CACHE_MB

    def __init__(self, model: BodyModel, pose: np.ndarray, betas: np.ndarray):
        if len(pose) != len(betas):
            raise JregfixError(f"pose has {len(pose)} rows but betas has {len(betas)}")
        self.model, self.pose, self.betas = model, pose, betas
        self.num_frames, self.num_vertices = len(pose), int(model.num_vertices)

    def meshes(self, index: np.ndarray) -> np.ndarray:
        # a few frames at a time: skinning's temporaries are ~8x the meshes (512 frames:
        # +320 MB peak at once, +160 MB in batches of 64)
        return batch_vertices(
            self.model,
            torch.from_numpy(self.pose[index]),
            torch.from_numpy(self.betas[index]),
            chunk_size=POSE_BATCH,
        ).numpy()


# ----------------------------------------------------------------------------- streaming


@dataclass
class Frames:
    """The frames a fit streams over: meshes, GT joints (N, K, 3), the selected rows ``index``,
    cut into ``chunk_size`` chunks; ``ranks`` share the chunks; ``progress`` is called with
    the frame count of every chunk this process streams.

    With ``keep_meshes``, chunks of sources that pose meshes (``posed``) are kept, up to
    ``MESH_CACHE_MB``, for the later passes: a chunk is the same array every pass, so the sums
    do not change, only the posing is not repeated (the rest is posed again each pass).
    """

    source: MeshSource
    joints: np.ndarray
    index: np.ndarray
    chunk_size: int = 512
    ranks: Ranks = field(default_factory=Ranks)
    progress: FrameCounter | None = None
    keep_meshes: bool = False
    cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def stream(
        self, add: Callable[[np.ndarray, np.ndarray], None], shard: tuple[int, int] | None = None
    ) -> None:
        """add(meshes (n, V, 3), joints (n, K, 3)) for each chunk of this process.

        ``shard`` (i, n) keeps the i-th of n contiguous blocks of chunks; the ranks split that
        the same way, so the chunks (the unit of every exact product) never depend on W.
        """
        chunks = frame_chunks(np.asarray(self.index), self.chunk_size)
        for c in self._mine(len(chunks), shard):
            rows = chunks[c]
            meshes = self.cache.get(int(c))
            if meshes is None:
                meshes = self._produce(rows, int(c))
            add(meshes, self.joints[rows])
            if self.progress is not None:
                self.progress(len(rows))

    def local_frames(self, shard: tuple[int, int] | None = None) -> int:
        """How many frames one :meth:`stream` (with this ``shard``) gives this process."""
        chunks = frame_chunks(np.asarray(self.index), self.chunk_size)
        return sum(len(chunks[c]) for c in self._mine(len(chunks), shard))

    def _mine(self, num_chunks: int, shard: tuple[int, int] | None) -> np.ndarray:
        mine = np.arange(num_chunks)
        if shard is not None:
            mine = np.array_split(mine, shard[1])[shard[0]]
        return self.ranks.split(mine)

    def _produce(self, rows: np.ndarray, chunk: int) -> np.ndarray:
        meshes = self.source.meshes(rows)
        if meshes.shape[1:] != (self.source.num_vertices, 3):
            raise JregfixError(
                f"meshes have shape {meshes.shape[1:]}, expected ({self.source.num_vertices}, 3)"
            )
        if not np.isfinite(meshes).all():
            bad = rows[~np.isfinite(meshes.reshape(len(rows), -1)).all(1)]
            raise JregfixError(f"mesh of frame {bad[0]} has NaN/inf vertices (check its pose)")
        held = sum(m.nbytes for m in self.cache.values())
        if (
            self.keep_meshes
            and getattr(self.source, "posed", False)
            and held + meshes.nbytes <= MESH_CACHE_MB * 2**20
        ):
            meshes.flags.writeable = False  # the passes only read it
            self.cache[chunk] = meshes
        return meshes


def frame_chunks(index: np.ndarray, chunk_size: int) -> list[np.ndarray]:
    """``index`` cut into chunks of ``chunk_size`` frames: the unit every split is made of."""
    return [index[s : s + chunk_size] for s in range(0, len(index), chunk_size)]


def _coordinates(meshes: np.ndarray, centred: bool) -> np.ndarray:
    """(3n, V) float64: row 3i + d is coordinate d of frame i's vertices, centred on the
    frame's vertex mean in root-relative mode. Every pass builds a chunk's numbers here, so
    the Gram sums and the residual passes see the same ones."""
    n, v, _ = meshes.shape
    a = np.empty((n, 3, v))
    a[...] = meshes.transpose(0, 2, 1)
    if centred:
        a -= a.sum(axis=2, keepdims=True) / v
    return a.reshape(3 * n, v)


def _joint_rows(joints: np.ndarray) -> np.ndarray:
    """(n, K, 3) -> (K, 3n) float64 in the row order of :func:`_coordinates`."""
    return np.asarray(joints, dtype=np.float64).transpose(1, 0, 2).reshape(joints.shape[1], -1)


def _exact_all_reduce(sums: dict[str, ExactSum], ranks: Ranks) -> None:
    """Sum every rank's partial exact sums (the limbs add without rounding)."""
    for s in sums.values():
        s.limbs = ranks.all_reduce_sum(torch.from_numpy(s.limbs)).numpy()


# ----------------------------------------------------------------------------- accumulation


@dataclass
class Totals:
    """The values of the sufficient statistics (module docstring) on vertices (U,) sorted:
    gram G (U, U), cross B (K, U), joints_gram S (K, K), over ``frames`` frames."""

    vertices: np.ndarray
    gram: np.ndarray
    cross: np.ndarray
    joints_gram: np.ndarray
    frames: int
    centred: bool

    def extended(self, new: np.ndarray, columns: dict[str, np.ndarray]) -> Totals:
        """The totals on vertices U + ``new`` (M,), from :func:`certification_pass`' sums."""
        union = np.union1d(self.vertices, new)
        old, pos = np.searchsorted(union, self.vertices), np.searchsorted(union, new)
        gram = np.empty((len(union),) * 2)
        gram[np.ix_(old, old)] = self.gram
        gram[np.ix_(pos, old)] = columns["new_old"]
        gram[np.ix_(old, pos)] = columns["new_old"].T
        gram[np.ix_(pos, pos)] = columns["new_new"]
        cross = np.empty((self.cross.shape[0], len(union)))
        cross[:, old], cross[:, pos] = self.cross, columns["new_cross"]
        return Totals(union, gram, cross, self.joints_gram, self.frames, self.centred)


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
        return cls(
            np.asarray(vertices, dtype=np.int64),
            {k: ExactSum(s) for k, s in shapes.items()},
            0,
            centred,
        )

    @property
    def gram(self) -> np.ndarray:
        return self.sums["gram"].value()

    @property
    def cross(self) -> np.ndarray:
        return self.sums["cross"].value()

    @property
    def joints_gram(self) -> np.ndarray:
        return self.sums["joints_gram"].value()

    def totals(self) -> Totals:
        return Totals(
            self.vertices, self.gram, self.cross, self.joints_gram, self.frames, self.centred
        )

    def add(self, meshes: np.ndarray, joints: np.ndarray) -> None:
        """meshes (n, V, 3), joints (n, K, 3): one rank-3n update of every sum."""
        a = _coordinates(meshes, self.centred)[:, self.vertices]  # (3n, U)
        x = _joint_rows(joints)
        with threadpool_limits(1, user_api="blas"):
            gram, cross, joints_gram = a.T @ a, x @ a, x @ x.T  # a.T @ a: a symmetric update
        self.sums["gram"].add(gram)
        self.sums["cross"].add(cross)
        self.sums["joints_gram"].add(joints_gram)
        self.frames += len(meshes)

    def merge(self, other: Accumulator) -> None:
        if not np.array_equal(self.vertices, other.vertices) or self.centred != other.centred:
            raise JregfixError("partial accumulations use different vertices or modes")
        for key in self.KEYS:
            self.sums[key].merge(other.sums[key])
        self.frames += other.frames

    def all_reduce(self, ranks: Ranks) -> None:
        """Sum the partial accumulations of every rank (exact: the limbs add without rounding)."""
        _exact_all_reduce(self.sums, ranks)
        self.frames = int(ranks.all_reduce_sum(torch.tensor([self.frames], dtype=torch.int64)))


def accumulate(
    source: MeshSource,
    joints: np.ndarray,
    vertices: np.ndarray,
    centred: bool,
    index: np.ndarray,
    chunk_size: int = 512,
    progress: FrameCounter | None = None,
    ranks: Ranks | None = None,
    shard: tuple[int, int] | None = None,
) -> Accumulator:
    """Sums over frames ``index`` of ``source`` and ``joints`` (N, K, 3), chunk by chunk.

    ``shard`` (i, n) keeps the i-th of n contiguous blocks of chunks; ``ranks`` splits the
    chunks the same way over a distributed job and all-reduces, so every rank returns the
    sums over all of ``index``. Either way the sums equal the single-process ones bit for bit.
    """
    frames = Frames(source, joints, index, chunk_size, ranks or Ranks(), progress)
    acc = Accumulator.empty(vertices, joints.shape[1], centred)
    frames.stream(acc.add, shard)
    acc.all_reduce(frames.ranks)
    return acc


def certification_pass(
    frames: Frames,
    regressor: np.ndarray,
    centred: bool,
    old: np.ndarray,
    new: np.ndarray,
    with_scale: bool,
) -> dict[str, np.ndarray]:
    """Exact sums over frames, one pass, for the regressor W (K, V) and every vertex v:

    "gradient" (K, V) = sum_n C (W Vc_n - X_n) Vc_n^T = C (W G - B): the data part of the
    objective's gradient over all V vertices, from residuals (a K x 3n x V product per chunk);
    with ``with_scale`` also "cross" B (K, V) and "sq_norms" diag G (V,), for the problem scale;
    and the sums that let vertices ``new`` (M,) join the accumulated ``old`` (U,):
    "new_old" G[new, old] (M, U), "new_new" G[new, new] (M, M), "new_cross" B[:, new] (K, M).
    """
    k, v = regressor.shape
    coupling = _coupling(k, centred)
    used = np.flatnonzero(regressor.any(0))
    w_used = regressor[:, used]
    shapes: dict[str, tuple[int, ...]] = {"gradient": (k, v)}
    if with_scale:
        shapes |= {"cross": (k, v), "sq_norms": (v,)}
    if len(new):
        shapes |= {
            "new_old": (len(new), len(old)),
            "new_new": (len(new),) * 2,
            "new_cross": (k, len(new)),
        }
    sums = {key: ExactSum(shape) for key, shape in shapes.items()}

    def add(meshes, joints):
        a = _coordinates(meshes, centred)
        x = _joint_rows(joints)
        with threadpool_limits(1, user_api="blas"):
            residual = coupling @ (w_used @ a[:, used].T - x)
            sums["gradient"].add(residual @ a)
            if with_scale:
                sums["cross"].add(x @ a)
                sums["sq_norms"].add(np.einsum("ij,ij->j", a, a))
            if len(new):
                a_new = a[:, new]
                sums["new_old"].add(a_new.T @ a[:, old])
                sums["new_new"].add(a_new.T @ a_new)
                sums["new_cross"].add(x @ a_new)

    frames.stream(add)
    _exact_all_reduce(sums, frames.ranks)
    return {key: s.value() for key, s in sums.items()}


# ----------------------------------------------------------------------------- solve


@dataclass
class Solution:
    """A solve's regressor (K, V) and its diagnostics (JSON-ready)."""

    regressor: np.ndarray
    diagnostics: dict = field(default_factory=dict)


def solve_accumulated(
    totals: Totals | Accumulator,
    rows: list[np.ndarray],
    num_vertices: int,
    config: FitConfig,
    warm: np.ndarray | None = None,
) -> Solution:
    """Solve every row's NNLS from the sums; ``rows[k]`` are mesh vertex ids within them.

    warm (K, V): a feasible start (a previous optimum on smaller rows), e.g. between rounds of
    the certification.
    """
    if isinstance(totals, Accumulator):
        totals = totals.totals()
    gram, cross = totals.gram, totals.cross
    k = cross.shape[0]
    if len(rows) != k:
        raise JregfixError(f"{len(rows)} candidate sets for {k} joints")
    if totals.frames == 0:
        raise JregfixError("no frames were accumulated")
    vertices = totals.vertices
    local = [np.searchsorted(vertices, r) for r in rows]
    for j, (r, loc) in enumerate(zip(rows, local, strict=True)):
        if (
            len(r) == 0
            or (loc >= len(vertices)).any()
            or not np.array_equal(vertices[np.minimum(loc, len(vertices) - 1)], r)
        ):
            raise JregfixError(f"row {j}: candidate vertices are not in the accumulated set")
    coupling = _coupling(k, totals.centred)
    penalty = _penalty(config, totals.frames)
    lin = coupling @ cross
    blocks = [range(k)] if totals.centred else [[j] for j in range(k)]
    w_local = [np.zeros(len(loc)) for loc in local]
    solver_info, iterations = [], 0
    for block in blocks:
        hess = BlockGramHessian(
            gram, coupling[np.ix_(block, block)], [local[j] for j in block], penalty
        )
        c = np.concatenate([lin[j, local[j]] for j in block]) + penalty
        w0 = None if warm is None else np.concatenate([warm[j, rows[j]] for j in block])
        with threadpool_limits(1, user_api="blas"):  # the same bits on any thread count
            res = solve_nnls(
                hess, c, groups=hess.row_of, exact=config.exact_sum_to_one, tol=config.tol, w0=w0
            )
        iterations += res.iterations
        for pos, j in enumerate(block):
            sel = hess.row_of == pos
            w_local[j] = res.w[sel]
            viol = kkt_violation_from(res.reduced_gradient[sel], res.w[sel])
            solver_info.append((j, viol, res.scale, res.converged))
    regressor = np.zeros((k, num_vertices))
    w_u = np.zeros((k, len(vertices)))
    for j in range(k):
        regressor[j, rows[j]] = w_local[j]
        w_u[j, local[j]] = w_local[j]
    diag = _diagnostics(totals, w_u, coupling, penalty, sorted(solver_info), [len(r) for r in rows])
    diag["solver_iterations"] = iterations
    return Solution(regressor, diag)


def _coupling(k: int, centred: bool) -> np.ndarray:
    return np.eye(k) - (1.0 / k if centred else 0.0)


def _penalty(config: FitConfig, frames: int) -> float:
    return 0.0 if config.exact_sum_to_one else config.sum_to_one_weight * frames


def _diagnostics(totals, w_u, coupling, penalty, solver_info, candidates) -> dict:
    # sum_n R_n R_n^T with R_n = W Vc_n - X_n, then the per-frame translation removed by C.
    rr = (
        w_u @ totals.gram @ w_u.T - w_u @ totals.cross.T - totals.cross @ w_u.T + totals.joints_gram
    )
    sq = np.maximum(np.diag(coupling @ rr @ coupling), 0.0)
    sums = w_u.sum(1)
    k = len(sums)
    names = H36M17_NAMES if k == len(H36M17_NAMES) else tuple(f"joint {j}" for j in range(k))
    per_joint = []
    for j, viol, scale, _ in solver_info:
        per_joint.append(
            {
                "joint": names[j],
                "rms_mm": float(1000.0 * np.sqrt(sq[j] / totals.frames)),
                "nonzeros": int((w_u[j] > 0).sum()),
                "row_sum": float(sums[j]),
                "candidates": int(candidates[j]),
                "kkt_violation": viol,
                "kkt_relative": viol / scale,
            }
        )
    return {
        "frames": int(totals.frames),
        "objective": float(sq.sum() + penalty * ((sums - 1.0) ** 2).sum()),
        "rms_mm_all_joints": float(1000.0 * np.sqrt(sq.sum() / (totals.frames * k))),
        "lambda": penalty,
        "kkt_relative_max": max(p["kkt_relative"] for p in per_joint),
        "converged": all(info[3] for info in solver_info),
        "union_vertices": int(len(totals.vertices)),
        "per_joint": per_joint,
    }


# ----------------------------------------------------------------------------- certification


def certified_solve(
    frames: Frames | None,
    totals: Totals,
    rows: list[np.ndarray],
    num_vertices: int,
    config: FitConfig,
    template: np.ndarray | None = None,
) -> Solution:
    """Solve on the candidate rows, then certify the KKT conditions over all V vertices by
    column generation (module docstring: certification); every rank of ``frames.ranks`` takes
    the same steps on the same all-reduced exact sums. ``template`` (V, 3) spreads the
    vertices added per round; ``frames`` may be None only when ``config.certify`` is off."""
    sol = solve_accumulated(totals, rows, num_vertices, config)
    k = len(rows)
    cert: dict[str, Any] = {
        "certified": False,
        "rounds": 0,
        "passes": 0,
        "vertices_added_per_round": [],
        "pairs_added_per_round": [],
    }
    seconds = {"passes": 0.0, "resolves": 0.0}  # where certification's time goes
    solved_on = len(totals.vertices)
    if all(len(r) == num_vertices for r in rows):
        cert |= {
            "certified": sol.diagnostics["converged"],
            "note": "every row's candidates are all vertices: the solve itself is global",
        }
        sol.diagnostics |= {
            "kkt_global_relative_max": sol.diagnostics["kkt_relative_max"],
            "certification": cert,
        }
        return sol
    if not config.certify:
        cert["note"] = "certification off: the KKT conditions hold on the candidate rows only"
        sol.diagnostics |= {"kkt_global_relative_max": None, "certification": cert}
        sol.diagnostics["converged"] = False
        return sol
    if frames is None:
        raise JregfixError(
            "certifying over all vertices streams the frames again: pass them "
            "(or turn certification off)"
        )
    penalty = _penalty(config, totals.frames)
    coupling = _coupling(k, totals.centred)
    groups = np.repeat(np.arange(k), num_vertices)
    scale = steep = None
    pending = np.zeros(0, dtype=np.int64)  # vertices whose Gram columns the next pass sums
    while True:
        t0 = time.perf_counter()
        sums = certification_pass(
            frames,
            sol.regressor,
            totals.centred,
            totals.vertices,
            pending,
            with_scale=scale is None,
        )
        cert["passes"] += 1
        seconds["passes"] += time.perf_counter() - t0
        if len(pending):
            totals = totals.extended(pending, sums)
        if scale is None:
            diag_h = np.outer(np.diag(coupling), sums["sq_norms"]) + penalty
            lin = coupling @ sums["cross"] + penalty
            scale = float(max(np.abs(lin).max(), diag_h.max(), 1e-300))
            steep = 1.0 / np.sqrt(np.maximum(diag_h, 1e-300 * scale))
        w = sol.regressor
        g = sums["gradient"] + penalty * (w.sum(1, keepdims=True) - 1.0)
        d = reduced_gradient(g.ravel(), w.ravel() > 0, groups, config.exact_sum_to_one, k).reshape(
            k, num_vertices
        )
        outside = np.ones((k, num_vertices), dtype=bool)
        for j, r in enumerate(rows):
            outside[j, r] = False
        entering = outside & (d < -config.tol * scale)
        global_viol = kkt_violation_from(d.ravel(), w.ravel())
        if not entering.any() or cert["rounds"] == config.max_rounds:
            break
        # Every row may use every summed vertex (their Gram entries are known); the steepest
        # violators beyond them are summed by the next pass, which also prices this round's
        # solution, and join then.
        known = np.zeros(num_vertices, dtype=bool)
        known[totals.vertices] = True
        chosen = _steepest(
            entering & ~known,
            d * steep,
            config.max_new_per_row,
            template,
            config.new_vertex_spacing,
        )
        pending = np.flatnonzero(chosen.any(0))
        if any(len(r) < len(totals.vertices) for r in rows):
            cert["vertices_added_per_round"].append(len(totals.vertices) - solved_on)
            cert["pairs_added_per_round"].append(sum(len(totals.vertices) - len(r) for r in rows))
            solved_on = len(totals.vertices)
            rows = [totals.vertices] * k
            t0 = time.perf_counter()
            sol = solve_accumulated(totals, rows, num_vertices, config, warm=w)
            seconds["resolves"] += time.perf_counter() - t0
            cert["rounds"] += 1
    cert["certified"] = bool(not entering.any() and sol.diagnostics["converged"])
    cert["scale"] = scale
    cert["min_reduced_gradient_outside_relative"] = float(d[outside].min(initial=np.inf) / scale)
    sol.diagnostics |= {
        "kkt_global_relative_max": global_viol / scale,
        "converged": cert["certified"],
        "certification": cert,
        "certification_time_s": seconds,
        "union_vertices": int(len(totals.vertices)),
    }
    return sol


def _steepest(
    entering: np.ndarray,
    steepness: np.ndarray,
    limit: int,
    template: np.ndarray | None,
    spacing: float,
) -> np.ndarray:
    """(K, V) bool: each row's (at most ``limit``) entering vertices of most negative
    steepness (reduced gradient / sqrt(diag H): the steepest descent per unit step length),
    at least ``spacing`` apart on the template (V, 3): neighbours of a violator move almost
    like it, so spreading the picks finds the separate places a row needs in fewer rounds."""
    chosen = np.zeros_like(entering)
    for j in range(len(entering)):
        cand = np.flatnonzero(entering[j])
        cand = cand[np.argsort(steepness[j, cand], kind="stable")]
        if template is None or spacing <= 0:
            chosen[j, cand[:limit]] = True
            continue
        picked: list[int] = []
        for v in cand:
            if len(picked) == limit:
                break
            if (
                not picked
                or np.linalg.norm(template[picked] - template[v], axis=1).min() >= spacing
            ):
                picked.append(int(v))
        chosen[j, picked] = True
    return chosen


# ----------------------------------------------------------------------------- in-memory fit


def choose_support(
    source: MeshSource,
    joints: np.ndarray,
    template: np.ndarray,
    index: np.ndarray,
    config: FitConfig,
    init_regressor: np.ndarray | None = None,
    candidates: list[np.ndarray] | None = None,
    ranks: Ranks | None = None,
) -> SupportChoice:
    """Candidate vertices per row (module docstring: support); ``candidates`` overrides."""
    k = joints.shape[1]
    if candidates is not None:
        if len(candidates) != k:
            raise JregfixError(f"{len(candidates)} candidate sets for {k} joints")
        return SupportChoice(
            [np.unique(np.asarray(c, dtype=np.int64)) for c in candidates], None, "explicit"
        )
    if parse_support(config.support)[0] == "all":
        return SupportChoice(candidate_rows(template, np.zeros((k, 3)), "all"), None, "all")
    if init_regressor is not None:
        if init_regressor.shape[0] != k:
            raise JregfixError(f"init regressor has {init_regressor.shape[0]} rows for {k} joints")
        locs = effective_regressor(init_regressor) @ template
        return SupportChoice(candidate_rows(template, locs, config.support), locs, "init regressor")
    pick = np.unique(
        np.linspace(0, len(index) - 1, min(len(index), config.pilot_frames))
        .round()
        .astype(np.int64)
    )
    coarse = farthest_points(template, config.pilot_vertices)
    acc = accumulate(
        source,
        joints,
        coarse,
        config.mode == ROOT_RELATIVE,
        index[pick],
        config.chunk_size,
        ranks=ranks,
    )
    pilot = solve_accumulated(acc, [coarse] * k, len(template), config).regressor
    sums = pilot.sum(1, keepdims=True)
    if (sums <= 0).any():
        raise JregfixError(
            "the pilot fit left a joint without weights; pass an init regressor (--init-regressor)"
        )
    locs = (pilot / sums) @ template
    return SupportChoice(
        candidate_rows(template, locs, config.support),
        locs,
        f"pilot fit ({len(pick)} frames, {len(coarse)} vertices)",
    )


@dataclass
class FitResult:
    """A fitted regressor and how it was found.

    regressor (K, V) float64, non-negative; diagnostics: JSON-ready numbers (frames, objective,
    RMS per joint in mm, non-zeros, row sums, KKT violations on the candidates and over all
    vertices, certification rounds, time and peak memory); support: the candidate vertices the
    search started from.
    """

    regressor: np.ndarray
    diagnostics: dict
    support: SupportChoice


def fit_regressor(
    meshes: MeshSource | np.ndarray,
    joints: np.ndarray,
    template: np.ndarray,
    config: FitConfig = FitConfig(),
    index: np.ndarray | None = None,
    init_regressor: np.ndarray | None = None,
    candidates: list[np.ndarray] | None = None,
    progress: FrameCounter | None = None,
    ranks: Ranks | None = None,
) -> FitResult:
    """Fit a non-negative joint regressor W (K, V) so that W @ meshes[n] ~ joints[n].

    The objective, the per-frame translation of "root-relative" mode, the support and the
    certification over all vertices are explained in the module docstring.

    Args:
        meshes: (N, V, 3) vertices in metres (an array, or a :class:`MeshSource` such as
            :class:`BodyMeshes` that produces them chunk by chunk).
        joints: (N, K, 3) ground-truth joints in metres, frame n of ``meshes``; in the default
            root-relative mode any per-frame offset (e.g. pelvis-centred joints) is allowed.
        template: (V, 3) rest vertices: where the candidate vertices of each row are chosen.
        config: the objective, support and solver settings.
        index: (M,) frames to fit on (default: all N).
        init_regressor: (K, V) a regressor whose joints on the template centre the support
            (else a pilot fit does).
        candidates: K arrays of vertex ids, each row's support (replaces the choice).
        progress: called with the frame count of every chunk streamed (the pilot, the
            accumulation and every certification pass stream the frames).
        ranks: a distributed job: each rank streams its block of chunks and all-reduces the
            exact sums, so every rank returns the single-process result bit for bit.

    Returns:
        :class:`FitResult`: regressor (K, V), diagnostics (with timing and peak memory) and
        the support the search started from.
    """
    config.validate()
    source = as_mesh_source(meshes)
    template = np.asarray(template)
    if template.shape != (source.num_vertices, 3):
        raise JregfixError(
            f"template has shape {template.shape}, expected "
            f"({source.num_vertices}, 3) like the meshes' vertices"
        )
    joints = check_joints(joints, source.num_frames)
    index = np.arange(source.num_frames) if index is None else np.asarray(index)
    frames = Frames(
        source,
        joints,
        index,
        config.chunk_size,
        ranks or Ranks(),
        progress,
        keep_meshes=config.certify,
    )
    t0 = time.perf_counter()
    support = choose_support(
        source, joints, template, index, config, init_regressor, candidates, ranks
    )
    t1 = time.perf_counter()
    union = np.unique(np.concatenate(support.rows))
    acc = Accumulator.empty(union, joints.shape[1], config.mode == ROOT_RELATIVE)
    frames.stream(acc.add)
    acc.all_reduce(frames.ranks)
    totals = acc.totals()
    del acc  # the limbs are 4x the Gram matrix
    t2 = time.perf_counter()
    sol = certified_solve(frames, totals, support.rows, len(template), config, template)
    t3 = time.perf_counter()
    sol.diagnostics["time_s"] = {
        "support": t1 - t0,
        "accumulate": t2 - t1,
        "solve_and_certify": t3 - t2,
        "total": t3 - t0,
    }
    sol.diagnostics["peak_rss_mb"] = peak_rss_mb()
    return FitResult(sol.regressor, sol.diagnostics, support)


def as_mesh_source(meshes: MeshSource | np.ndarray) -> MeshSource:
    """A :class:`MeshSource` as is; an (N, V, 3) array (or CPU tensor) as :class:`ArrayMeshes`."""
    if not isinstance(meshes, np.ndarray) and hasattr(meshes, "meshes"):
        return meshes
    vertices = np.asarray(meshes)
    if vertices.ndim != 3 or vertices.shape[2] != 3:
        raise JregfixError(f"meshes have shape {vertices.shape}, expected (N, V, 3)")
    return ArrayMeshes(vertices)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def check_joints(joints: np.ndarray, num_frames: int) -> np.ndarray:
    """joints (N, K, 3) as float64, checked: shape, one row per mesh, finite."""
    joints = np.asarray(joints, dtype=np.float64)
    if joints.ndim != 3 or joints.shape[2] != 3:
        raise JregfixError(f"GT joints have shape {joints.shape}, expected (N, K, 3)")
    if len(joints) != num_frames:
        raise JregfixError(f"GT joints have {len(joints)} rows but there are {num_frames} meshes")
    if not np.isfinite(joints).all():
        bad = np.flatnonzero(~np.isfinite(joints.reshape(len(joints), -1)).all(1))
        raise JregfixError(f"GT joints have NaN/inf in {len(bad)} frame(s), first at row {bad[0]}")
    return joints
