"""Data-aware truncation: the SVD of a weight whitened by its activation statistics.  Pure NumPy.

What a layer computes is ``X W`` for its real input rows ``X`` (N, m), so the error that matters
is ``||X W - X A B||_F``, not ``||W - A B||_F``.  Let ``G = X^T X`` (m, m), accumulated over the
calibration data, and ``G + d I = L L^T`` (damped Cholesky; ``d`` is a small fraction of
``mean(diag G)`` that keeps ``L`` invertible when an input feature never varies).  With ``d = 0``
and ``X = Q L^T`` (``Q`` orthonormal columns)::

    ||X W - X A B||_F = ||L^T W - L^T A B||_F

so the best rank-``r`` choice is the truncated SVD of the *whitened* matrix
``L^T W = U S V^T``, mapped back through ``L^{-T}``::

    A = L^{-T} U_r S_r^(1/2)      B = S_r^(1/2) V_r^T                       ("left" side)

When the activations multiply the matrix from the right (``W @ x``, or a Gemm with a
transposed weight, where the matrix's *columns* meet the features) the same holds with
``G = X X^T`` over the activation columns and ``W L``::

    W L = U S V^T,   A = U_r S_r^(1/2)      B = S_r^(1/2) V_r^T L^{-1}          ("right" side)

The energy of the whitened spectrum is the fraction of ``||X W||_F^2`` kept, so the rank rules
apply to it unchanged.  The damping adds ``d ||W - A B||_F^2`` to the objective: a little of the
plain criterion, which also guards directions the calibration data never excites.  When the
Cholesky factorization fails (``G`` indefinite through rounding), the damping grows tenfold up to
:data:`_MAX_DAMPING_TRIES` times, then an eigendecomposition ``G = Q diag(w) Q^T`` with ``w``
clipped from below gives ``L = Q diag(w)^(1/2)`` (not triangular, but ``L L^T`` is still the
damped ``G``, which is all the derivation uses).

Output-side weighting (attention scores)
----------------------------------------
Whitening weighs the error by what goes *into* the layer.  Some outputs are not equally
important in every direction: a query projection's output ``q`` only matters through the
scores ``q k^T`` against the keys, so an error ``e`` in ``q`` costs ``||e K^T||^2 = e K^T K e^T``.
With ``H = K^T K`` (n, n) accumulated over the calibration keys (block-diagonal per attention
head), ``H + d' I = R R^T``, and ``X = Q L^T`` as above::

    ||X (W - A B) R||_F = ||L^T (W - A B) R||_F

so the optimum is the truncated SVD of ``L^T W R = U S V^T`` mapped back on both sides::

    A = L^{-T} U_r S_r^(1/2)      B = S_r^(1/2) V_r^T R^{-1}                  ("left" side)

(on the "right" side the roles swap: ``R^T W L`` is truncated and ``A`` takes ``R^{-T}``).  The
damping ``d'`` of ``H`` keeps directions the keys never excite from being free.
"""

from __future__ import annotations

import numpy as np

from .svd import Spectrum, _whole

__all__ = ["DEFAULT_DAMPING", "whitening_factor", "whitened_spectrum"]


#: Default damping of ``G``, as a fraction of ``mean(diag G)``.
DEFAULT_DAMPING = 0.01


_MAX_DAMPING_TRIES = 6


def whitening_factor(gram: np.ndarray, damping: float = DEFAULT_DAMPING) -> tuple[np.ndarray, float]:
    """A factor ``L`` with ``L L^T = G + d I``, ``d = damping * mean(diag G)``.

    Args:
        gram: ``G``, shape ``(k, k)``, symmetric positive semi-definite up to rounding.
        damping: Relative damping (``0`` asks for the exact factor of ``G``).

    Returns:
        ``(L, d)``: the factor (lower triangular unless the eigendecomposition fallback was
        needed) and the absolute damping actually added.

    Raises:
        ValueError: ``gram`` is not square, not finite, or all zero.
    """
    g = np.asarray(gram, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"Got a Gram matrix of shape {g.shape}; expected a square matrix.")
    if not np.all(np.isfinite(g)):
        raise ValueError("Gram matrix holds NaN or Inf values; the calibration activations are not finite.")
    g = (g + g.T) / 2
    scale = float(np.mean(np.diag(g)))
    if scale <= 0:
        raise ValueError("Gram matrix is zero: the calibration data never reaches this layer's input.")
    eye = np.eye(g.shape[0])
    d = max(float(damping), 0.0) * scale
    for _ in range(_MAX_DAMPING_TRIES):
        try:
            return np.linalg.cholesky(g + d * eye), d
        except np.linalg.LinAlgError:
            d = max(d * 10, 1e-10 * scale)
    w, q = np.linalg.eigh(g)
    floor = max(d, 1e-10 * scale)
    w = np.maximum(w, 0.0) + floor
    return q * np.sqrt(w), floor


def whitened_spectrum(w: np.ndarray, gram: np.ndarray, side: str = "left", damping: float = DEFAULT_DAMPING,
                      out_gram: np.ndarray | None = None, *, energy: float | None = None, method: str = "auto",
                      keep=None) -> Spectrum:
    """The SVD of ``W`` whitened by its input statistics (see the module docstring).

    Args:
        w: Matrix of shape ``(m, n)``.
        gram: ``G``: ``(m, m)`` for ``side="left"`` (inputs ``x @ W``), ``(n, n)`` for
            ``side="right"`` (inputs ``W @ x``).
        side: Which side of ``W`` the activations meet.
        damping: Relative damping for :func:`whitening_factor` (of ``G`` and of ``out_gram``).
        out_gram: Optional weight ``H`` on the output side (``(n, n)`` left, ``(m, m)`` right):
            the error is measured as ``||X (W - A B) R||`` with ``R R^T`` the damped ``H``
            (module docstring, "Output-side weighting").
        energy, method, keep: As for :func:`~onnx_lowrank.linalg.spectrum`: only the certified
            leading part of the whitened matrix's spectrum when an energy threshold will choose
            the rank; only the vectors ``keep`` asks for.

    Returns:
        The sign-fixed SVD of ``L^T W`` (left) or ``W L`` (right), or with ``out_gram`` of
        ``L^T W R`` / ``R^T W L``, carrying ``L`` (and ``R``) so that :func:`factors` maps the
        factors back.  Computed in float64.
    """
    if side not in ("left", "right"):
        raise ValueError(f"Got side={side!r}; expected 'left' or 'right'.")
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"Got an array of shape {w.shape}; expected a non-empty 2-D matrix.")
    a = np.asarray(w, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError("Matrix holds NaN or Inf values; expected finite weights.")
    need = a.shape[0] if side == "left" else a.shape[1]
    if gram.shape != (need, need):
        raise ValueError(f"Got a Gram matrix of shape {gram.shape} for a {side}-side {a.shape} matrix; expected ({need}, {need}).")
    lf, _ = whitening_factor(gram, damping)
    a = lf.T @ a if side == "left" else a @ lf
    rf = None
    if out_gram is not None:
        out = a.shape[1] if side == "left" else a.shape[0]
        if out_gram.shape != (out, out):
            raise ValueError(f"Got an output Gram matrix of shape {out_gram.shape} for a {side}-side {w.shape} matrix; "
                             f"expected ({out}, {out}).")
        rf, _ = whitening_factor(out_gram, damping)
        a = a @ rf if side == "left" else rf.T @ a
    spec = _whole(a, energy, method, keep)
    return Spectrum(u=spec.u, s=spec.s, vt=spec.vt, whiten=lf, side=side, out_whiten=rf, total=spec.total)
