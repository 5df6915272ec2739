"""Rank rules: from a layer's spectrum to the rank it keeps.  Pure NumPy.

Per-layer rules see only the singular values and the matrix shape:

* ``energy``: the adaptive rank of ARSVD, the smallest ``r`` with
  ``sum_{i<=r} s_i^2 >= E * sum_i s_i^2``, chosen per layer.
* ``entropy``: ARSVD's spectral-entropy rule, the smallest ``r`` whose values hold the fraction
  ``tau`` of the spectral entropy ``H = -sum_i p_i log p_i``, ``p_i = s_i / sum_j s_j``.
* ``rank``: a fixed rank ``N`` for every layer, capped at ``min(m, n)``.

``rank_multiple K`` then rounds the rank up to a multiple of ``K`` (friendlier to GEMM kernels),
never past break-even.

Break-even: factoring saves parameters (and multiply-accumulates per activation row) only when
``r (m + n) < m n``; :func:`break_even_rank` returns the largest such ``r``.

Spectral entropy
----------------
With ``p_i = s_i / sum_j s_j`` and ``H = -sum_i p_i log p_i``, :func:`entropy_rank` keeps the
smallest ``k`` with ``sum_{i<=k} -p_i log p_i >= tau H``.  It weighs the singular values
linearly (not squared) and counts each one by its share of the entropy, so the tail of a slowly
decaying spectrum counts for more than under the energy rule: at the same threshold it keeps a
higher rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RULES", "RankChoice", "choose_rank", "choice_at", "energy_rank", "energy_kept", "relative_error", "break_even_rank", "lowrank_params", "round_rank", "entropy_terms", "entropy_rank", "entropy_kept"]


# Relative slack when comparing cumulative energy with a threshold: without it an exactly
# rank-r matrix asked for E = 1.0 would get r + 1, because rounding leaves s_{r+1} ~ 1e-7 s_1.
_ENERGY_RTOL = 1e-9


RULES = ("energy", "entropy")


def _cumulative_energy(s: np.ndarray, total: float | None = None) -> np.ndarray:
    """``E(1), E(2), ...``; ``total`` is ``sum_i s_i^2`` over the whole spectrum when ``s`` holds
    only its leading values (``||W||_F^2``, known without the rest)."""
    s = s.astype(np.float64)
    top = float(np.max(s)) if s.size else 0.0
    scale = top if top > 0 else 1.0  # scaled: the squares of huge values stay finite
    sq = np.square(s / scale)
    whole = sq.sum() if total is None else float(total) / scale**2
    if whole == 0:
        return np.ones_like(sq)
    return np.cumsum(sq) / whole


def energy_rank(s: np.ndarray, energy: float, total: float | None = None) -> int:
    """Smallest ``r >= 1`` with ``E(r) >= energy``.

    Args:
        s: Singular values, descending (the leading ones, with ``total``).
        energy: Threshold in ``(0, 1]``.
        total: ``sum_i s_i^2`` of the whole spectrum, when ``s`` is only its top.

    Returns:
        The rank, between 1 and ``len(s)``.
    """
    return _threshold_rank(_cumulative_energy(s, total), energy, "energy")


def _check_threshold(value: float, name: str) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"Got {name}={value!r}; expected a number in (0, 1].")


def _threshold_rank(cum: np.ndarray, threshold: float, name: str = "threshold") -> int:
    """Smallest ``r >= 1`` whose normalized cumulative share ``cum[r - 1]`` reaches ``threshold``."""
    _check_threshold(threshold, name)
    r = int(np.searchsorted(cum, threshold - _ENERGY_RTOL, side="left")) + 1
    return max(1, min(r, len(cum)))


def energy_kept(s: np.ndarray, rank: int, total: float | None = None) -> float:
    """``E(rank)``: the fraction of ``sum s_i^2`` (or of ``total``) held by the top ``rank`` values."""
    if rank <= 0:
        return 0.0
    cum = _cumulative_energy(s, total)
    return float(min(1.0, cum[min(rank, len(s)) - 1]))


def relative_error(s: np.ndarray, rank: int, total: float | None = None) -> float:
    """Relative Frobenius error of the rank-``rank`` truncation, ``sqrt(1 - E(rank))``."""
    return float(np.sqrt(max(0.0, 1.0 - energy_kept(s, rank, total))))


def break_even_rank(m: int, n: int) -> int:
    """Largest ``r`` with ``r (m + n) < m n``: above it factoring saves nothing."""
    return (m * n - 1) // (m + n)


def lowrank_params(m: int, n: int, rank: int) -> int:
    """Parameters of the two factors, ``rank (m + n)``."""
    return rank * (m + n)


def round_rank(rank: int, multiple: int, m: int, n: int, limit: int | None = None) -> int:
    """Round ``rank`` up to a multiple of ``multiple``, never past break-even or ``min(m, n)``.

    When rounding up would cross break-even, ``rank`` is returned unchanged.

    Args:
        limit: A break-even rank to use instead of the parameter one (a Conv's MAC break-even).
    """
    if multiple <= 1:
        return rank
    limit = min(break_even_rank(m, n) if limit is None else limit, min(m, n))
    up = -(-rank // multiple) * multiple
    if up <= limit:
        return up
    return rank


def entropy_terms(s: np.ndarray) -> np.ndarray:
    """``-p_i log p_i`` with ``p_i = s_i / sum_j s_j`` (natural log; ``0 log 0 = 0``)."""
    s = np.asarray(s, dtype=np.float64)
    total = s.sum()
    if total <= 0:
        return np.zeros_like(s)
    p = s / total
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(p > 0, -p * np.log(p), 0.0)
    return h


def entropy_rank(s: np.ndarray, tau: float) -> int:
    """Smallest ``k >= 1`` with ``sum_{i<=k} -p_i log p_i >= tau H`` (ARSVD's spectral-entropy rule),
    for singular values ``s`` (descending) and ``tau`` in ``(0, 1]``; between 1 and ``len(s)``."""
    _check_threshold(tau, "tau")
    h = entropy_terms(s)
    total = h.sum()
    if total <= 0:  # a single non-zero value (or none): all information is in the first
        return 1
    return _threshold_rank(np.cumsum(h) / total, tau, "tau")


def entropy_kept(s: np.ndarray, rank: int) -> float:
    """Fraction of the spectral entropy ``H`` held by the top ``rank`` values."""
    h = entropy_terms(s)
    total = h.sum()
    if rank <= 0:
        return 0.0
    if total <= 0:
        return 1.0
    return float(min(1.0, h[: min(rank, len(s))].sum() / total))


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
    rule: str = "energy",
    break_even: int | None = None,
    total: float | None = None,
) -> RankChoice:
    """Apply the configured rule to singular values ``s`` of an ``(m, n)`` matrix.

    Exactly one of ``energy`` and ``rank`` is used; ``rank`` wins when both are given.  With
    ``rule="entropy"``, ``energy`` is the entropy threshold ``tau``.

    Args:
        break_even: The largest rank that still saves, when it is not the parameter break-even
            of ``(m, n)`` (a Conv's MAC count can break even earlier).
        total: ``sum_i s_i^2`` of the whole spectrum, when ``s`` holds only its leading values
            (the entropy rule needs every value).
    """
    full = min(m, n)
    if rank is not None:
        r = min(int(rank), full)
    elif energy is not None:
        if rule == "energy":
            r = energy_rank(s, energy, total)
        elif rule == "entropy":
            if total is not None and len(s) < full:
                raise ValueError("Got the leading singular values only; the entropy rule needs every value.")
            r = entropy_rank(s, energy)
        else:
            raise ValueError(f"Got rule={rule!r}; expected one of {', '.join(RULES)}.")
    else:
        raise ValueError("Got neither energy nor rank; expected one of them.")
    be = break_even_rank(m, n) if break_even is None else break_even
    r = round_rank(r, rank_multiple, m, n, limit=be)
    return choice_at(s, m, n, r, break_even=be, total=total)


def choice_at(s: np.ndarray, m: int, n: int, r: int, break_even: int | None = None, total: float | None = None) -> RankChoice:
    """The :class:`RankChoice` for a rank decided elsewhere (a budget, a measurement)."""
    return RankChoice(
        rank=r,
        full_rank=min(m, n),
        break_even=break_even_rank(m, n) if break_even is None else break_even,
        energy=energy_kept(s, r, total),
        rel_error=relative_error(s, r, total),
    )
