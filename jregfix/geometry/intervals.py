"""Paired bootstrap intervals of differences of frame-means, resampling whole sequences.

Neighbouring frames of a video are strongly correlated, so resampling frames would make
intervals far too narrow. The unit of resampling is the sequence (for Human3.6M one subject,
action and camera video): a resample draws S sequences with replacement out of the S present,
and its statistic is the mean over all frames of the drawn sequences, so each sequence counts
with its number of frames (the same mean over frames as the point estimate). The draw is shared
by every column (regressor), which makes the differences paired.

Everything reduces to per-sequence sums: with ``C`` (B, S) the number of times each sequence is
drawn in each resample, the resampled means are ``(C @ sums) / (C @ counts)``; the cost is
O(N + B S R) for N frames and R columns, independent of N per resample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jregfix.errors import JregfixError


@dataclass(frozen=True)
class PairedIntervals:
    """Differences of column means and their percentile bootstrap intervals.

    ``difference[a, b]`` = mean of column b - mean of column a (R, R); ``lower``/``upper``
    (R, R) the interval bounds, None when fewer than two sequences exist (a resample of one
    sequence is that sequence: no spread to estimate). ``means`` (R,) frame means.
    """

    means: np.ndarray
    difference: np.ndarray
    lower: np.ndarray | None
    upper: np.ndarray | None
    sequences: int
    frames: int
    resamples: int
    seed: int
    level: float


def sequence_sums(
    values: np.ndarray, sequence: np.ndarray, num_sequences: int
) -> tuple[np.ndarray, np.ndarray]:
    """values (N, R), sequence (N,) int in [0, S) -> sums (S, R) and frame counts (S,)."""
    counts = np.bincount(sequence, minlength=num_sequences).astype(np.float64)
    sums = np.stack(
        [
            np.bincount(sequence, weights=values[:, r], minlength=num_sequences)
            for r in range(values.shape[1])
        ],
        axis=1,
    )
    return sums, counts


def resample_indices(num_sequences: int, resamples: int, seed: int) -> np.ndarray:
    """(B, S) int64: row b lists the S sequences drawn (with replacement) by resample b.

    ``np.random.default_rng(seed).integers(0, S, (B, S))``: the draws depend only on S, B and
    the seed, so equal inputs give equal intervals on every machine.
    """
    return np.random.default_rng(seed).integers(0, num_sequences, size=(resamples, num_sequences))


def draw_counts(indices: np.ndarray, num_sequences: int) -> np.ndarray:
    """(B, S) drawn indices -> (B, S) float64 multiplicities of each sequence per resample."""
    b = indices.shape[0]
    flat = (np.arange(b)[:, None] * num_sequences + indices).ravel()
    return (
        np.bincount(flat, minlength=b * num_sequences).reshape(b, num_sequences).astype(np.float64)
    )


def paired_bootstrap(
    values: np.ndarray,
    sequence: np.ndarray,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedIntervals:
    """Percentile intervals of every pairwise difference of column means.

    values: (N, R) per-frame errors, one column per regressor. sequence: (N,) int codes of the
    frames' sequences (any integers; they are renumbered). Returns :class:`PairedIntervals`;
    the bounds are the ``(1 - level)/2`` and ``(1 + level)/2`` quantiles (numpy's linear
    interpolation) of the B resampled differences.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or len(values) == 0:
        raise JregfixError(f"bootstrap: values must be (N, R) with N > 0, got {values.shape}")
    if not np.isfinite(values).all():
        raise JregfixError("bootstrap: per-frame errors contain NaN or inf")
    if resamples < 1:
        raise JregfixError(f"--bootstrap must be a positive number of resamples, got {resamples}")
    if not 0 < level < 1:
        raise JregfixError(f"bootstrap: level must lie in (0, 1), got {level}")
    _, codes = np.unique(np.asarray(sequence), return_inverse=True)
    codes = codes.reshape(-1)
    if len(codes) != len(values):
        raise JregfixError(f"bootstrap: {len(codes)} sequence labels for {len(values)} frames")
    s = int(codes.max()) + 1
    sums, counts = sequence_sums(values, codes, s)
    means = sums.sum(0) / counts.sum()
    difference = means[None, :] - means[:, None]
    lower = upper = None
    if s >= 2:
        c = draw_counts(resample_indices(s, resamples, seed), s)
        boot = (c @ sums) / (c @ counts)[:, None]  # (B, R) resampled frame means
        diffs = boot[:, None, :] - boot[:, :, None]  # (B, R, R): [b, a, c] = col c - col a
        lower, upper = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return PairedIntervals(means, difference, lower, upper, s, len(values), resamples, seed, level)
