"""Least-squares refit of factors on propagated activations.  Pure NumPy.

In a chain of compressed layers, layer ``l`` no longer sees its original input ``X`` but the
input ``X~`` produced by the already compressed layers before it.  Keeping ``A`` (m, r) and
choosing ``B`` (r, n) so that the compressed layer reproduces the *original* output from the
input it actually gets::

    min_B ||X~ A B - X W||_F^2 + d ||A B - W||_F^2

has the closed form (normal equations, ``G~ = X~^T X~``, ``C = X~^T X``, both (m, m))::

    B* = (A^T (G~ + d I) A)^{-1} A^T (C + d I) W                                  ("left" side)

For activations on the right (``W @ x``; ``G~ = X~ X~^T``, ``C = X~ X^T`` over the activation
columns) the factor next to the output is ``A``::

    A* = W (C + d I)^T B^T (B (G~ + d I) B^T)^{-1}                                 ("right" side)

With ``X~ = X`` and the same damping, the whitened factors are already optimal and the refit
returns them unchanged (``B* = S_r^(1/2) V_r^T``); the refit only helps through the difference
between ``X~`` and ``X``, i.e. the error propagated from earlier layers.

Both factors can be refitted at once, over every rank-``r`` product ``M``: with
``G~ + d I = L~ L~^T`` and the unconstrained solution ``M_ls = (G~ + d I)^{-1} (C + d I) W``, the
objective is ``||L~^T (M - M_ls)||_F^2`` plus a constant, so the optimum is the whitened
truncation of ``M_ls`` (:func:`refit_lowrank`); on the right side
``M_ls = W (C + d I)^T (G~ + d I)^{-1}`` and ``M_ls L~`` is truncated.
"""

from __future__ import annotations

import numpy as np

from .svd import factors
from .whiten import DEFAULT_DAMPING, whitened_spectrum

__all__ = ["refit_factor", "refit_lowrank"]


def refit_factor(
    a: np.ndarray,
    b: np.ndarray,
    w: np.ndarray,
    gram: np.ndarray,
    cross: np.ndarray,
    side: str = "left",
    damping: float = DEFAULT_DAMPING,
) -> tuple[np.ndarray, np.ndarray]:
    """Refit the output-side factor by least squares on propagated activations (module docstring).

    Args:
        a: Left factor, shape ``(m, r)``.
        b: Right factor, shape ``(r, n)``.
        w: The original matrix, shape ``(m, n)``.
        gram: ``G~``, the Gram matrix of the inputs the compressed layer receives: ``(m, m)``
            for ``side="left"``, ``(n, n)`` for ``side="right"``.
        cross: ``C``, the cross statistics of those inputs with the original ones, same shape
            (``X~^T X`` on the left, ``X~ X^T`` on the right).
        side: Which side of ``W`` the activations meet.
        damping: ``d`` relative to ``mean(diag G~)``; it pulls the product towards ``W``.

    Returns:
        ``(a, b*)`` for ``side="left"``, ``(a*, b)`` for ``side="right"``; the refitted factor
        in float64, the other unchanged.

    Raises:
        ValueError: mismatched shapes, an unknown side, non-finite or all-zero statistics.
    """
    w64, gd, cd = _refit_statistics(w, gram, cross, side, damping)
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    m, n = w64.shape
    r = a64.shape[1]
    if a64.shape != (m, r) or b64.shape != (r, n):
        raise ValueError(f"Got factors {a64.shape} and {b64.shape} for a {w64.shape} matrix; expected (m, r) and (r, n).")
    if side == "left":
        lhs = a64.T @ gd @ a64  # (r, r)
        rhs = a64.T @ cd @ w64  # (r, n)
        return a64, _solve_sym(lhs, rhs)
    lhs = b64 @ gd @ b64.T  # (r, r)
    rhs = b64 @ cd @ w64.T  # (r, m) = (W C^T B^T)^T; A*^T = lhs^{-1} rhs
    return _solve_sym(lhs, rhs).T, b64


def refit_lowrank(
    w: np.ndarray,
    gram: np.ndarray,
    cross: np.ndarray,
    rank: int,
    side: str = "left",
    damping: float = DEFAULT_DAMPING,
) -> tuple[np.ndarray, np.ndarray]:
    """Both factors refitted: the best rank-``rank`` product on propagated activations.

    Minimizes ``||X~ A B - X W||_F^2 + d ||A B - W||_F^2`` over all ``A`` (m, r), ``B`` (r, n)
    (see the module docstring); arguments as for :func:`refit_factor`.

    Returns:
        ``(A, B)`` in float64.
    """
    w64, gd, cd = _refit_statistics(w, gram, cross, side, damping)
    if side == "left":
        m_ls = _solve_sym(gd, cd @ w64)
    else:
        m_ls = _solve_sym(gd, cd @ w64.T).T  # W C^T G^{-1} = (G^{-1} C W^T)^T
    return factors(whitened_spectrum(m_ls, np.asarray(gram, dtype=np.float64), side, damping), rank)


def _refit_statistics(w: np.ndarray, gram: np.ndarray, cross: np.ndarray, side: str, damping: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(W, G~ + d I, C + d I)`` in float64, validated (shapes, side, finite and non-zero ``G~``)."""
    if side not in ("left", "right"):
        raise ValueError(f"Got side={side!r}; expected 'left' or 'right'.")
    w64 = np.asarray(w, dtype=np.float64)
    k = w64.shape[0] if side == "left" else w64.shape[1]
    g = np.asarray(gram, dtype=np.float64)
    c = np.asarray(cross, dtype=np.float64)
    if g.shape != (k, k) or c.shape != (k, k):
        raise ValueError(f"Got statistics {g.shape} and {c.shape} for a {side}-side {w64.shape} matrix; expected ({k}, {k}).")
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(c))):
        raise ValueError("Refit statistics hold NaN or Inf values; the calibration activations are not finite.")
    scale = float(np.mean(np.diag(g)))
    if scale <= 0:
        raise ValueError("Refit Gram matrix is zero: the calibration data never reaches this layer's input.")
    d = max(float(damping), 0.0) * scale
    eye = np.eye(k)
    return w64, (g + g.T) / 2 + d * eye, c + d * eye


def _solve_sym(lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``lhs^{-1} rhs`` for a symmetric positive semi-definite ``lhs`` (least squares if singular)."""
    try:
        return np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(lhs, rhs, rcond=None)[0]
