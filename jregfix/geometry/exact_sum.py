"""Order-independent sums of float64 arrays: fixed-point limbs in int64.

Floating-point addition is not associative, so a Gram matrix summed over frames in another
grouping (shards, ranks of a distributed job, a resumed run) differs in its last bits, and an
ill-conditioned solve downstream can turn 1e-16 into 1e-7. Here every addend is split exactly
into 32-bit pieces on fixed binary grids 2^(LOW + 32 k), k = 0..LIMBS-1, and the pieces are
summed as integers: integer addition is associative, so the total does not depend on the order
or grouping of the additions (nor on how the additions are spread over processes).

Range: |x| < 2^(LOW + 32 LIMBS) = 2^64 per addend; bits below 2^LOW = 2^-96 are dropped (an
absolute error of at most 2^-96 per addend, far below float64 rounding of the values we sum).
Each limb receives < 2^32 per addition, so 2^31 additions cannot overflow int64.
"""

from __future__ import annotations

import numpy as np

from jregfix.errors import JregfixError

LOW = -96
LIMBS = 5
LIMB_BITS = 32


def split_limbs(x: np.ndarray) -> np.ndarray:
    """float64 array (…) -> int64 limbs (LIMBS, …) with sum_k limbs[k] 2^(LOW+32k) = x
    (up to the dropped bits below 2^LOW)."""
    rest = np.array(x, dtype=np.float64)  # a copy: it is consumed below
    if not np.isfinite(rest).all():
        raise JregfixError("cannot sum NaN/inf exactly")
    peak = float(np.abs(rest).max(initial=0.0))
    if peak >= 2.0 ** (LOW + LIMB_BITS * LIMBS):
        raise JregfixError(f"value {peak:.3g} is beyond the exact-sum range 2^64 (wrong units?)")
    limbs = np.zeros((LIMBS, *rest.shape), dtype=np.int64)
    for k in reversed(range(LIMBS)):
        exponent = LOW + LIMB_BITS * k
        if peak < 2.0 ** exponent:  # every entry is below this grid: the limb stays 0
            continue
        # scaling by a power of two and truncating are exact; so is removing the truncated part
        piece = np.trunc(np.ldexp(rest, -exponent))
        limbs[k] = piece.astype(np.int64)
        rest -= np.ldexp(piece, exponent)
        peak = 2.0 ** exponent
    return limbs


def limbs_value(limbs: np.ndarray) -> np.ndarray:
    """int64 limbs (LIMBS, …) -> float64 (…), a fixed function of the limbs."""
    out = np.zeros(limbs.shape[1:], dtype=np.float64)
    for k in range(LIMBS):  # low to high: the same operations for the same limbs
        out += np.ldexp(limbs[k].astype(np.float64), LOW + LIMB_BITS * k)
    return out


class ExactSum:
    """A running sum of float64 arrays of one shape whose value ignores the order of addition."""

    def __init__(self, shape: tuple[int, ...], limbs: np.ndarray | None = None):
        self.shape = tuple(shape)
        self.limbs = np.zeros((LIMBS, *self.shape), np.int64) if limbs is None else limbs
        if self.limbs.shape != (LIMBS, *self.shape) or self.limbs.dtype != np.int64:
            raise JregfixError(f"exact-sum limbs have shape {self.limbs.shape} "
                               f"({self.limbs.dtype}), expected {(LIMBS, *self.shape)} int64")

    def add(self, x: np.ndarray) -> None:
        if x.shape != self.shape:
            raise JregfixError(f"adding shape {x.shape} to an exact sum of shape {self.shape}")
        self.limbs += split_limbs(x)

    def merge(self, other: ExactSum) -> None:
        if other.shape != self.shape:
            raise JregfixError(f"merging exact sums of shapes {other.shape} and {self.shape}")
        self.limbs += other.limbs

    def value(self) -> np.ndarray:
        return limbs_value(self.limbs)
