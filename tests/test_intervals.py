"""Paired sequence bootstrap: against a slow per-frame loop on the same draws, and coverage of
planted differences in simulated worlds with correlated frames."""

import numpy as np
import pytest

from jregfix.errors import JregfixError
from jregfix.geometry.intervals import paired_bootstrap


def slow_reference(values, labels, resamples, seed, level):
    """Resample sequences by an explicit loop: concatenate the frames of the drawn sequences,
    take each column's mean over those frames, difference, percentiles."""
    names = sorted(set(labels))
    frames_of = {n: [i for i, x in enumerate(labels) if x == n] for n in names}
    draws = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))
    diffs = []
    for row in draws:
        frames = [i for s in row for i in frames_of[names[s]]]
        m = [sum(values[i][c] for i in frames) / len(frames) for c in range(values.shape[1])]
        diffs.append([[m[b] - m[a] for b in range(len(m))] for a in range(len(m))])
    lo, hi = np.percentile(np.array(diffs), [50 * (1 - level), 50 * (1 + level)], axis=0)
    return lo, hi


def correlated_world(rng, num_sequences, delta, effect_sd=2.0, frame_sd=0.5):
    """Per-frame errors of two regressors (N, 2): a shared per-sequence level, and a
    per-sequence difference effect around ``delta`` (frames of one video move together)."""
    lengths = rng.integers(5, 60, num_sequences)
    labels = np.repeat(np.arange(num_sequences), lengths)
    level = rng.normal(50, 8, num_sequences)[labels] + rng.normal(0, 3, len(labels))
    diff = (
        delta
        + rng.normal(0, effect_sd, num_sequences)[labels]
        + rng.normal(0, frame_sd, len(labels))
    )
    return np.stack([level, level + diff], 1), labels


def test_matches_slow_loop_on_the_same_draws():
    rng = np.random.default_rng(3)
    labels = [f"S9_Walk_{i % 4}.{5 + i % 3}" for i in rng.integers(0, 12, 90)]
    values = rng.gamma(3.0, 10.0, size=(90, 3))
    res = paired_bootstrap(values, np.array(labels), resamples=300, seed=11, level=0.9)
    lo, hi = slow_reference(values, labels, 300, 11, 0.9)
    np.testing.assert_allclose(res.lower, lo, rtol=0, atol=1e-9)
    np.testing.assert_allclose(res.upper, hi, rtol=0, atol=1e-9)
    means = values.mean(0)
    np.testing.assert_allclose(res.difference, means[None] - means[:, None], atol=1e-12)
    assert res.sequences == len(set(labels)) and res.frames == 90
    assert res.lower[0, 1] < res.difference[0, 1] < res.upper[0, 1]
    np.testing.assert_allclose(res.lower, -res.upper.T, atol=1e-9)  # b-a mirrors a-b


def test_planted_difference_is_covered_about_95_percent_of_the_time():
    """Coverage of the planted difference over 200 simulated worlds is near 95 %; a frame
    bootstrap on the same data covers far less often (frames of a video are correlated)."""
    rng = np.random.default_rng(0)
    delta, hits, frame_hits, trials = -2.4, 0, 0, 200
    for t in range(trials):
        values, labels = correlated_world(rng, 40, delta)
        res = paired_bootstrap(values, labels, resamples=400, seed=t)
        hits += res.lower[0, 1] <= delta <= res.upper[0, 1]
        frames = paired_bootstrap(values, np.arange(len(values)), resamples=400, seed=t)
        frame_hits += frames.lower[0, 1] <= delta <= frames.upper[0, 1]
    assert 0.89 <= hits / trials <= 0.99, hits
    assert frame_hits / trials < 0.7, frame_hits


def test_planted_and_null_single_world():
    rng = np.random.default_rng(5)
    values, labels = correlated_world(rng, 60, -2.4)
    res = paired_bootstrap(values, labels)
    assert res.lower[0, 1] <= -2.4 <= res.upper[0, 1] < 0
    values, labels = correlated_world(rng, 60, 0.0)
    res = paired_bootstrap(values, labels)
    assert res.lower[0, 1] <= 0.0 <= res.upper[0, 1]


def test_identical_columns_give_a_zero_interval():
    """Pairing: the same draws for both columns, so equal columns differ by exactly 0."""
    rng = np.random.default_rng(2)
    values, labels = correlated_world(rng, 20, 1.0)
    res = paired_bootstrap(values[:, [0, 0]], labels)
    assert res.lower[0, 1] == 0.0 and res.upper[0, 1] == 0.0


def test_deterministic_and_seeded():
    rng = np.random.default_rng(4)
    values, labels = correlated_world(rng, 30, 1.0)
    a = paired_bootstrap(values, labels, seed=7)
    b = paired_bootstrap(values, labels, seed=7)
    c = paired_bootstrap(values, labels, seed=8)
    assert a.lower.tobytes() == b.lower.tobytes() and a.upper.tobytes() == b.upper.tobytes()
    assert a.lower[0, 1] != c.lower[0, 1]
    # labels only group: renaming them in the same order changes nothing
    d = paired_bootstrap(values, np.array([f"seq{x:03d}" for x in labels]), seed=7)
    assert d.lower.tobytes() == a.lower.tobytes()


def test_one_sequence_has_no_interval_and_bad_input_is_refused():
    res = paired_bootstrap(np.ones((5, 2)), np.zeros(5, int))
    assert res.lower is None and res.upper is None and res.sequences == 1
    with pytest.raises(JregfixError, match="NaN"):
        paired_bootstrap(np.array([[1.0, np.nan]]), np.zeros(1, int))
    with pytest.raises(JregfixError, match="--bootstrap"):
        paired_bootstrap(np.ones((4, 2)), np.arange(4), resamples=0)
    with pytest.raises(JregfixError, match="labels"):
        paired_bootstrap(np.ones((4, 2)), np.arange(3))
