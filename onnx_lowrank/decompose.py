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
]

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
    """

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray

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
    cum = _cumulative_energy(s)
    r = int(np.searchsorted(cum, energy - _ENERGY_RTOL, side="left")) + 1
    return max(1, min(r, len(s)))


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


def round_rank(rank: int, multiple: int, m: int, n: int) -> int:
    """Round ``rank`` up to a multiple of ``multiple``, never past break-even or ``min(m, n)``.

    When rounding up would cross break-even, the largest multiple that still saves is used if it
    is at least ``rank``; otherwise ``rank`` is returned unchanged.
    """
    if multiple <= 1:
        return rank
    limit = min(break_even_rank(m, n), min(m, n))
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
    if dtype is not None:
        a = a.astype(dtype)
        b = b.astype(dtype)
    return np.ascontiguousarray(a), np.ascontiguousarray(b)
