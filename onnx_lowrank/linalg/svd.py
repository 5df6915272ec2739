"""The thin SVD of a weight, sign-fixed, and its split into two factors.  Pure NumPy.

A weight ``W`` of shape ``(m, n)`` has the thin SVD ``W = U diag(s) V^T`` with
``s_1 >= s_2 >= ... >= 0``.  Keeping the top ``r`` singular triplets gives the best rank-``r``
approximation in the Frobenius norm (Eckart-Young), with

* energy kept      ``E(r) = sum_{i<=r} s_i^2 / sum_i s_i^2``
* relative error   ``||W - W_r||_F / ||W||_F = sqrt(1 - E(r))``

The factors split the singular values evenly so both have the same scale::

    A = U_r diag(s_r)^(1/2)      shape (m, r)
    B = diag(s_r)^(1/2) V_r^T    shape (r, n)       W_r = A @ B

Leading part only
-----------------
Under an energy threshold only the top of the spectrum matters, and its whole is known for free:
``sum_i s_i^2 = ||W||_F^2``.  :func:`spectrum` with ``energy`` first tries a randomized range
finder with power iterations (Halko, Martinsson and Tropp): ``Q`` orthonormal (m, l) spanning
``(W W^T)^q W Omega``, and the SVD of the small ``B = Q^T W``.  For any ``r`` orthonormal columns
``V``, ``||W V||^2 = ||Q B V||^2 + ||(I - Q Q^T) W V||^2``, so the true top-``r`` energy lies
between ``E_B(r)`` and ``E_B(r) + ||W||^2 - ||B||^2``.  When the smallest ``r`` reaching the
threshold is the same for both bounds, the rank is certified to be the exact rule's; a gap of
ten between the kept and the last computed value bounds the error of the kept vectors.  ``l``
doubles until both hold; past a quarter of ``min(m, n)`` the full SVD is cheaper and is taken.

Otherwise the whole spectrum comes from the smaller Gram matrix: for ``m >= n``,
``W^T W = V diag(s^2) V^T`` by ``eigh`` in float64, and ``U = W V diag(s)^-1`` (the mirror for
``m < n``); two to four times faster than LAPACK's SVD on the shapes of transformer weights, with
singular values that agree to about ``1e-7 s_1`` for float32 weights.  Left singular vectors of
values below ``1e-10 s_1`` are set to zero (they carry no energy; a rank that keeps them gets zero
columns).  ``method="exact"`` takes LAPACK's SVD everywhere.

Factoring pays only below break-even (:mod:`.rank`).  Signs are fixed so that the largest-magnitude entry of every left singular vector is positive
(the matching right vector flips with it); the factors are then identical across runs and
platforms for the same input.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Callable

import numpy as np

__all__ = ["Spectrum", "spectrum", "leading", "factors"]


@dataclass(frozen=True)
class Spectrum:
    """The thin SVD of a matrix, sign-fixed.

    Attributes:
        u: Left singular vectors, shape ``(m, q)``: ``q = min(m, n)``, or fewer once
            :meth:`truncated` or when only the leading part was computed.
        s: Singular values, descending: all ``min(m, n)`` of them, or the leading ones with
            :attr:`total`.
        vt: Right singular vectors (transposed), shape ``(q, n)``.
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
    total: float | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.shape[0], self.vt.shape[1])

    @property
    def full_rank(self) -> int:
        return int(min(self.shape))

    @property
    def partial(self) -> bool:
        """Whether only the leading singular values were computed (``total`` is then the whole)."""
        return self.total is not None

    @property
    def kept(self) -> int:
        """How many singular vectors are held: the highest rank :func:`factors` can give."""
        return int(self.u.shape[1])

    def truncated(self, rank: int) -> "Spectrum":
        """The same spectrum holding only the first ``rank`` singular vectors (copies, so the
        full ones can be freed)."""
        if rank >= self.kept:
            return self
        return Spectrum(u=self.u[:, :rank].copy(), s=self.s, vt=self.vt[:rank].copy(), whiten=self.whiten, side=self.side,
                        out_whiten=self.out_whiten, total=self.total)


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    # float64 weights stay float64; everything narrower (fp16, bf16, fp32) is computed in fp32.
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def spectrum(w: np.ndarray, *, energy: float | None = None, method: str = "auto",
             keep: Callable[[np.ndarray, float | None], int] | None = None) -> Spectrum:
    """Thin, sign-fixed SVD of a 2-D matrix, or its certified leading part.

    Args:
        w: Matrix of shape ``(m, n)``, any floating dtype.
        energy: The energy threshold the rank will be chosen by: with ``method="auto"``, only the
            leading part of the spectrum is computed when that certifies the rank (module
            docstring, "Leading part only"), else the whole, from the Gram matrix.
        method: ``"auto"``, or ``"exact"`` for LAPACK's full SVD whatever ``energy``.
        keep: ``keep(s, total)``: how many singular vectors to form once the values are known
            (the most any rank decision can use); default all.

    Returns:
        The :class:`Spectrum`; computed in float32, or float64 when ``w`` is float64 or its
        singular values would overflow float32.

    Raises:
        ValueError: ``w`` is not 2-D, is empty, holds non-finite values, or is so large that its
            singular values overflow even float64.
    """
    if w.ndim != 2:
        raise ValueError(f"Got a {w.ndim}-D array; expected a 2-D matrix.")
    if w.size == 0:
        raise ValueError(f"Got an empty matrix of shape {w.shape}; expected at least one element.")
    if method not in ("auto", "exact"):
        raise ValueError(f"Got method={method!r}; expected 'auto' or 'exact'.")
    a = np.asarray(w, dtype=_compute_dtype(w.dtype))
    norm = _norm(a)
    if np.isnan(norm):
        raise ValueError("Matrix holds NaN or Inf values; expected finite weights.")
    if not _fits(norm, a.dtype) and a.dtype != np.float64:  # a finite matrix whose norm passes float32's range
        a = np.asarray(w, dtype=np.float64)
    if not _fits(norm, a.dtype):
        raise ValueError("Matrix is too large in magnitude: its singular values overflow float64; rescale the weights.")
    return _whole(a, energy, method, keep, total=norm * norm if norm * norm < np.inf else None)


def _whole(a: np.ndarray, energy: float | None, method: str,
           keep: Callable[[np.ndarray, float | None], int] | None = None, *, total: float | None = None) -> Spectrum:
    """The spectrum by ``method``: the certified leading part, the Gram route, or LAPACK's SVD,
    holding the vectors ``keep`` asks for."""
    if method == "exact":
        spec = _svd(a)
    else:
        spec = leading(a, energy, total=total) if energy is not None else None
        if spec is None:
            return gram_svd(a, keep)
    return spec.truncated(keep(spec.s, spec.total)) if keep is not None else spec


def gram_svd(a: np.ndarray, keep: Callable[[np.ndarray, float | None], int] | None = None) -> Spectrum:
    """The thin SVD of ``a`` through the ``eigh`` of its smaller Gram matrix, in float64 (module
    docstring), in ``a``'s dtype; only the vectors ``keep(s, None)`` asks for are formed."""
    x = np.asarray(a, dtype=np.float64)
    wide = x.shape[0] < x.shape[1]
    if wide:
        x = x.T
    with np.errstate(over="ignore", invalid="ignore"):
        gram, scale = x.T @ x, 1.0
    if not np.all(np.isfinite(gram)):  # a norm past 1e154: the squares overflow; work scaled
        scale = float(np.max(np.abs(x)))
        x = x / scale
        gram = x.T @ x
    lam, v = np.linalg.eigh(gram)
    lam, v = lam[::-1], v[:, ::-1]
    s = np.sqrt(np.maximum(lam, 0.0))
    k = s.size if keep is None else max(1, min(s.size, int(keep((s * scale).astype(a.dtype), None))))
    v = v[:, :k]
    live = s[:k] > 1e-10 * (s[0] if s.size else 0.0)
    # U = W V / s in the weight's own dtype (it is returned in it), unless scaled above
    src = x if scale != 1.0 else (a.T if wide else a)
    u = np.zeros((x.shape[0], k), dtype=src.dtype)
    u[:, live] = (src @ v[:, live].astype(src.dtype)) / s[:k][live].astype(src.dtype)
    s = s * scale
    if wide:  # a^T = U S V^T, so a = V S U^T
        u, v = v, u
    spec = _signed(u.astype(a.dtype), s.astype(a.dtype), np.ascontiguousarray(v.T).astype(a.dtype))
    return spec


def _square_sum(a: np.ndarray) -> float:
    """``||a||_F^2`` accumulated in float64, a block of rows at a time (no full-size copy)."""
    return float(sum(np.einsum("ij,ij->", b, b, dtype=np.float64) for b in _blocks(a)))


def leading(a: np.ndarray, energy: float, *, start: int = 32, oversample: int = 16, power: int = 2,
            most: float = 0.25, seed: int = 0, smallest: int = 1024, total: float | None = None) -> Spectrum | None:
    """The leading singular triplets of ``a``, enough to certify its energy rank (module
    docstring), or ``None`` when that would take more than ``most`` of ``min(m, n)`` vectors (or
    ``min(m, n) < smallest``, where the full SVD costs next to nothing).

    The result holds ``s``, ``u``, ``vt`` for the computed part and ``total = ||a||_F^2``; it is
    deterministic for a given ``seed``; pass ``total`` when it is already known.
    """
    from .rank import _ENERGY_RTOL

    m, n = a.shape
    q = min(m, n)
    if q < smallest:
        return None
    total = _square_sum(a) if total is None else total
    if total == 0.0:
        return None
    rng = np.random.default_rng(seed)
    want = (energy - _ENERGY_RTOL) * total
    k = start
    while k + oversample <= most * q:
        width = k + oversample
        basis = _orth(a @ rng.standard_normal((n, width)).astype(a.dtype))
        for _ in range(power):
            basis = _orth(a @ _orth(a.T @ basis))
        ub, s, vt = np.linalg.svd(basis.T @ a, full_matrices=False)
        cum = np.cumsum(np.square(s.astype(np.float64)))
        rest = max(total - float(cum[-1]), 0.0)
        hi = int(np.searchsorted(cum, want, side="left")) + 1  # certainly enough
        lo = int(np.searchsorted(cum + rest, want, side="left")) + 1  # certainly not fewer
        if hi <= k and lo == hi and s[-1] <= 0.1 * s[hi - 1]:
            spec = _signed(basis @ ub, s, vt)
            return Spectrum(u=spec.u, s=spec.s, vt=spec.vt, total=total)
        if cum[-1] < want:
            # not even reached: at the rate the last half of the values holds energy, would it be
            # within reach of the budget of vectors?  (a slowly decaying spectrum: take the full SVD)
            rate = (cum[-1] - cum[len(cum) // 2 - 1]) / max(1, len(cum) - len(cum) // 2)
            if rate <= 0 or width + (want - cum[-1]) / rate > most * q:
                return None
        k *= 2
    return None


def _orth(y: np.ndarray) -> np.ndarray:
    return np.linalg.qr(y)[0]


def _blocks(a: np.ndarray):
    step = max(1, (1 << 22) // max(1, a.shape[1]))  # about 4 M elements at a time: no full-size temporary
    return (a[i:i + step] for i in range(0, a.shape[0], step))


def _norm(a: np.ndarray) -> float:
    """``||a||_F`` (one pass, accumulated in float64); NaN when ``a`` holds NaN or Inf, and
    computed scaled when its square passes float64's range, so it never overflows itself."""
    square = _square_sum(a)
    if np.isfinite(square):
        return float(np.sqrt(square))
    if not all(np.all(np.isfinite(b)) for b in _blocks(a)):
        return float("nan")
    peak = max(float(np.max(np.abs(b))) for b in _blocks(a))
    return peak * float(np.sqrt(sum(np.sum(np.square(b / peak), dtype=np.float64) for b in _blocks(a))))


def _fits(norm: float, dtype: np.dtype) -> bool:
    """Whether an SVD stays finite in ``dtype``: the Frobenius norm bounds every singular value."""
    return norm * 4 < float(np.finfo(dtype).max)


def _svd(a: np.ndarray) -> Spectrum:
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    return _signed(u, s, vt)


def _signed(u: np.ndarray, s: np.ndarray, vt: np.ndarray) -> Spectrum:
    # Deterministic signs: the largest-|.| entry of each left singular vector is positive.
    pivots = np.argmax(np.abs(u), axis=0)
    signs = np.sign(u[pivots, np.arange(u.shape[1])])
    signs[signs == 0] = 1
    u = u * signs
    vt = vt * signs[:, None]
    return Spectrum(u=u, s=s, vt=vt)


def factors(spec: Spectrum, rank: int, dtype: np.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The factors ``A = U_r S_r^(1/2)`` (m, r) and ``B = S_r^(1/2) V_r^T`` (r, n).

    Args:
        spec: The matrix's spectrum.
        rank: Rank to keep, ``1 <= rank <= spec.full_rank``.
        dtype: Cast the factors to this dtype (the weight's own); defaults to the compute dtype.
    """
    if not 1 <= rank <= spec.kept:
        raise ValueError(f"Got rank={rank}; expected 1 <= rank <= {spec.kept}.")
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
