"""Low-rank matrix math: spectra, ranks and factors.  Pure NumPy; this module never imports onnx.

Approach
--------
A weight ``W`` of shape ``(m, n)`` has the thin SVD ``W = U diag(s) V^T`` with
``s_1 >= s_2 >= ... >= 0``.  Keeping the top ``r`` singular triplets gives the best rank-``r``
approximation in the Frobenius norm (Eckart-Young), with

* energy kept      ``E(r) = sum_{i<=r} s_i^2 / sum_i s_i^2``
* relative error   ``||W - W_r||_F / ||W||_F = sqrt(1 - E(r))``

The factors split the singular values evenly so both have the same scale::

    A = U_r diag(s_r)^(1/2)      shape (m, r)
    B = diag(s_r)^(1/2) V_r^T    shape (r, n)       W_r = A @ B

Factoring saves parameters (and multiply-accumulates per activation row) only when
``r (m + n) < m n``; :func:`break_even_rank` returns the largest such ``r``.

Signs are fixed so that the largest-magnitude entry of every left singular vector is positive
(the matching right vector flips with it); the factors are then identical across runs and
platforms for the same input.

Spectral entropy (ARSVD)
------------------------
With ``p_i = s_i / sum_j s_j`` and ``H = -sum_i p_i log p_i``, :func:`entropy_rank` keeps the
smallest ``k`` with ``sum_{i<=k} -p_i log p_i >= tau H``.  It weighs the singular values
linearly (not squared) and counts each one by its share of the entropy, so the tail of a slowly
decaying spectrum counts for more than under the energy rule: at the same threshold it keeps a
higher rank.

Data-aware truncation (whitening)
---------------------------------
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

Least-squares refit of one factor
---------------------------------
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
Convolutions
------------
A Conv weight ``W`` of shape ``(C_out, C_in, k_1, ..., k_d)`` is factorized through one of two
matrix views; both are plain reshapes, so ``||W||_F`` and hence ``E(r)`` and the relative error
mean the same for either (arXiv 2004.09031):

* **channel-wise** (any ``d``): ``M = W.reshape(C_out, C_in k_1 ... k_d)``, ``M ~ A B``.
  ``B`` (r, C_in k_1..k_d) becomes the kernel of a ``k_1 x ... x k_d`` conv from ``C_in`` to
  ``r`` channels that keeps the original strides, pads and dilations; ``A`` (C_out, r) becomes a
  ``1 x ... x 1`` conv from ``r`` to ``C_out`` that carries the bias.
* **spatial-wise** (``d = 2``): ``M[(c, i), (o, j)] = W[o, c, i, j]``, shape
  ``(C_in kh, C_out kw)``, ``M ~ A B``.  ``A`` becomes a ``kh x 1`` conv ``C_in -> r`` with the
  vertical stride, pads and dilation; ``B`` a ``1 x kw`` conv ``r -> C_out`` with the horizontal
  ones and the bias, since
  ``W[o, c, i, j] ~ sum_k A[(c, i), k] B[k, (o, j)]``.

Multiply-accumulates per sample (batch 1), for output size ``H_o x W_o`` and input width ``W_i``::

    dense     C_out C_in kh kw H_o W_o
    channel   r C_in kh kw H_o W_o  +  C_out r H_o W_o
    spatial   r C_in kh H_o W_i     +  C_out r kw H_o W_o

The spatial form's intermediate is ``H_o x W_i``: its first conv strides only vertically, so with a
horizontal stride ``s > 1`` it computes about ``s`` times more columns than the output has.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Spectrum",
    "spectrum",
    "energy_rank",
    "energy_kept",
    "relative_error",
    "break_even_rank",
    "round_rank",
    "factors",
    "lowrank_params",
    "entropy_terms",
    "entropy_rank",
    "entropy_kept",
    "whitening_factor",
    "whitened_spectrum",
    "refit_factor",
    "refit_lowrank",
    "DEFAULT_DAMPING",
    "CONV_MODES",
    "conv_matrix",
    "conv_matrix_shape",
    "conv_kernels",
    "conv_output_size",
    "conv_macs",
]

#: Default damping of ``G``, as a fraction of ``mean(diag G)``.
DEFAULT_DAMPING = 0.01
_MAX_DAMPING_TRIES = 6

# Relative slack when comparing cumulative energy with a threshold: without it an exactly
# rank-r matrix asked for E = 1.0 would get r + 1, because rounding leaves s_{r+1} ~ 1e-7 s_1.
_ENERGY_RTOL = 1e-9


@dataclass(frozen=True)
class Spectrum:
    """The thin SVD of a matrix, sign-fixed.

    Attributes:
        u: Left singular vectors, shape ``(m, k)`` with ``k = min(m, n)``.
        s: Singular values, shape ``(k,)``, descending.
        vt: Right singular vectors (transposed), shape ``(k, n)``.
        whiten: For a whitened spectrum, the factor ``L`` (``L L^T`` = damped ``G``) whose
            inverse maps the factors back; ``None`` for the plain SVD of the matrix.
        side: ``"left"`` when the whitened matrix is ``L^T W`` (activations ``x @ W``),
            ``"right"`` when it is ``W L`` (activations ``W @ x``).
        out_whiten: For an output-weighted spectrum, the factor ``R`` of the output side
            (``L^T W R`` left, ``R^T W L`` right); ``None`` otherwise.
    """

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    whiten: np.ndarray | None = None
    side: str = "left"
    out_whiten: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.shape[0], self.vt.shape[1])

    @property
    def full_rank(self) -> int:
        return int(self.s.shape[0])


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    # float64 weights stay float64; everything narrower (fp16, bf16, fp32) is computed in fp32.
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def spectrum(w: np.ndarray) -> Spectrum:
    """Thin, sign-fixed SVD of a 2-D matrix.

    Args:
        w: Matrix of shape ``(m, n)``, any floating dtype.

    Returns:
        The :class:`Spectrum`; computed in float32, or float64 when ``w`` is float64.

    Raises:
        ValueError: ``w`` is not 2-D, is empty, or holds non-finite values.
    """
    if w.ndim != 2:
        raise ValueError(f"Got a {w.ndim}-D array; expected a 2-D matrix.")
    if w.size == 0:
        raise ValueError(f"Got an empty matrix of shape {w.shape}; expected at least one element.")
    a = np.asarray(w, dtype=_compute_dtype(w.dtype))
    if not np.all(np.isfinite(a)):
        raise ValueError("Matrix holds NaN or Inf values; expected finite weights.")
    return _svd(a)


def _svd(a: np.ndarray) -> Spectrum:
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    # Deterministic signs: the largest-|.| entry of each left singular vector is positive.
    pivots = np.argmax(np.abs(u), axis=0)
    signs = np.sign(u[pivots, np.arange(u.shape[1])])
    signs[signs == 0] = 1
    u = u * signs
    vt = vt * signs[:, None]
    return Spectrum(u=u, s=s, vt=vt)


def _cumulative_energy(s: np.ndarray) -> np.ndarray:
    sq = np.square(s.astype(np.float64))
    total = sq.sum()
    if total == 0:
        return np.ones_like(sq)
    return np.cumsum(sq) / total


def energy_rank(s: np.ndarray, energy: float) -> int:
    """Smallest ``r >= 1`` with ``E(r) >= energy``.

    Args:
        s: Singular values, descending.
        energy: Threshold in ``(0, 1]``.

    Returns:
        The rank, between 1 and ``len(s)``.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"Got energy={energy!r}; expected a number in (0, 1].")
    return _threshold_rank(_cumulative_energy(s), energy)


def _threshold_rank(cum: np.ndarray, threshold: float) -> int:
    """Smallest ``r >= 1`` whose normalized cumulative share ``cum[r - 1]`` reaches ``threshold``."""
    r = int(np.searchsorted(cum, threshold - _ENERGY_RTOL, side="left")) + 1
    return max(1, min(r, len(cum)))


def energy_kept(s: np.ndarray, rank: int) -> float:
    """``E(rank)``: the fraction of ``sum s_i^2`` held by the top ``rank`` values."""
    if rank <= 0:
        return 0.0
    cum = _cumulative_energy(s)
    return float(min(1.0, cum[min(rank, len(s)) - 1]))


def relative_error(s: np.ndarray, rank: int) -> float:
    """Relative Frobenius error of the rank-``rank`` truncation, ``sqrt(1 - E(rank))``."""
    return float(np.sqrt(max(0.0, 1.0 - energy_kept(s, rank))))


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


def factors(spec: Spectrum, rank: int, dtype: np.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The factors ``A = U_r S_r^(1/2)`` (m, r) and ``B = S_r^(1/2) V_r^T`` (r, n).

    Args:
        spec: The matrix's spectrum.
        rank: Rank to keep, ``1 <= rank <= spec.full_rank``.
        dtype: Cast the factors to this dtype (the weight's own); defaults to the compute dtype.
    """
    if not 1 <= rank <= spec.full_rank:
        raise ValueError(f"Got rank={rank}; expected 1 <= rank <= {spec.full_rank}.")
    root = np.sqrt(spec.s[:rank])
    a = spec.u[:, :rank] * root
    b = root[:, None] * spec.vt[:rank]
    if spec.whiten is not None:
        lt = spec.whiten.T
        if spec.side == "left":  # A = L^{-T} U_r S_r^(1/2)
            a = np.linalg.solve(lt, a)
        else:  # B = S_r^(1/2) V_r^T L^{-1}, i.e. B^T = L^{-T} V_r S_r^(1/2)
            b = np.linalg.solve(lt, b.T).T
    if spec.out_whiten is not None:
        rt = spec.out_whiten.T
        if spec.side == "left":  # B = S_r^(1/2) V_r^T R^{-1}
            b = np.linalg.solve(rt, b.T).T
        else:  # A = R^{-T} U_r S_r^(1/2)
            a = np.linalg.solve(rt, a)
    if dtype is not None:
        a = a.astype(dtype)
        b = b.astype(dtype)
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


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
    """Smallest ``k >= 1`` with ``sum_{i<=k} -p_i log p_i >= tau H`` (ARSVD's spectral-entropy rule).

    Args:
        s: Singular values, descending.
        tau: Threshold in ``(0, 1]``.

    Returns:
        The rank, between 1 and ``len(s)``.
    """
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"Got tau={tau!r}; expected a number in (0, 1].")
    h = entropy_terms(s)
    total = h.sum()
    if total <= 0:  # a single non-zero value (or none): all information is in the first
        return 1
    return _threshold_rank(np.cumsum(h) / total, tau)


def entropy_kept(s: np.ndarray, rank: int) -> float:
    """Fraction of the spectral entropy ``H`` held by the top ``rank`` values."""
    h = entropy_terms(s)
    total = h.sum()
    if rank <= 0:
        return 0.0
    if total <= 0:
        return 1.0
    return float(min(1.0, h[: min(rank, len(s))].sum() / total))


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
                      out_gram: np.ndarray | None = None) -> Spectrum:
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
    spec = _svd(a)
    return Spectrum(u=spec.u, s=spec.s, vt=spec.vt, whiten=lf, side=side, out_whiten=rf)
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


# ---- convolutions ------------------------------------------------------------------------

#: The two ways a Conv weight is viewed as a matrix.
CONV_MODES = ("channel", "spatial")


def _check_conv_mode(w_shape: tuple[int, ...], mode: str) -> None:
    if mode not in CONV_MODES:
        raise ValueError(f"Got mode={mode!r}; expected one of {', '.join(CONV_MODES)}.")
    if len(w_shape) < 3:
        raise ValueError(f"Got a weight of shape {tuple(w_shape)}; expected (C_out, C_in, k_1, ...).")
    if mode == "spatial" and len(w_shape) != 4:
        raise ValueError(f"Got a {len(w_shape) - 2}-D kernel {tuple(w_shape)}; spatial-wise needs a 2-D kernel (C_out, C_in, kh, kw).")


def conv_matrix_shape(w_shape: tuple[int, ...], mode: str) -> tuple[int, int]:
    """Shape ``(m, n)`` of the matrix view of a Conv weight of shape ``w_shape``.

    ``(C_out, C_in k_1 ... k_d)`` channel-wise, ``(C_in kh, C_out kw)`` spatial-wise.
    """
    _check_conv_mode(w_shape, mode)
    c_out, c_in, *k = (int(d) for d in w_shape)
    if mode == "channel":
        return c_out, c_in * int(np.prod(k))
    kh, kw = k
    return c_in * kh, c_out * kw


def conv_matrix(w: np.ndarray, mode: str) -> np.ndarray:
    """The matrix view of a Conv weight.

    Args:
        w: Weight of shape ``(C_out, C_in, k_1, ..., k_d)``.
        mode: ``"channel"``: shape ``(C_out, C_in k_1..k_d)``, ``M[o, (c, i..)] = W[o, c, i..]``;
            ``"spatial"`` (``d = 2``): shape ``(C_in kh, C_out kw)``, ``M[(c, i), (o, j)] = W[o, c, i, j]``.
    """
    _check_conv_mode(w.shape, mode)
    if mode == "channel":
        return w.reshape(w.shape[0], -1)
    c_out, c_in, kh, kw = w.shape
    return np.ascontiguousarray(w.transpose(1, 2, 0, 3)).reshape(c_in * kh, c_out * kw)


def conv_kernels(a: np.ndarray, b: np.ndarray, w_shape: tuple[int, ...], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Map the factors of :func:`conv_matrix` ``M ~ a @ b`` to the kernels of two chained convs.

    Args:
        a: Left factor, shape ``(m, r)``.
        b: Right factor, shape ``(r, n)``.
        w_shape: Shape of the original weight ``(C_out, C_in, k_1, ..., k_d)``.
        mode: ``"channel"`` or ``"spatial"``.

    Returns:
        ``(first, second)``, applied to the input in that order:

        * channel: ``first`` ``(r, C_in, k_1, ..., k_d)`` = ``b`` reshaped, and ``second``
          ``(C_out, r, 1, ..., 1)`` = ``a`` reshaped;
        * spatial: ``first`` ``(r, C_in, kh, 1)`` with ``first[k, c, i, 0] = a[(c, i), k]``, and
          ``second`` ``(C_out, r, 1, kw)`` with ``second[o, k, 0, j] = b[k, (o, j)]``.
    """
    _check_conv_mode(w_shape, mode)
    r = a.shape[1]
    c_out, c_in, *k = (int(d) for d in w_shape)
    if mode == "channel":
        first = b.reshape(r, c_in, *k)
        second = a.reshape(c_out, r, *([1] * len(k)))
    else:
        kh, kw = k
        first = a.reshape(c_in, kh, r).transpose(2, 0, 1)[..., None]
        second = b.reshape(r, c_out, kw).transpose(1, 0, 2)[:, :, None, :]
    return np.ascontiguousarray(first), np.ascontiguousarray(second)


def conv_output_size(
    in_size: tuple[int, ...],
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    pads: tuple[int, ...],
    dilations: tuple[int, ...],
    auto_pad: str = "NOTSET",
) -> tuple[int, ...]:
    """Spatial output size of an ONNX Conv, axis by axis.

    ``NOTSET``: ``floor((x + p_begin + p_end - d (k - 1) - 1) / s) + 1``; ``SAME_UPPER`` and
    ``SAME_LOWER``: ``ceil(x / s)``; ``VALID``: ``floor((x - d (k - 1) - 1) / s) + 1``.
    ``pads`` is ONNX's ``[x1_begin, x2_begin, ..., x1_end, x2_end, ...]``.
    """
    nd = len(in_size)
    out = []
    for i in range(nd):
        x, k, s, d = in_size[i], kernel[i], strides[i], dilations[i]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-x // s))
        else:
            total = 0 if auto_pad == "VALID" else pads[i] + pads[i + nd]
            out.append((x + total - d * (k - 1) - 1) // s + 1)
    return tuple(out)


def conv_macs(
    w_shape: tuple[int, ...],
    rank: int | None,
    mode: str,
    out_size: tuple[int, ...],
    mid_width: int | None = None,
) -> int:
    """Multiply-accumulates of a Conv (per sample), dense or factorized.

    Args:
        w_shape: Weight shape ``(C_out, C_in, k_1, ..., k_d)``.
        rank: Rank of the factors; ``None`` for the dense conv.
        mode: ``"channel"`` or ``"spatial"`` (ignored when ``rank`` is ``None``).
        out_size: Spatial output size ``(H_o, W_o)`` (or ``(L_o,)`` ...); all ones gives MACs per
            output pixel.
        mid_width: Width of the spatial form's intermediate, the input width ``W_i`` (spatial
            mode only; its first conv keeps every input column).

    Returns:
        The count, as in the table of the module docstring.
    """
    c_out, c_in, *k = (int(d) for d in w_shape)
    pixels = int(np.prod(out_size, dtype=np.int64))
    kprod = int(np.prod(k, dtype=np.int64))
    if rank is None:
        return c_out * c_in * kprod * pixels
    _check_conv_mode(w_shape, mode)
    if mode == "channel":
        return rank * (c_in * kprod + c_out) * pixels
    if mid_width is None:
        raise ValueError("Got mid_width=None; spatial-wise MACs need the input width.")
    kh, kw = k
    h_out, w_out = out_size
    return rank * c_in * kh * h_out * mid_width + c_out * rank * kw * h_out * w_out
