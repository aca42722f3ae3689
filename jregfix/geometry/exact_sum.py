"""Order-independent sums of float64 arrays: each addend split exactly onto fixed binary grids.

Floating-point addition is not associative, so a Gram matrix summed over frames in another
grouping (shards, ranks of a distributed job, a resumed run) differs in its last bits, and an
ill-conditioned solve downstream can turn 1e-16 into 1e-7. Here every addend x is split into
pieces q_k, each a multiple of its grid 2^e_k (e_k = LOW + 32 k), with |q_k| < 2^(e_k + 32) below
the top grid. Limb k keeps the running sum of the q_k in a float64; as long as it stays below
2^(e_k + 53) every such addition is exact, so each limb -- and hence the total, added up limb by
limb in a fixed order -- does not depend on the order or grouping of the additions (nor on how
they were spread over processes and combined with an all-reduce).

Limits: |x| < 2^64 per addend and at most 2^20 additions: a piece is at most 2^(e_k + 31)
below the top grid and at most 2^64 on it, so every limb stays below 2^(e_k + 53) (exactly
representable). Bits of x below 2^LOW = 2^-64 are rounded away, an absolute error of at most
2^-65 per addend (for sums of squared metres over frames, far below float64 rounding of the
totals).
"""

from __future__ import annotations

import numpy as np

from jregfix.errors import JregfixError

LOW = -64
LIMBS = 4
GRID_STEP = 32
TOP = LOW + GRID_STEP * (LIMBS - 1)


def split_limbs(x: np.ndarray) -> np.ndarray:
    """float64 array (…) -> limbs (LIMBS, …), limb k a multiple of 2^(LOW + 32 k), summing to
    x up to the dropped bits below 2^LOW."""
    limbs = np.zeros((LIMBS, *np.shape(x)))
    add_to_limbs(limbs, x)
    return limbs


def add_to_limbs(limbs: np.ndarray, x: np.ndarray) -> None:
    """limbs += split_limbs(x), in place, with two temporaries of x's size."""
    rest = np.array(x, dtype=np.float64)  # a copy: it is consumed below
    if not np.isfinite(rest).all():
        raise JregfixError("cannot sum NaN/inf exactly")
    peak = float(np.abs(rest).max(initial=0.0))
    if peak >= 2.0 ** (TOP + GRID_STEP):
        raise JregfixError(f"value {peak:.3g} is beyond the exact-sum range 2^64 (wrong units?)")
    piece = np.empty_like(rest)
    for k in reversed(range(LIMBS)):
        exponent = LOW + GRID_STEP * k
        if peak < 2.0 ** (exponent - 1):  # everything rounds to 0 on this grid
            continue
        # adding and removing 1.5 * 2^(e+52) rounds to a multiple of 2^e exactly (|rest| is
        # far below 2^(e+51)); the remainder rest - piece is exact too
        shift = 1.5 * 2.0 ** (exponent + 52)
        np.add(rest, shift, out=piece)
        piece -= shift
        rest -= piece
        limbs[k] += piece
        peak = 2.0 ** (exponent - 1)


def limbs_value(limbs: np.ndarray) -> np.ndarray:
    """Limbs (LIMBS, …) -> float64 (…), a fixed function of the limbs."""
    out = limbs[0].copy()
    for k in range(1, LIMBS):  # low to high: the same operations for the same limbs
        out += limbs[k]
    return out


class ExactSum:
    """A running sum of float64 arrays of one shape whose value ignores the order of addition."""

    def __init__(self, shape: tuple[int, ...], limbs: np.ndarray | None = None):
        self.shape = tuple(shape)
        self.limbs = np.zeros((LIMBS, *self.shape)) if limbs is None else limbs
        if self.limbs.shape != (LIMBS, *self.shape) or self.limbs.dtype != np.float64:
            raise JregfixError(
                f"exact-sum limbs have shape {self.limbs.shape} "
                f"({self.limbs.dtype}), expected {(LIMBS, *self.shape)} float64"
            )

    def add(self, x: np.ndarray) -> None:
        if x.shape != self.shape:
            raise JregfixError(f"adding shape {x.shape} to an exact sum of shape {self.shape}")
        add_to_limbs(self.limbs, x)

    def merge(self, other: ExactSum) -> None:
        if other.shape != self.shape:
            raise JregfixError(f"merging exact sums of shapes {other.shape} and {self.shape}")
        self.limbs += other.limbs

    def value(self) -> np.ndarray:
        return limbs_value(self.limbs)
