"""Width reduction of a feed-forward block: keep ``k`` of its ``f`` hidden neurons and refit the
second projection in closed form.  Pure NumPy.

A feed-forward block computes ``y = phi(x W1 + b1) W2 + b2`` with ``f`` hidden neurons
(``W1``: (d, f), ``W2``: (f, e)).  Dropping neuron ``j`` removes column ``j`` of ``W1``, entry
``j`` of ``b1`` and row ``j`` of ``W2``: no factor pair, no extra product, the block is simply
narrower, so parameters, MACs and latency all fall by ``(f - k) / f`` of the block.

Which neurons.  With ``H = phi(x W1 + b1)`` the hidden activations over the calibration rows and
``C = H^T H`` their Gram (the input Gram of ``W2``, which the data-aware statistics capture
anyway), neuron ``j`` contributes ``H_j W2_j`` to the output, of energy ``C_jj ||W2_j||^2``.
Neurons are kept by that score (:func:`neuron_scores`).  Scores that account for the refit
(ridge leverage) look better layer by layer and are not used: with a small ridge they saturate,
and the end-to-end result gets worse.

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

__all__ = ["neuron_scores", "keep_neurons", "WidthFit", "refit_width", "width_errors"]


def neuron_scores(gram: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """Output energy of each hidden neuron, ``C_jj ||W2_j||^2`` (``w2``: (f, e), one row per neuron)."""
    g = np.asarray(gram, dtype=np.float64)
    return np.clip(np.diag(g), 0.0, None) * np.sum(np.square(np.asarray(w2, dtype=np.float64)), axis=1)


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
                damping: float = 0.01, scores: np.ndarray | None = None) -> WidthFit:
    """Keep the ``k`` neurons of highest :func:`neuron_scores` and refit ``W2`` on them.

    Args:
        gram: ``C = H^T H`` over the calibration rows, ``(f, f)``.
        w2: The second projection, one row per neuron, ``(f, e)``.
        k: Neurons to keep.
        sums, count: ``H^T 1`` and the number of rows: with them the fit has an intercept (for
            a block whose second projection has a bias); without, none.
        damping: Ridge, relative to the mean of ``diag(C_SS)``.
        scores: Neuron scores to keep by (default :func:`neuron_scores`).

    Raises:
        ValueError: shapes that do not agree, non-finite values, or ``k`` out of range.
    """
    g, w, s = _check(gram, w2, sums)
    keep = keep_neurons(neuron_scores(g, w) if scores is None else scores, k)
    return _fit(g, w, s, count, keep, damping, float(np.sum(w * (g @ w))))


def width_errors(gram: np.ndarray, w2: np.ndarray, ks: list[int], *, sums: np.ndarray | None = None, count: int = 0,
                 damping: float = 0.01) -> np.ndarray:
    """:attr:`WidthFit.error` at each of ``ks`` (the curve a budget allocates on)."""
    g, w, s = _check(gram, w2, sums)
    scores, total = neuron_scores(g, w), float(np.sum(w * (g @ w)))
    return np.array([_fit(g, w, s, count, keep_neurons(scores, k), damping, total).error for k in ks])
