"""Non-negative least squares on the normal equations, with a sum-to-one term or constraint.

Every problem here is the convex quadratic program

    minimise  f(w) = 1/2 w^T H w - c^T w     subject to  w >= 0   [and  sum_{i in row r} w_i = 1]

for a least-squares objective ||A w - x||^2 + lam (1^T w - 1)^2 = 2 f(w) + const with
H = A^T A + lam 1 1^T and c = A^T x + lam 1. The bracketed equality per group of variables is the
exact "simplex" mode (each regressor row is a convex combination of vertices); it replaces the
penalty. H is never required as a dense matrix: the solver only needs ``matvec``, ``diagonal``
and small blocks ``block(rows, cols)`` on the current support (:class:`DenseHessian`,
:class:`BlockGramHessian`); the passive-set matrix is kept between iterations and only the rows
of entering variables are gathered.

Algorithm: Lawson & Hanson's active-set method (primal, feasible iterates), generalised to the
per-group equality constraints by solving the KKT system on the passive set. It stops when the
KKT conditions hold to ``tol`` relative to the problem scale s = max(max|c|, max diag H):

    w >= 0;  d_i >= -tol*s where w_i = 0;  |d_i| <= tol*s where w_i > 0,

with d = g - nu[group] the reduced gradient, g = H w - c, and nu the equality multipliers
(nu = 0 in penalty mode; in exact mode nu_r is the mean of g over row r's support).
Passive-set systems are solved with a ridge of ``ridge * s`` (1e-14 s: a safeguard for nearly
dependent vertices, far below the tolerance) and two steps of iterative refinement; the KKT
conditions are evaluated on the unregularised problem. Several variables (the worst of each
row) enter per iteration; when that makes no progress, one at a time, as in Lawson-Hanson.
A warm start ``w0`` (e.g. the optimum of a smaller problem padded with zeros, as in column
generation) makes its support the first passive set. The KKT test lives here once
(:func:`reduced_gradient`, :func:`kkt_violation_from`, :func:`kkt_from_gradient`), also for
gradients computed elsewhere, e.g. streamed over variables the Hessian operator never held.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

DEFAULT_TOL = 1e-10
DEFAULT_RIDGE = 1e-14


class DenseHessian:
    """An explicit symmetric (P, P) matrix."""

    def __init__(self, matrix: np.ndarray):
        self.matrix = np.asarray(matrix, dtype=np.float64)
        self.size = self.matrix.shape[0]

    def matvec(self, w: np.ndarray) -> np.ndarray:
        nz = np.flatnonzero(w)
        return self.matrix[:, nz] @ w[nz]

    def submatrix(self, idx: np.ndarray) -> np.ndarray:
        return self.block(idx, idx)

    def block(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self.matrix[np.ix_(rows, cols)]

    def diagonal(self) -> np.ndarray:
        return np.diag(self.matrix).copy()


class BlockGramHessian:
    """H = (M kron G) restricted to per-row candidate sets, + lam * (I kron 1 1^T).

    gram G (U, U) is shared by every row; coupling M (K, K) couples the rows (identity: rows
    independent; the centring projector I - 1 1^T / K: the translation-free objective);
    ``rows[k]`` (S_k,) indexes the candidate vertices of row k in G. Variable p is
    (row_of[p], vert_of[p]), rows stacked in order. Memory is that of G; products cost
    O(U * nnz(w) + K^2 U).
    """

    def __init__(
        self, gram: np.ndarray, coupling: np.ndarray, rows: list[np.ndarray], penalty: float = 0.0
    ):
        self.gram = gram
        self.coupling = np.asarray(coupling, dtype=np.float64)
        self.num_rows = len(rows)
        self.row_of = np.concatenate([np.full(len(r), k) for k, r in enumerate(rows)])
        self.vert_of = np.concatenate(rows).astype(np.int64)
        self.penalty = float(penalty)
        self.size = len(self.vert_of)

    def matvec(self, w: np.ndarray) -> np.ndarray:
        nz = np.flatnonzero(w)
        rows = self.row_of[nz]
        # y[k] = G[:, S_k] w_k for every row k (one product over the used vertices' rows of
        # the symmetric G), then mix rows with M.
        used, col = np.unique(self.vert_of[nz], return_inverse=True)
        weights = np.zeros((self.num_rows, len(used)))
        weights[rows, col] = w[nz]  # (row, vertex) pairs are distinct
        z = self.coupling @ (weights @ self.gram[used])
        sums = np.bincount(rows, weights=w[nz], minlength=self.num_rows)
        return z[self.row_of, self.vert_of] + self.penalty * sums[self.row_of]

    def submatrix(self, idx: np.ndarray) -> np.ndarray:
        return self.block(idx, idx)

    def block(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """H[rows, cols]: G is gathered once per distinct vertex pair (rows share vertices)."""
        ra, va = self.row_of[rows], self.vert_of[rows]
        rb, vb = self.row_of[cols], self.vert_of[cols]
        ua, ia = np.unique(va, return_inverse=True)
        ub, ib = np.unique(vb, return_inverse=True)
        gram = self.gram[np.ix_(ua, ub)][np.ix_(ia, ib)]
        same = ra[:, None] == rb[None, :]
        return self.coupling[np.ix_(ra, rb)] * gram + self.penalty * same

    def diagonal(self) -> np.ndarray:
        r = self.row_of
        return self.coupling[r, r] * self.gram[self.vert_of, self.vert_of] + self.penalty


@dataclass
class NNLSResult:
    """Solution ``w`` (P,), its reduced gradient (P,), KKT diagnostics (absolute and relative to
    ``scale``), iterations."""

    w: np.ndarray
    reduced_gradient: np.ndarray
    kkt_violation: float
    kkt_relative: float
    scale: float
    iterations: int
    converged: bool


def solve_nnls(
    hess,
    c: np.ndarray,
    groups: np.ndarray | None = None,
    exact: bool = False,
    tol: float = DEFAULT_TOL,
    ridge: float = DEFAULT_RIDGE,
    max_iter: int | None = None,
    w0: np.ndarray | None = None,
) -> NNLSResult:
    """Minimise 1/2 w^T H w - c^T w over w >= 0 (and, if ``exact``, sum_{groups == r} w = 1).

    hess: a :class:`DenseHessian`-like operator of size P; c (P,); groups (P,) int row index of
    each variable (required when ``exact``; in penalty mode it only batches additions).
    w0 (P,): a feasible warm start (w0 >= 0, rows summing to one if ``exact``), e.g. the
    optimum of a smaller problem padded with zeros; its support is the first passive set.
    """
    c = np.asarray(c, dtype=np.float64)
    size = hess.size
    groups = np.zeros(size, dtype=np.int64) if groups is None else np.asarray(groups)
    num_groups = int(groups.max()) + 1 if size else 0
    diag = hess.diagonal()
    scale = float(max(np.abs(c).max(initial=0.0), np.abs(diag).max(initial=0.0), 1e-300))
    tol_abs = tol * scale
    original, hess = hess, _PassiveBlocks(_Ridge(hess, ridge * scale))
    max_iter = max_iter if max_iter is not None else 100 + 10 * size

    w = np.zeros(size)
    passive = np.zeros(size, dtype=bool)
    if w0 is not None:
        w[:] = np.maximum(np.asarray(w0, dtype=np.float64), 0.0)
        passive = w > 0
    if exact and w0 is None:
        # Feasible start: each row on its single best vertex (least 1/2 H_ii - c_i).
        for r in range(num_groups):
            idx = np.flatnonzero(groups == r)
            best = idx[np.argmin(0.5 * diag[idx] - c[idx])]
            w[best], passive[best] = 1.0, True

    blocked = np.zeros(size, dtype=bool)
    stalled = False
    iterations = 0
    converged = False
    while iterations < max_iter:
        iterations += 1
        d = reduced_gradient(hess.matvec(w) - c, passive, groups, exact, num_groups)
        free = ~passive & ~blocked
        if not free.any() or d[free].min() >= -tol_abs:
            converged = True
            break
        # Add the most violating variable of each row (one row's at a time when that stalls).
        enter = _entering(d, free, groups, num_groups, tol_abs, single=stalled)
        before = w.copy()
        passive[enter] = True
        _inner_loop(hess, c, w, passive, groups, exact)
        if not np.array_equal(before, w):
            blocked[:], stalled = False, False
        elif len(enter) > 1:
            stalled = True  # the batch made no progress: enter one variable at a time
        else:
            blocked[enter] = True  # numerically unable to enter; retry after the next change
    d = reduced_gradient(original.matvec(w) - c, w > 0, groups, exact, num_groups)
    viol = kkt_violation_from(d, w)
    converged = converged and viol <= tol_abs
    return NNLSResult(w, d, viol, viol / scale, scale, iterations, converged)


class _PassiveBlocks:
    """The operator, with ``submatrix`` built incrementally: the passive set changes by a few
    variables per iteration, so only the new variables' rows of H are gathered (each entry is
    the same number the full gather gives, so the iterates do not change)."""

    def __init__(self, hess):
        self.hess, self.size = hess, hess.size
        self.idx, self.h = np.zeros(0, dtype=np.int64), np.zeros((0, 0))

    def matvec(self, w):
        return self.hess.matvec(w)

    def diagonal(self):
        return self.hess.diagonal()

    def submatrix(self, idx):
        """H[idx, idx] for sorted ``idx``."""
        kept = np.isin(idx, self.idx, assume_unique=True)
        pos = np.searchsorted(self.idx, idx[kept])
        h = np.empty((len(idx),) * 2)
        h[np.ix_(kept, kept)] = self.h[np.ix_(pos, pos)]
        new = ~kept
        if new.any():
            block = self.hess.block(idx[new], idx)
            h[new] = block
            h[:, new] = block.T  # H is symmetric
        self.idx, self.h = idx, h
        return h


class _Ridge:
    """H + delta I: keeps passive-set systems positive definite when vertices are nearly
    affinely dependent (rounding can make a singular Gram matrix slightly indefinite); it moves
    the gradient by at most delta * max(w)."""

    def __init__(self, hess, delta: float):
        self.hess, self.delta, self.size = hess, delta, hess.size

    def matvec(self, w):
        return self.hess.matvec(w) + self.delta * w

    def submatrix(self, idx):
        return self.block(idx, idx)

    def block(self, rows, cols):
        return self.hess.block(rows, cols) + self.delta * (rows[:, None] == cols[None, :])

    def diagonal(self):
        return self.hess.diagonal() + self.delta


def kkt_violation_from(d: np.ndarray, w: np.ndarray) -> float:
    """max(-min w, max -d on zeros, max |d| on the support) for a reduced gradient ``d``."""
    on = w > 0
    parts = [max(0.0, -float(w.min(initial=0.0)))]
    if (~on).any():
        parts.append(max(0.0, float(-d[~on].min())))
    if on.any():
        parts.append(float(np.abs(d[on]).max()))
    return max(parts)


def kkt_check(
    hess, c: np.ndarray, w: np.ndarray, groups: np.ndarray | None = None, exact: bool = False
) -> dict:
    """KKT diagnostics of any candidate ``w`` (independent of how it was found)."""
    return kkt_from_gradient(hess.matvec(w) - c, w, groups, exact)


def kkt_from_gradient(
    g: np.ndarray, w: np.ndarray, groups: np.ndarray | None = None, exact: bool = False
) -> dict:
    """KKT diagnostics from the gradient g = H w - c (P,) of a candidate ``w`` (P,), however
    g was computed (e.g. streamed from residuals over data the Hessian never held)."""
    on = w > 0
    d = reduced_gradient(g, on, groups, exact)
    return {
        "min_weight": float(w.min(initial=0.0)),
        "min_reduced_gradient_on_zeros": float(d[~on].min(initial=np.inf)),
        "max_abs_reduced_gradient_on_support": float(np.abs(d[on]).max(initial=0.0)),
        "violation": kkt_violation_from(d, w),
        "reduced_gradient": d,
    }


def reduced_gradient(
    g: np.ndarray,
    support: np.ndarray,
    groups: np.ndarray | None = None,
    exact: bool = False,
    num_groups: int | None = None,
) -> np.ndarray:
    """d = g - nu[groups] (P,): nu_r, the multiplier of row r's sum-to-one constraint, is the
    mean of g over the row's ``support`` (bool (P,)); d = g without constraints."""
    if not exact:
        return g
    groups = np.zeros(len(g), dtype=np.int64) if groups is None else np.asarray(groups)
    if num_groups is None:
        num_groups = int(groups.max()) + 1 if len(groups) else 0
    counts = np.bincount(groups[support], minlength=num_groups)
    sums = np.bincount(groups[support], weights=g[support], minlength=num_groups)
    nu = sums / np.maximum(counts, 1)
    return g - nu[groups]


def _entering(d, free, groups, num_groups, tol_abs, single):
    cand = np.flatnonzero(free & (d < -tol_abs))
    if single or num_groups == 1:
        return cand[np.argmin(d[cand])][None]
    order = cand[np.argsort(d[cand], kind="stable")]
    _, first = np.unique(groups[order], return_index=True)
    return order[np.sort(first)]


def _inner_loop(hess, c, w, passive, groups, exact):
    """Lawson-Hanson inner loop: move to the passive-set optimum, stepping back to w >= 0."""
    while True:
        idx = np.flatnonzero(passive)
        z = _subproblem(hess, c, idx, groups, exact)
        if (z > 0).all():
            w[:] = 0.0
            w[idx] = z
            return
        neg = z <= 0
        wn, gap = w[idx][neg], w[idx][neg] - z[neg]
        ratios = np.divide(wn, gap, out=np.zeros_like(wn), where=gap > 0)
        k = np.argmin(ratios)
        alpha = ratios[k]
        w[idx] += alpha * (z - w[idx])
        w[idx[np.flatnonzero(neg)[k]]] = 0.0
        drop = idx[w[idx] <= 0]
        w[drop] = 0.0
        passive[drop] = False
        if not passive.any():
            return


def _subproblem(hess, c, idx, groups, exact):
    """Minimiser of 1/2 z^T H_PP z - c_P^T z on the passive set (with row sums = 1 if exact).

    Two steps of iterative refinement keep the residual (the gradient on the support) at
    rounding level even when nearby vertices make H_PP ill-conditioned.
    """
    h = hess.submatrix(idx)
    rhs = c[idx]
    if exact:
        rows, local = np.unique(groups[idx], return_inverse=True)
        m, r = len(idx), len(rows)
        kkt = np.zeros((m + r, m + r))
        kkt[:m, :m] = h
        kkt[m + local, np.arange(m)] = 1.0
        kkt[np.arange(m), m + local] = 1.0
        h, rhs = kkt, np.concatenate([rhs, np.ones(r)])
    try:
        if exact:
            factor = scipy.linalg.lu_factor(h, check_finite=False)
            solve = lambda b: scipy.linalg.lu_solve(factor, b, check_finite=False)  # noqa: E731
        else:
            factor = scipy.linalg.cho_factor(h, check_finite=False)
            solve = lambda b: scipy.linalg.cho_solve(factor, b, check_finite=False)  # noqa: E731
        sol = solve(rhs)
        for _ in range(2):
            sol += solve(rhs - h @ sol)
        if not np.isfinite(sol).all():
            raise np.linalg.LinAlgError("singular passive-set system")
    except (np.linalg.LinAlgError, ValueError):
        sol = np.linalg.lstsq(h, rhs, rcond=None)[0]
    return sol[: len(idx)]
