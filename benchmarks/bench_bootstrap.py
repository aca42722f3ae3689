"""Paired sequence bootstrap: time for a full Human3.6M protocol-1 sized evaluation.

    .venv/bin/python benchmarks/bench_bootstrap.py [--frames 110000] [--regressors 4]
        [--sequences 236] [--resamples 2000] [--naive-resamples 40]

Per-frame errors are synthetic (correlated within each sequence); labels are strings like the
GT's ``S9_Directions_1.54138969``. The timed call is what `evaluate` does per method: one
:func:`paired_bootstrap` per metric (MPJPE and PA-MPJPE), grouping the string labels included.
Target: at most 2 s for 110k frames x 4 regressors and 2000 resamples. The reference is the
naive loop (per resample, gather the frames of the drawn sequences and average them); it runs
``--naive-resamples`` resamples and its per-resample rate gives the ratio. Both sides are timed
in this one run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jregfix.geometry.intervals import paired_bootstrap


def synthetic(frames: int, regressors: int, sequences: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = np.sort(rng.integers(0, sequences, frames))
    labels = np.array(
        [f"S{9 + 2 * (s % 2)}_Action_{s // 8}.{54138969 + (s // 2) % 4}" for s in range(sequences)]
    )[codes]
    level = rng.normal(55, 10, sequences)[codes] + rng.normal(0, 5, frames)
    shift = rng.normal(0, 2, (sequences, regressors))[codes] + rng.normal(
        0, 1, (frames, regressors)
    )
    mpjpe = level[:, None] + shift
    return mpjpe, 0.7 * mpjpe, labels


def naive(values: np.ndarray, labels: np.ndarray, resamples: int, seed: int) -> float:
    """Seconds per resample of the per-frame loop (same draws as the library)."""
    names, codes = np.unique(labels, return_inverse=True)
    frames_of = [np.flatnonzero(codes == s) for s in range(len(names))]
    draws = np.random.default_rng(seed).integers(0, len(names), (resamples, len(names)))
    t0 = time.perf_counter()
    for row in draws:
        idx = np.concatenate([frames_of[s] for s in row])
        means = values[idx].mean(0)
        _ = means[None, :] - means[:, None]
    return (time.perf_counter() - t0) / resamples


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=110_000)
    ap.add_argument("--regressors", type=int, default=4)
    ap.add_argument("--sequences", type=int, default=236)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--naive-resamples", type=int, default=40)
    args = ap.parse_args()
    mpjpe, pa, labels = synthetic(args.frames, args.regressors, args.sequences)

    t0 = time.perf_counter()
    res = {
        name: paired_bootstrap(v, labels, args.resamples, seed=0)
        for name, v in (("MPJPE", mpjpe), ("PA-MPJPE", pa))
    }
    fast = time.perf_counter() - t0
    per_resample = naive(mpjpe, labels, args.naive_resamples, seed=0)
    slow = 2 * per_resample * args.resamples  # two metrics, as above

    print(
        f"{args.frames} frames x {args.regressors} regressors, {res['MPJPE'].sequences} "
        f"sequences, {args.resamples} resamples, both metrics"
    )
    print(f"  paired_bootstrap: {fast:.3f} s  (target <= 2 s: {'met' if fast <= 2 else 'MISSED'})")
    print(
        f"  naive per-frame loop: {slow:.1f} s extrapolated from {args.naive_resamples} "
        f"resamples ({1000 * per_resample:.1f} ms each); ratio {slow / fast:.0f}x"
    )
    r = res["MPJPE"]
    print(
        f"  e.g. MPJPE col1 - col0: {r.difference[0, 1]:+.2f} "
        f"[{r.lower[0, 1]:+.2f}, {r.upper[0, 1]:+.2f}] mm"
    )


if __name__ == "__main__":
    main()
