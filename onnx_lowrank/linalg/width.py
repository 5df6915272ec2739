"""Width reduction of a feed-forward block: keep ``k`` of its ``f`` hidden neurons and refit the
second projection in closed form.  Pure NumPy.

A feed-forward block computes ``y = phi(x W1 + b1) W2 + b2`` with ``f`` hidden neurons
(``W1``: (d, f), ``W2``: (f, e)).  Dropping neuron ``j`` removes column ``j`` of ``W1``, entry
``j`` of ``b1`` and row ``j`` of ``W2``: no factor pair, no extra product, the block is simply
narrower, so parameters, MACs and latency all fall by ``(f - k) / f`` of the block.

Which neurons.  With ``H = phi(x W1 + b1)`` the hidden activations over the calibration rows and
``C = H^T H`` their Gram (the input Gram of ``W2``, which the data-aware statistics capture
anyway), neuron ``j`` contributes ``H_j W2_j`` to the output, of energy ``C_jj ||W2_j||^2``.
That score ignores the refit: a neuron whose output the others predict well costs little to
drop however large it is.  The default selection (``"refit"``, :func:`removal_order`) accounts
for it, greedily, as optimal brain surgeon does for single weights: starting from all neurons and
the refit on them, drop the neuron whose removal the refit of the rest recovers best, update the
refit, repeat.  With ``A = C_SS + lambda I`` (centred when the fit has an intercept) and ``V`` the
current refit, dropping neuron ``j`` raises the error by ``||V_j||^2 / (A^-1)_jj`` and moves the
others by ``-A^-1_{:j} V_j / (A^-1)_jj``; the inverse is downdated the same way.  One elimination
orders every neuron, so the kept sets of all widths are nested.  Neurons are removed a few at a
time (``|S| / 128``, their joint update exact); between exact recomputations of the inverse
(whenever half the set has gone) the downdates pile up as a low-rank correction instead of
shrinking a dense inverse at each step.  One core orders a 1536-neuron block in about 2 s
(down to a quarter of it), a 3072-neuron one in about 11 s (all the way).  The older ``"energy"``
selection keeps the neurons of highest :func:`neuron_scores`.  (Ridge leverage, which also
accounts for the refit, saturates with a small ridge and made the end-to-end result worse.)

The refit.  The dropped neurons' contribution is mostly predictable from the kept ones (hidden
units are strongly correlated).  The second projection of the kept neurons is refitted by least
squares over the calibration rows, ``min ||H W2 - H_S W2' - 1 c||``:

    [W2'; c] = (Z^T Z + lambda D)^-1 Z^T H W2,   Z = [H_S, 1]

which needs only ``C``, the column sums ``s = H^T 1`` and the row count ``N``:
``Z^T Z = [[C_SS, s_S], [s_S^T, N]]``, ``Z^T H = [C_S:, s^T]``.  ``c`` (the intercept) moves
into the bias ``b2`` when the block has one; otherwise it is left out of the fit.  ``lambda`` is
``damping`` times the mean of ``diag(C_SS)``, on the neuron part only (``D`` = identity there,
0 for the intercept), the same relative damping the whitened SVD uses.

The error of keeping ``k`` neurons is the output energy the refit cannot recover, relative to
the block's output energy ``tr(W2^T C W2)``: directly comparable with a factor pair's whitened
truncation error ``1 - E(r)`` (both are ``||H W - H W~||^2 / ||H W||^2`` over the same rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SELECTIONS", "neuron_scores", "removal_order", "neuron_priority", "keep_neurons", "WidthFit", "refit_width",
           "width_errors"]

#: How neurons are chosen: by the refit's greedy elimination, or by their own output energy.
SELECTIONS = ("refit", "energy")


def neuron_scores(gram: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """Output energy of each hidden neuron, ``C_jj ||W2_j||^2`` (``w2``: (f, e), one row per neuron)."""
    g = np.asarray(gram, dtype=np.float64)
    return np.clip(np.diag(g), 0.0, None) * np.sum(np.square(np.asarray(w2, dtype=np.float64)), axis=1)


def _ridge(g: np.ndarray, damping: float) -> float:
    lam = damping * float(np.mean(np.diag(g)))
    # a ridge of zero still needs a floor for a singular Gram (a dead neuron)
    return lam if lam > 0 else 1e-12 * max(float(np.max(np.abs(np.diag(g)))), 1e-300)


#: The elimination recomputes its inverse exactly once this share of the neurons it started
#: from is left (at 3/4 and at 1/2 the orders were the same on all-MiniLM-L6-v2's six blocks,
#: on random blocks of 300, 1536 and 3072 neurons and in the tests).
REFRESH = 0.5


def _refit_state(g: np.ndarray, gw: np.ndarray, lam: float, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``A^-1`` and the refit ``A^-1 C_S: W2`` of the neurons ``idx`` (``gw = C W2``)."""
    a = g[np.ix_(idx, idx)]
    a[np.diag_indices_from(a)] += lam
    try:
        inv = np.linalg.inv(a)
    except np.linalg.LinAlgError:
        inv = np.linalg.pinv(a, hermitian=True)
    return inv, inv @ gw[idx]


def removal_order(gram: np.ndarray, w2: np.ndarray, *, sums: np.ndarray | None = None, count: int = 0,
                  damping: float = 0.01, until: int = 1) -> np.ndarray:
    """Every neuron, in the order the refit's greedy elimination drops them (the last one is
    the most important); see the module docstring.  ``sums`` and ``count`` as for
    :func:`refit_width` (with them the Gram is centred: the intercept absorbs the means).  The
    elimination stops once ``until`` neurons are left, which then close the order by index
    (the smallest width a caller needs: the rest of the order is not computed)."""
    g, w, s = _check(gram, w2, sums)
    lam = _ridge(g, damping)  # as the refit's (relative to the uncentred Gram)
    if s is not None and count > 0:
        g = g - np.outer(s, s) / count
    stop = max(1, until)
    alive, order = np.arange(len(g)), []
    gw = g @ w
    while len(alive) > stop:
        # From an exact inverse until only REFRESH of these neurons is left.  Meanwhile the
        # inverse keeps its size and the removals pile up as a downdate, A^-1 of the rest =
        # (inv - U V^T) restricted to them: a step costs O(n r m), not the O(n^2) copy of
        # shrinking a dense inverse.
        inv, cur = _refit_state(g, gw, lam, alive)
        n0 = len(alive)
        diag = np.diag(inv).copy()
        live = np.ones(n0, bool)
        width = n0 - int(np.ceil(REFRESH * n0)) + max(1, n0 // 128) + 1
        u, v, used = np.empty((n0, width)), np.empty((n0, width)), 0
        while True:
            idx = np.flatnonzero(live)
            n = len(idx)
            rows = cur[idx]
            cost = np.sum(rows * rows, axis=1) / np.clip(diag[idx], 1e-300, None)
            m = min(max(1, n // 128), n - stop)
            pick = np.argpartition(cost, m - 1)[:m]
            pick = idx[pick[np.argsort(cost[pick], kind="stable")]]
            order.extend(alive[pick].tolist())
            live[pick] = False
            if n - m <= stop or n - m <= REFRESH * n0:
                break
            cols = inv[:, pick] - u[:, :used] @ v[pick, :used].T  # the columns of the current inverse
            sol = np.linalg.solve(cols[pick], np.hstack([cur[pick], cols.T]))
            e = cur.shape[1]
            cur -= cols @ sol[:, :e]
            down = sol[:, e:].T
            diag -= np.sum(cols * down, axis=1)
            u[:, used:used + m], v[:, used:used + m] = cols, down
            used += m
        alive = alive[live]
    order.extend(alive.tolist())
    return np.array(order, dtype=np.int64)


def neuron_priority(gram: np.ndarray, w2: np.ndarray, *, sums: np.ndarray | None = None, count: int = 0,
                    damping: float = 0.01, selection: str = "refit", until: int = 1) -> np.ndarray:
    """A score per neuron, higher kept first (:func:`keep_neurons`): the position in
    :func:`removal_order` (``"refit"``, valid for keeping ``until`` neurons or more) or
    :func:`neuron_scores` (``"energy"``)."""
    if selection == "energy":
        return neuron_scores(gram, w2)
    if selection != "refit":
        raise ValueError(f"unknown neuron selection {selection!r}; expected one of {', '.join(SELECTIONS)}.")
    order = removal_order(gram, w2, sums=sums, count=count, damping=damping, until=until)
    out = np.empty(len(order))
    out[order] = np.arange(len(order))
    return out


def keep_neurons(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` neurons of highest score, in their original order (ties: the lower index)."""
    f = len(scores)
    if not 1 <= k <= f:
        raise ValueError(f"cannot keep {k} of {f} neurons; expected 1 <= k <= {f}.")
    order = np.lexsort((np.arange(f), -np.asarray(scores, dtype=np.float64)))
    return np.sort(order[:k])


@dataclass(frozen=True)
class WidthFit:
    """The refitted second projection of the kept neurons.

    Attributes:
        keep: Indices of the kept neurons, ascending.
        w2: The refitted rows of ``W2``, shape ``(k, e)``, in float64.
        shift: What to add to ``b2`` (the fitted intercept), shape ``(e,)``; ``None`` without one.
        error: Output energy not recovered, relative to the block's (see the module docstring).
    """

    keep: np.ndarray
    w2: np.ndarray
    shift: np.ndarray | None
    error: float


def _check(gram: np.ndarray, w2: np.ndarray, sums: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    g = np.asarray(gram, dtype=np.float64)
    w = np.asarray(w2, dtype=np.float64)
    f = w.shape[0]
    if g.shape != (f, f):
        raise ValueError(f"Gram of shape {g.shape} does not match {f} neurons; expected ({f}, {f}).")
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(w))):
        raise ValueError("the Gram or the weight holds NaN or Inf values.")
    s = None if sums is None else np.asarray(sums, dtype=np.float64)
    if s is not None and s.shape != (f,):
        raise ValueError(f"column sums of shape {s.shape}; expected ({f},).")
    return g, w, s


def _fit(g: np.ndarray, w: np.ndarray, s: np.ndarray | None, count: int, keep: np.ndarray, damping: float,
         total: float) -> WidthFit:
    k = len(keep)
    cs = g[np.ix_(keep, keep)]
    cross = g[keep] @ w  # (k, e): C_S: W2
    ridge = damping * float(np.mean(np.diag(cs))) if k else 0.0
    if s is not None:
        zz = np.zeros((k + 1, k + 1))
        zz[:k, :k] = cs
        zz[:k, k] = zz[k, :k] = s[keep]
        zz[k, k] = float(count)
        zy = np.vstack([cross, (s @ w)[None, :]])
        reg = zz.copy()
        reg[np.arange(k), np.arange(k)] += ridge
    else:
        zz, zy = cs, cross
        reg = zz + ridge * np.eye(k)
    try:
        theta = np.linalg.solve(reg, zy)
    except np.linalg.LinAlgError:
        theta = np.linalg.lstsq(reg, zy, rcond=None)[0]
    # ||H W2 - Z theta||^2 = tr(W2^T C W2) - 2 tr(theta^T Z^T H W2) + tr(theta^T Z^T Z theta)
    rest = total - 2.0 * float(np.sum(theta * zy)) + float(np.sum(theta * (zz @ theta)))
    error = max(rest, 0.0) / total if total > 0 else 0.0
    if s is not None:
        return WidthFit(keep, theta[:k], theta[k], error)
    return WidthFit(keep, theta, None, error)


def refit_width(gram: np.ndarray, w2: np.ndarray, k: int, *, sums: np.ndarray | None = None, count: int = 0,
                damping: float = 0.01, selection: str = "refit", scores: np.ndarray | None = None) -> WidthFit:
    """Keep ``k`` neurons and refit ``W2`` on them.

    Args:
        gram: ``C = H^T H`` over the calibration rows, ``(f, f)``.
        w2: The second projection, one row per neuron, ``(f, e)``.
        k: Neurons to keep.
        sums, count: ``H^T 1`` and the number of rows: with them the fit has an intercept (for
            a block whose second projection has a bias); without, none.
        damping: Ridge, relative to the mean of ``diag(C_SS)``.
        selection: Which neurons (:data:`SELECTIONS`, :func:`neuron_priority`).
        scores: Scores to keep by instead (from :func:`neuron_priority`, to order a block once
            for several widths).

    Raises:
        ValueError: shapes that do not agree, non-finite values, ``k`` out of range or an
            unknown selection.
    """
    g, w, s = _check(gram, w2, sums)
    if scores is None:
        scores = neuron_priority(g, w, sums=s, count=count, damping=damping, selection=selection, until=k)
    return _fit(g, w, s, count, keep_neurons(scores, k), damping, float(np.sum(w * (g @ w))))


def width_errors(gram: np.ndarray, w2: np.ndarray, ks: list[int], *, sums: np.ndarray | None = None, count: int = 0,
                 damping: float = 0.01, selection: str = "refit", scores: np.ndarray | None = None) -> np.ndarray:
    """:attr:`WidthFit.error` at each of ``ks`` (the curve a budget allocates on)."""
    g, w, s = _check(gram, w2, sums)
    if scores is None:
        scores = neuron_priority(g, w, sums=s, count=count, damping=damping, selection=selection,
                                 until=min(ks, default=1))
    total = float(np.sum(w * (g @ w)))
    return np.array([_fit(g, w, s, count, keep_neurons(scores, k), damping, total).error for k in ks])
