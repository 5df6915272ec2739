"""Rank rules: from a layer's spectrum to the rank it keeps.

A rule sees only the singular values and the matrix shape (NumPy, no onnx).  The rules:

* ``energy``: the adaptive rank of ARSVD, the smallest ``r`` with
  ``sum_{i<=r} s_i^2 >= E * sum_i s_i^2``, chosen per layer.
* ``rank``: a fixed rank ``N`` for every layer, capped at ``min(m, n)``.

``rank_multiple K`` then rounds the rank up to a multiple of ``K`` (friendlier to GEMM kernels),
never past break-even.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import decompose

__all__ = ["RankChoice", "choose_rank"]


@dataclass(frozen=True)
class RankChoice:
    """The outcome of a rank rule for one matrix.

    Attributes:
        rank: Rank kept.
        full_rank: ``min(m, n)``.
        break_even: Largest rank that still saves parameters.
        energy: Energy kept at ``rank``.
        rel_error: Relative Frobenius error at ``rank``.
    """

    rank: int
    full_rank: int
    break_even: int
    energy: float
    rel_error: float

    @property
    def saves(self) -> bool:
        return self.rank <= self.break_even


def choose_rank(
    s: np.ndarray,
    m: int,
    n: int,
    *,
    energy: float | None = None,
    rank: int | None = None,
    rank_multiple: int = 1,
    break_even: int | None = None,
) -> RankChoice:
    """Apply the configured rule to singular values ``s`` of an ``(m, n)`` matrix.

    Exactly one of ``energy`` and ``rank`` is used; ``rank`` wins when both are given.

    Args:
        break_even: The largest rank that still saves, when it is not the parameter break-even
            of ``(m, n)`` (a Conv's MAC count can break even earlier).
    """
    full = min(m, n)
    if rank is not None:
        r = min(int(rank), full)
    elif energy is not None:
        r = decompose.energy_rank(s, energy)
    else:
        raise ValueError("Got neither energy nor rank; expected one of them.")
    be = decompose.break_even_rank(m, n) if break_even is None else break_even
    r = decompose.round_rank(r, rank_multiple, m, n, limit=be)
    return RankChoice(
        rank=r,
        full_rank=full,
        break_even=be,
        energy=decompose.energy_kept(s, r),
        rel_error=decompose.relative_error(s, r),
    )
