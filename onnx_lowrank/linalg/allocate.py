"""Global budgets: one rank per layer under a shared budget.  Pure NumPy.

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

from .rank import break_even_rank

__all__ = ["BudgetError", "Options", "rank_options", "allocate"]


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
    limit = min(break_even_rank(m, n), m, n)
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
