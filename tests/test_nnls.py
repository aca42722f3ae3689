"""The active-set NNLS solver against scipy.optimize.nnls and independent KKT checks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize

from jregfix.geometry.nnls import (
    BlockGramHessian,
    DenseHessian,
    _PassiveBlocks,
    kkt_check,
    kkt_from_gradient,
    solve_nnls,
)

TOL = 1e-9


def _problem(rng, rows=200, cols=60, correlated=True):
    a = rng.normal(size=(rows, cols))
    if correlated:  # neighbouring columns nearly collinear, like neighbouring mesh vertices
        a = np.cumsum(a, axis=1) / np.sqrt(np.arange(1, cols + 1))
    planted = np.abs(rng.normal(size=cols)) * (rng.random(cols) < 0.2)
    x = a @ planted + rng.normal(size=rows)
    return a, x


def _objective(a, x, lam, w):
    return float(np.sum((a @ w - x) ** 2) + lam * (w.sum() - 1.0) ** 2)


def _kkt_ok(h, c, w, exact, tol):
    """KKT of 1/2 w'Hw - c'w on w >= 0 (with sum w = 1 if exact), computed here from scratch."""
    g = h @ w - c
    on = w > 0
    if exact:
        g = g - g[on].mean()
    scale = max(np.abs(c).max(), np.diag(h).max())
    return (
        (w >= 0).all() and (g[~on] >= -tol * scale).all() and (np.abs(g[on]) <= tol * scale).all()
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [0.0, 10.0, 1e4])
def test_penalty_mode_matches_scipy_nnls_on_stacked_system(seed, lam):
    rng = np.random.default_rng(seed)
    a, x = _problem(rng)
    stacked = np.vstack([a, np.sqrt(lam) * np.ones((1, a.shape[1]))])
    target = np.append(x, np.sqrt(lam))
    w_ref, _ = scipy.optimize.nnls(stacked, target, maxiter=10_000)
    h, c = a.T @ a + lam, a.T @ x + lam
    res = solve_nnls(DenseHessian(h), c, tol=TOL)
    assert res.converged
    f_ref, f = _objective(a, x, lam, w_ref), _objective(a, x, lam, res.w)
    assert abs(f - f_ref) <= 1e-8 * f_ref
    assert _kkt_ok(h, c, res.w, exact=False, tol=TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_mode_is_the_large_penalty_limit_and_satisfies_kkt(seed):
    rng = np.random.default_rng(seed)
    a, x = _problem(rng, rows=120, cols=25)
    h, c = a.T @ a, a.T @ x
    res = solve_nnls(DenseHessian(h), c, groups=np.zeros(25, dtype=int), exact=True, tol=TOL)
    assert res.converged
    assert abs(res.w.sum() - 1.0) < 1e-12
    assert _kkt_ok(h, c, res.w, exact=True, tol=TOL)
    # scipy with a huge sum-to-one row approaches the constrained optimum at rate 1/lam.
    lam = 1e9 * np.abs(h).max()
    stacked = np.vstack([a, np.sqrt(lam) * np.ones((1, 25))])
    w_ref, _ = scipy.optimize.nnls(stacked, np.append(x, np.sqrt(lam)), maxiter=10_000)
    np.testing.assert_allclose(res.w, w_ref, atol=1e-5)


def test_rank_deficient_problem_still_reaches_kkt():
    rng = np.random.default_rng(5)
    a, x = _problem(rng, rows=40, cols=30)
    a = np.hstack([a, a[:, :10], a[:, :5] + a[:, 5:10]])  # exact duplicates and combinations
    lam = 3.0
    h, c = a.T @ a + lam, a.T @ x + lam
    res = solve_nnls(DenseHessian(h), c, tol=TOL)
    assert res.converged and _kkt_ok(h, c, res.w, exact=False, tol=TOL)
    stacked = np.vstack([a, np.sqrt(lam) * np.ones((1, a.shape[1]))])
    w_ref, _ = scipy.optimize.nnls(stacked, np.append(x, np.sqrt(lam)), maxiter=10_000)
    f_ref = _objective(a, x, lam, w_ref)
    assert abs(_objective(a, x, lam, res.w) - f_ref) <= 1e-8 * f_ref


def test_block_gram_hessian_equals_explicit_kronecker_matrix():
    rng = np.random.default_rng(3)
    u, k, lam = 20, 3, 2.5
    b = rng.normal(size=(50, u))
    gram = b.T @ b
    coupling = np.eye(k) - 1.0 / k
    rows = [np.array([0, 3, 4, 9]), np.array([1, 3, 10, 11, 19]), np.array([2, 5])]
    hess = BlockGramHessian(gram, coupling, rows, lam)
    dense = np.zeros((hess.size, hess.size))
    offsets = np.cumsum([0] + [len(r) for r in rows])
    for i in range(k):
        for j in range(k):
            block = coupling[i, j] * gram[np.ix_(rows[i], rows[j])] + lam * (i == j)
            dense[offsets[i] : offsets[i + 1], offsets[j] : offsets[j + 1]] = block
    w = np.where(rng.random(hess.size) < 0.5, rng.random(hess.size), 0.0)
    np.testing.assert_allclose(hess.matvec(w), dense @ w, rtol=1e-12, atol=1e-12)
    idx = np.array([0, 2, 5, 9, 10])
    np.testing.assert_allclose(hess.submatrix(idx), dense[np.ix_(idx, idx)], rtol=1e-13)
    other = np.array([1, 2, 3, 7, 9])
    np.testing.assert_allclose(hess.block(other, idx), dense[np.ix_(other, idx)], rtol=1e-13)
    np.testing.assert_allclose(hess.diagonal(), np.diag(dense), rtol=1e-13)
    # the solver's incremental passive-set matrices: the same numbers as a fresh gather, as
    # variables enter and leave
    blocks = _PassiveBlocks(hess)
    for idx in ([0, 2, 5], [0, 2, 5, 9, 10], [2, 9, 10], [1, 2, 3, 9, 10], [4]):
        idx = np.array(idx)
        assert np.array_equal(blocks.submatrix(idx), hess.submatrix(idx))


@pytest.mark.parametrize("exact", [False, True])
def test_warm_start_from_a_smaller_problem_reaches_the_same_optimum(exact):
    """Column generation: the optimum over the first 20 columns, padded with zeros, warm-starts
    the problem over all 60; it must reach the cold start's objective and KKT point."""
    rng = np.random.default_rng(7)
    a, x = _problem(rng, rows=150, cols=60)
    lam = 0.0 if exact else 5.0
    h, c = a.T @ a + lam, a.T @ x + lam
    groups = np.zeros(60, dtype=int) if exact else None
    small = solve_nnls(
        DenseHessian(h[:20, :20]),
        c[:20],
        groups=None if groups is None else groups[:20],
        exact=exact,
        tol=TOL,
    )
    w0 = np.concatenate([small.w, np.zeros(40)])
    warm = solve_nnls(DenseHessian(h), c, groups=groups, exact=exact, tol=TOL, w0=w0)
    cold = solve_nnls(DenseHessian(h), c, groups=groups, exact=exact, tol=TOL)
    assert warm.converged and _kkt_ok(h, c, warm.w, exact, TOL)
    f = lambda w: 0.5 * w @ h @ w - c @ w  # noqa: E731
    assert abs(f(warm.w) - f(cold.w)) <= 1e-10 * abs(f(cold.w))
    assert not _kkt_ok(h, c, w0, exact, TOL)  # the padded start is not optimal: work was done


def test_kkt_from_a_streamed_gradient_equals_the_operator_check():
    rng = np.random.default_rng(8)
    a, x = _problem(rng, rows=80, cols=30)
    h, c = a.T @ a, a.T @ x
    w = np.where(rng.random(30) < 0.3, rng.random(30), 0.0)
    g = a.T @ (a @ w - x)  # the gradient as a residual pass computes it: A^T (A w - x)
    groups = np.repeat([0, 1, 2], 10)
    for exact in (False, True):
        ref = kkt_check(DenseHessian(h), c, w, groups, exact)
        got = kkt_from_gradient(g, w, groups, exact)
        assert got["violation"] == pytest.approx(ref["violation"], rel=1e-9)
        # from scratch: the reduced gradient off the support, minus each row's mean on it
        d = g.copy()
        if exact:
            for r in range(3):
                sel = groups == r
                d[sel] -= g[sel & (w > 0)].mean()
        on = w > 0
        expected = max(-d[~on].min(), np.abs(d[on]).max(), 0.0)
        assert got["violation"] == pytest.approx(expected, rel=1e-9)
