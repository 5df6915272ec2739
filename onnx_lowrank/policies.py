"""Rank rules: from a layer's spectrum to the rank it keeps.  Pure NumPy; never imports onnx.

Per-layer rules see only the singular values and the matrix shape:

* ``energy``: the adaptive rank of ARSVD, the smallest ``r`` with
  ``sum_{i<=r} s_i^2 >= E * sum_i s_i^2``, chosen per layer.
* ``entropy``: ARSVD's spectral-entropy rule, the smallest ``r`` whose values hold the fraction
  ``tau`` of the spectral entropy ``H = -sum_i p_i log p_i``, ``p_i = s_i / sum_j s_j``.
* ``rank``: a fixed rank ``N`` for every layer, capped at ``min(m, n)``.

``rank_multiple K`` then rounds the rank up to a multiple of ``K`` (friendlier to GEMM kernels),
never past break-even.

Global budgets (:func:`allocate`) see every layer at once.  Each layer offers a list of options,
ranks ``K, 2K, ...`` up to break-even and finally "leave dense", each with a cost (parameters
or MACs) and an error.  Starting from every layer at its cheapest option, the allocator buys
rank where the error falls most per unit of cost (greedy water-filling over the lower convex
hull of each layer's error-cost curve) until the budget is spent.  The last purchase of a layer
may stop between hull points, so the budget is met to within one rank step.  The error is any
per-layer curve: the normalized truncation error ``1 - E(r)`` (so the sum over layers is the
total normalized squared error), or a measured sensitivity.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from . import decompose

__all__ = ["RankChoice", "choose_rank", "choice_at", "RULES", "Options", "rank_options", "allocate", "BudgetError"]

RULES = ("energy", "entropy")


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
) -> RankChoice:
    """Apply the configured rule to singular values ``s`` of an ``(m, n)`` matrix.

    Exactly one of ``energy`` and ``rank`` is used; ``rank`` wins when both are given.  With
    ``rule="entropy"``, ``energy`` is the entropy threshold ``tau``.

    Args:
        break_even: The largest rank that still saves, when it is not the parameter break-even
            of ``(m, n)`` (a Conv's MAC count can break even earlier).
    """
    full = min(m, n)
    if rank is not None:
        r = min(int(rank), full)
    elif energy is not None:
        if rule == "energy":
            r = decompose.energy_rank(s, energy)
        elif rule == "entropy":
            r = decompose.entropy_rank(s, energy)
        else:
            raise ValueError(f"Got rule={rule!r}; expected one of {', '.join(RULES)}.")
    else:
        raise ValueError("Got neither energy nor rank; expected one of them.")
    be = decompose.break_even_rank(m, n) if break_even is None else break_even
    r = decompose.round_rank(r, rank_multiple, m, n, limit=be)
    return choice_at(s, m, n, r, break_even=be)


def choice_at(s: np.ndarray, m: int, n: int, r: int, break_even: int | None = None) -> RankChoice:
    """The :class:`RankChoice` for a rank decided elsewhere (a budget, a measurement)."""
    return RankChoice(
        rank=r,
        full_rank=min(m, n),
        break_even=decompose.break_even_rank(m, n) if break_even is None else break_even,
        energy=decompose.energy_kept(s, r),
        rel_error=decompose.relative_error(s, r),
    )


class BudgetError(ValueError):
    """The budget is below what the cheapest options of every layer cost."""

    def __init__(self, needed: int, budget: int):
        super().__init__(f"the cheapest allocation costs {needed:,}, more than the budget {budget:,}")
        self.needed = needed
        self.budget = budget


@dataclass(frozen=True)
class Options:
    """What one layer may become under a budget.

    Attributes:
        ranks: Allowed ranks, ascending; the final option ``None`` means "leave dense".
        errors: Error of each option (the dense option's is 0), shape ``(len(ranks),)``.
        costs: Cost of each option for each budget, shape ``(len(ranks), budgets)``.
    """

    ranks: tuple[int | None, ...]
    errors: np.ndarray
    costs: np.ndarray


def rank_options(m: int, n: int, rank_multiple: int = 1) -> list[int]:
    """Ranks a budget may give an ``(m, n)`` matrix: multiples of ``rank_multiple`` up to break-even."""
    limit = min(decompose.break_even_rank(m, n), m, n)
    step = max(1, int(rank_multiple))
    ranks = list(range(step, limit + 1, step))
    if not ranks and limit >= 1 and step > 1:
        ranks = list(range(1, limit + 1))
    return ranks


def _hull(costs: np.ndarray, errors: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of (cost, error) points, cost ascending, error falling."""
    hull: list[int] = []
    for i in range(len(costs)):
        if hull and errors[i] >= errors[hull[-1]]:
            continue  # costs more and does no better than a point already on the hull
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the chord a -> i: drop it
            if (errors[b] - errors[a]) * (costs[i] - costs[a]) >= (errors[i] - errors[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(layers: list[Options], budgets: list[float], weights: list[float] | None = None) -> list[int]:
    """Greedy water-filling: the option per layer that minimizes the summed error within budget.

    Args:
        layers: Each layer's options (costs strictly increasing along the options).
        budgets: The most each cost may total over all layers (one entry per cost column).
        weights: How to combine several costs into one price (default: ``1 / budget`` each, so
            a step's price is the fraction of each budget it uses).

    Returns:
        The chosen option index per layer.  The totals stay within every budget; no layer
        could take its next option without breaking one (so the budgets are met to within
        one step of some layer).

    Raises:
        BudgetError: even the cheapest option of every layer breaks a budget.
    """
    budgets_a = np.asarray(budgets, dtype=np.float64)
    w = np.asarray(weights if weights is not None else 1.0 / np.maximum(budgets_a, 1e-300), dtype=np.float64)
    chosen = [0] * len(layers)
    spent = np.sum([o.costs[0] for o in layers], axis=0) if layers else np.zeros_like(budgets_a)
    over = np.flatnonzero(spent > budgets_a)
    if over.size:
        k = int(over[0])
        raise BudgetError(int(spent[k]), int(budgets_a[k]))
    hulls = [_hull(o.costs @ w, o.errors) for o in layers]
    pos = [0] * len(layers)  # position on each layer's hull

    heap: list[tuple[float, int]] = []

    def push(i: int) -> None:
        h, p = hulls[i], pos[i]
        if p + 1 < len(h):
            o = layers[i]
            a, b = h[p], h[p + 1]
            price = float((o.costs[b] - o.costs[a]) @ w)
            gain = float(o.errors[a] - o.errors[b])
            heapq.heappush(heap, (-gain / max(price, 1e-300), i))

    for i in range(len(layers)):
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        o = layers[i]
        cur = chosen[i]
        target = hulls[i][pos[i] + 1]
        if np.all(spent - o.costs[cur] + o.costs[target] <= budgets_a):
            spent = spent - o.costs[cur] + o.costs[target]
            chosen[i] = target
            pos[i] += 1
            push(i)
            continue
        # Stop between hull points: the costliest intermediate option that still fits.
        for j in range(target - 1, cur, -1):
            if np.all(spent - o.costs[cur] + o.costs[j] <= budgets_a) and o.errors[j] <= o.errors[cur]:
                spent = spent - o.costs[cur] + o.costs[j]
                chosen[i] = j
                break
    return chosen
