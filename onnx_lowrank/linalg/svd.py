"""The thin SVD of a weight, sign-fixed, and its split into two factors.  Pure NumPy.

A weight ``W`` of shape ``(m, n)`` has the thin SVD ``W = U diag(s) V^T`` with
``s_1 >= s_2 >= ... >= 0``.  Keeping the top ``r`` singular triplets gives the best rank-``r``
approximation in the Frobenius norm (Eckart-Young), with

* energy kept      ``E(r) = sum_{i<=r} s_i^2 / sum_i s_i^2``
* relative error   ``||W - W_r||_F / ||W||_F = sqrt(1 - E(r))``

The factors split the singular values evenly so both have the same scale::

    A = U_r diag(s_r)^(1/2)      shape (m, r)
    B = diag(s_r)^(1/2) V_r^T    shape (r, n)       W_r = A @ B

Factoring pays only below break-even (:mod:`.rank`).  Signs are fixed so that the largest-magnitude entry of every left singular vector is positive
(the matching right vector flips with it); the factors are then identical across runs and
platforms for the same input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Spectrum", "spectrum", "factors"]


@dataclass(frozen=True)
class Spectrum:
    """The thin SVD of a matrix, sign-fixed.

    Attributes:
        u: Left singular vectors, shape ``(m, q)``: ``q = min(m, n)``, or fewer once
            :meth:`truncated` (the singular values stay whole, so energies stay exact).
        s: Singular values, shape ``(min(m, n),)``, descending.
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

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.shape[0], self.vt.shape[1])

    @property
    def full_rank(self) -> int:
        return int(self.s.shape[0])

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
                        out_whiten=self.out_whiten)


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    # float64 weights stay float64; everything narrower (fp16, bf16, fp32) is computed in fp32.
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def spectrum(w: np.ndarray) -> Spectrum:
    """Thin, sign-fixed SVD of a 2-D matrix.

    Args:
        w: Matrix of shape ``(m, n)``, any floating dtype.

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
    a = np.asarray(w, dtype=_compute_dtype(w.dtype))
    if not np.all(np.isfinite(a)):
        raise ValueError("Matrix holds NaN or Inf values; expected finite weights.")
    spec = _svd(a) if _fits(a) else None
    if spec is None and a.dtype != np.float64:  # a finite matrix whose norm passes float32's range
        a = np.asarray(w, dtype=np.float64)
        spec = _svd(a) if _fits(a) else None
    if spec is None:
        raise ValueError("Matrix is too large in magnitude: its singular values overflow float64; rescale the weights.")
    return spec


def _fits(a: np.ndarray) -> bool:
    """Whether the SVD of ``a`` stays finite in its dtype: its Frobenius norm bounds every
    singular value (computed scaled, so the check itself cannot overflow)."""
    peak = float(np.max(np.abs(a)))
    if peak == 0.0:
        return True
    norm = peak * float(np.linalg.norm((a / peak).astype(np.float64)))
    return norm * 4 < float(np.finfo(a.dtype).max)


def _svd(a: np.ndarray) -> Spectrum:
    u, s, vt = np.linalg.svd(a, full_matrices=False)
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
