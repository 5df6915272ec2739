"""4-bit block quantization with a low-rank correction of its error.  Pure NumPy.

Block quantization (onnxruntime's ``MatMulNBits`` layout)
----------------------------------------------------------
A weight ``W`` of shape ``(K, N)``, multiplied as ``x @ W``, is cut along ``K`` into blocks of
``block`` consecutive rows (the last one padded with zeros).  Each block of each column ``j``
gets a scale ``s`` and an integer zero point ``z`` in ``[0, 15]``, and its values become codes
``q`` in ``[0, 15]``::

    q = clip(round(w / s) + z, 0, 15)        w ~ (q - z) s                      (dequantized)

with ``lo = min(w, 0)``, ``hi = max(w, 0)`` over the block shrunk by a clipping factor ``c``,
``s = c (hi - lo) / 15`` and ``z = clip(round(-c lo / s), 0, 15)``; ``c`` is chosen per block from
:data:`CLIP_GRID` to minimize the squared error of the block (clipping a few large values often
buys finer steps for all others).  Zero always lies in the range, so exact zeros stay exact.

Stored as onnxruntime reads them (``com.microsoft.MatMulNBits``, ``bits=4``):

* ``B``: uint8 ``(N, blocks, block / 2)``: column ``j``, block ``b``, two codes per byte, the
  earlier row in the low nibble;
* ``scales``: float32 ``(N, blocks)``;
* ``zero_points``: uint8 ``(N, ceil(blocks / 2))``: two 4-bit zero points per byte, the earlier
  block in the low nibble.

:func:`dequantize` computes ``(q - z) * s`` in float32, element by element, exactly as the
runtime's float path does, so ``x @ dequantize(quantize(W))`` matches ``MatMulNBits`` to float32
rounding of the sums (``accuracy_level`` 0 or 1; level 4 also rounds ``x`` to int8).

Low-rank correction (LQER, QERA)
--------------------------------
The quantization error ``R = W - Q(W)`` (``Q(W)`` the dequantized weight, as the runtime sees
it) is spread over all directions, but what matters is ``||X R||_F`` over real inputs ``X``.
With ``G = X^T X`` and ``G + d I = L L^T`` (:func:`~onnx_lowrank.linalg.whitening_factor`)::

    ||X (R - A B)||_F = ||L^T R - L^T A B||_F            (d = 0)

so the best rank-``r`` branch is the truncated SVD of the whitened residual
``L^T R = U S V^T``, mapped back::

    A = L^{-T} U_r S_r    (K, r)        B = V_r^T    (r, N)        x W ~ x Q(W) + (x A) B

All singular values go into ``A`` and ``B`` keeps orthonormal rows: when the factors are stored
as int8 with one scale per column (:func:`quantize_columns`), each column of ``A`` gets the
range of its own singular direction and ``B``'s columns hold values of one scale.  Without
statistics (``G = None``) the plain SVD of ``R`` is used, which removes little: the
quantization error has a flat spectrum; the whitened one does not, because inputs concentrate
on a few directions (outlier features).

Alternating (as LoftQ does for fine-tuning): once the branch exists, the blocks are refitted to
``W - A B`` and the branch to what they leave, a few times.  The blocks then stop spending
their levels on what the branch already carries.  :func:`fit` keeps the best pair seen, so
more rounds never leave a larger whitened error.

Error feedback (GPTQ)
---------------------
Rounding every weight to its nearest level minimizes ``||W - Q(W)||`` but not the error that
matters, ``||X (W - Q(W))||``.  With the Gram, the rows of ``W`` (one per input feature) are
rounded in order, and each row's error ``e`` goes into the rows not yet rounded, in the way
that cancels it best on the calibration inputs (Frantar et al., GPTQ, arXiv 2210.17323):
with ``(G + d I)^-1 = U^T U``, ``U`` upper triangular::

    e = (w_i - Q(w_i)) / U_ii            w_j -= U_ij e    (j > i)

A block's scale and zero point are chosen when the block is reached, from its rows as updated
by then (clipping grid as above); its later rows may then fall outside the range and clip.  The
rows stay in their order (no activation reordering), so the blocks keep ``MatMulNBits``'s layout,
and columns never mix: a column's codes are the same whether quantized alone or with the rest.
With ``G = I`` nothing is fed (``U`` is diagonal) and the result is nearest rounding.  MiniLM,
block 32, no branch, mean correction: held-out cosine 0.9796 with nearest rounding, 0.9921
with feedback, at the same bytes and speed.

Inside the blocks (the "stacked" branch)
-----------------------------------------
``x Q(W) + (x A) B`` equals ``[x, x A] @ [Q(W); B]``: the second factor can ride in the same
4-bit product as extra rows below ``W``'s blocks.  They start a block of their own: when ``K``
is not a multiple of ``block``, the padded rows of ``W``'s last block (zeros, which dequantize to
exactly zero) stay in between, and ``A`` gains as many zero columns in front (``[x, x [0, A]]``:
``p = -K mod block`` inputs that meet zero weights).  :func:`stacked` quantizes ``B`` in blocks of
its own and refits ``A`` to the dequantized ``B^``: the ``A`` minimizing ``||L^T (R - A B^)||_F``
is ``R B^+`` for any invertible ``L``, so the whitening drops out.  :func:`stacked_bytes` counts
what it stores.

The rank per layer: the smallest ``r`` whose share of the whitened residual's squared singular
values ``E(r) = sum_{i<=r} s_i^2 / ||L^T R||_F^2`` reaches ``energy`` (or a fixed ``rank``),
never more than ``max_rank``.  ``1 - E(r)`` is the share of the layer's output error left, so
the same energy asks every layer for the same relative repair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .rank import energy_kept, energy_rank
from .svd import spectrum
from .whiten import DEFAULT_DAMPING, whitening_factor

__all__ = ["BLOCK_SIZES", "CLIP_GRID", "BlockQuantized", "quantize_blocks", "dequantize", "Correction", "correction",
           "Fit", "fit", "quantize_columns", "dequantize_columns", "block_bytes", "branch_bytes", "correction_errors",
           "column_correction_errors", "whitened_values", "Stacked", "stacked", "stacked_bytes", "stack_blocks",
           "stack_padding"]

#: Block sizes ``MatMulNBits`` takes on CPU (powers of two, at least 16).
BLOCK_SIZES = (16, 32, 64, 128, 256)
#: How :func:`fit` rounds the blocks: to the nearest level, or in order with error feedback.
ROUNDINGS = ("nearest", "gptq")
#: Clipping factors tried per block (1 = the block's full range).
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8)

_LEVELS = 15  # 4 bits: codes 0..15


@dataclass(frozen=True)
class BlockQuantized:
    """A ``(K, N)`` weight in onnxruntime's 4-bit block layout (module docstring).

    Attributes:
        packed: uint8 ``(N, blocks, block // 2)``.
        scales: float32 ``(N, blocks)``.
        zero_points: uint8 ``(N, (blocks + 1) // 2)``, two per byte.
        k, n: The weight's shape.
        block: Rows per block.
    """

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    k: int
    n: int
    block: int

    @property
    def blocks(self) -> int:
        return int(self.scales.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes, scales and zero points."""
        return int(self.packed.nbytes + self.scales.nbytes + self.zero_points.nbytes)

    def codes(self) -> np.ndarray:
        """The codes, uint8 ``(N, blocks, block)``."""
        lo = self.packed & 0x0F
        hi = self.packed >> 4
        return np.stack([lo, hi], axis=-1).reshape(self.n, self.blocks, self.block)

    def zeros(self) -> np.ndarray:
        """The zero points, uint8 ``(N, blocks)``."""
        z = np.stack([self.zero_points & 0x0F, self.zero_points >> 4], axis=-1).reshape(self.n, -1)
        return z[:, : self.blocks]


def _check_block(block: int) -> None:
    if block not in BLOCK_SIZES:
        raise ValueError(f"Got block={block!r}; expected one of {', '.join(map(str, BLOCK_SIZES))}.")


def _pack_pairs(values: np.ndarray) -> np.ndarray:
    """uint8 values < 16 along the last axis, two per byte (the earlier one low); odd counts padded."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def quantize_blocks(w: np.ndarray, block: int = 32, clip: tuple[float, ...] = CLIP_GRID, gram: np.ndarray | None = None, *,
                    damping: float = DEFAULT_DAMPING) -> BlockQuantized:
    """Asymmetric 4-bit quantization of ``w`` (K, N) in blocks of ``block`` rows per column.

    Args:
        w: The weight as multiplied, ``x @ w``; any float dtype (computed in float32).
        block: Rows per block, one of :data:`BLOCK_SIZES`.
        clip: Clipping factors to try per block; ``(1.0,)`` is plain min/max rounding.
        gram: The input Gram ``X^T X`` (K, K): round with error feedback in its metric (module
            docstring, "Error feedback"); ``None``: each weight to its nearest level.
        damping: Relative damping of ``gram``.

    Returns:
        The codes, scales and zero points in onnxruntime's layout.

    Raises:
        ValueError: ``w`` is not a finite, non-empty 2-D matrix, or ``block`` is not supported.
    """
    _check_block(block)
    w = np.asarray(w)
    if w.ndim != 2 or w.size == 0:
        raise ValueError(f"Got an array of shape {w.shape}; expected a non-empty 2-D matrix.")
    if not np.all(np.isfinite(w)):
        raise ValueError("Matrix holds NaN or Inf values; expected finite weights.")
    if not clip or not all(0.0 < c <= 1.0 for c in clip):
        raise ValueError(f"Got clip={clip!r}; expected factors in (0, 1].")
    k, n = w.shape
    if gram is not None:
        return _fed_back(w, block, clip, _feedback_factor(gram, k, damping))
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = w
    x = padded.reshape(blocks, block, n).transpose(2, 0, 1)  # (N, blocks, block)
    s, z = _best_scale_zero(x, clip)
    return BlockQuantized(packed=_pack_pairs(_codes(x, s, z)), scales=np.ascontiguousarray(s, np.float32),
                          zero_points=_pack_pairs(z.astype(np.uint8)), k=k, n=n, block=block)


def _best_scale_zero(x: np.ndarray, clip: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per block of ``x`` (N, blocks, block): the scale and zero point of the clipping factor in
    ``clip`` with the smallest squared error of the block."""
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = np.maximum(x.max(axis=-1), 0.0)
    best_err = best_s = best_z = None
    for c in clip:
        s, z = _scale_zero(np.float32(c) * lo, np.float32(c) * hi)
        q = _codes(x, s, z)
        err = np.square((q.astype(np.float32) - z[..., None]) * s[..., None] - x).sum(axis=-1)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s, best_s)
            best_z = np.where(better, z, best_z)
    return best_s, best_z


def _feedback_factor(gram: np.ndarray, k: int, damping: float) -> np.ndarray:
    """``U``, upper triangular with ``U^T U = (G + d I)^-1`` (module docstring, "Error feedback").

    With ``J`` the reversal of the ``k`` indices and ``J G J + d I = M M^T`` (Cholesky), ``U = J
    M^-1 J``: one factorization and one triangular inverse, no inverse of ``G`` itself."""
    if gram.shape != (k, k):
        raise ValueError(f"Got a Gram matrix of shape {gram.shape} for a weight of {k} rows; expected ({k}, {k}).")
    m, _ = whitening_factor(np.asarray(gram)[::-1, ::-1], damping)
    if np.array_equal(m, np.tril(m)):
        return np.ascontiguousarray(np.triu(np.linalg.inv(m)[::-1, ::-1]))  # (the inverse's rounding leaves 1e-20s below)
    inv = np.linalg.inv(m @ m.T)[::-1, ::-1]  # (G + d I)^-1 (the eigendecomposition fallback: not triangular)
    return np.ascontiguousarray(np.linalg.cholesky((inv + inv.T) / 2).T)


def _feedback(gram: np.ndarray | None, k: int, damping: float, rounding: str) -> np.ndarray | None:
    """The factor :func:`_rounded` feeds errors through under ``rounding`` (``None``: nearest
    rounding, asked for or without a Gram to weigh the error by)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"Got rounding={rounding!r}; expected one of {', '.join(ROUNDINGS)}.")
    return _feedback_factor(gram, k, damping) if rounding == "gptq" and gram is not None else None


def _rounded(w: np.ndarray, block: int, u: np.ndarray | None) -> BlockQuantized:
    """:func:`quantize_blocks` of ``w``, with error feedback through ``u`` when given."""
    return quantize_blocks(w, block) if u is None else _fed_back(np.asarray(w), block, CLIP_GRID, u)


def _fed_back(w: np.ndarray, block: int, clip: tuple[float, ...], u: np.ndarray) -> BlockQuantized:
    """Rows rounded in order with each row's error fed forward to the rows not yet rounded
    through ``u`` (:func:`_feedback_factor`; module docstring, "Error feedback")."""
    k, n = w.shape
    work = np.array(w, dtype=np.float64)
    blocks = -(-k // block)
    codes = np.empty((n, blocks, block), np.uint8)
    scales = np.empty((n, blocks), np.float32)
    zeros = np.empty((n, blocks), np.float32)
    for b in range(blocks):
        i0, i1 = b * block, min(k, (b + 1) * block)
        seg = np.zeros((n, 1, block), np.float32)
        seg[:, 0, : i1 - i0] = work[i0:i1].T
        s, z = _best_scale_zero(seg, clip)
        s, z = s[:, 0], z[:, 0]
        scales[:, b], zeros[:, b] = s, z
        codes[:, b, :] = z.astype(np.uint8)[:, None]  # padded rows: exactly zero
        errs = np.empty((i1 - i0, n))
        for i in range(i0, i1):
            c = np.clip(np.rint(work[i].astype(np.float32) / s) + z, 0, _LEVELS)
            codes[:, b, i - i0] = c.astype(np.uint8)
            e = (work[i] - (c - z) * s) / u[i, i]
            errs[i - i0] = e
            work[i + 1 : i1] -= np.outer(u[i, i + 1 : i1], e)
        work[i1:] -= u[i0:i1, i1:].T @ errs
    return BlockQuantized(packed=_pack_pairs(codes), scales=scales, zero_points=_pack_pairs(zeros.astype(np.uint8)), k=k, n=n,
                          block=block)


def _scale_zero(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (as float32 holding integers) of ranges ``[lo, hi]`` that hold 0."""
    span = (hi - lo).astype(np.float32)
    s = np.where(span > 0, span / np.float32(_LEVELS), np.float32(1.0)).astype(np.float32)
    z = np.clip(np.rint(-lo / s), 0, _LEVELS).astype(np.float32)
    return s, z


def _codes(x: np.ndarray, s: np.ndarray, z: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x / s[..., None]) + z[..., None], 0, _LEVELS).astype(np.uint8)


def dequantize(q: BlockQuantized) -> np.ndarray:
    """The float32 ``(K, N)`` weight the runtime multiplies by: ``(q - z) * s`` per element."""
    codes = q.codes().astype(np.float32)
    z = q.zeros().astype(np.float32)
    w = (codes - z[..., None]) * q.scales[..., None]  # (N, blocks, block)
    return np.ascontiguousarray(w.transpose(1, 2, 0).reshape(q.blocks * q.block, q.n)[: q.k])


@dataclass(frozen=True)
class Correction:
    """A rank-``r`` branch ``A B`` fitted to a quantization residual.

    Attributes:
        a: float32 ``(K, r)`` (carries the singular values).
        b: float32 ``(r, N)`` (orthonormal rows).
        rank: ``r`` (0: no branch; ``a`` and ``b`` are then empty).
        whitened: Whether the residual was whitened by input statistics.
        energy: ``E(r)``, the share of the (whitened) residual's squared norm the branch holds.
    """

    a: np.ndarray
    b: np.ndarray
    rank: int
    whitened: bool
    energy: float


def correction(residual: np.ndarray, gram: np.ndarray | None = None, *, energy: float | None = None,
               rank: int | None = None, max_rank: int | None = None, damping: float = DEFAULT_DAMPING) -> Correction:
    """The low-rank branch that best fits ``residual`` (K, N) in the space whitened by ``gram``.

    Args:
        residual: ``W - Q(W)``, multiplied as ``x @ residual``.
        gram: ``G = X^T X`` of the inputs, ``(K, K)``; ``None`` fits the plain residual.
        energy: Keep the smallest rank whose share of the squared singular values reaches this
            (in ``(0, 1]``).
        rank: A fixed rank instead (``0``: no branch).
        max_rank: Never more than this (``None``: ``min(K, N)``).
        damping: Relative damping of ``gram`` (:func:`~onnx_lowrank.linalg.whitening_factor`).

    Returns:
        The branch (module docstring, "Low-rank correction").

    Raises:
        ValueError: neither or both of ``energy`` and ``rank``; a Gram of the wrong shape.
    """
    r_in = np.asarray(residual, dtype=np.float64)
    if r_in.ndim != 2 or r_in.size == 0:
        raise ValueError(f"Got a residual of shape {r_in.shape}; expected a non-empty 2-D matrix.")
    if (energy is None) == (rank is None):
        raise ValueError("Pass exactly one of energy and rank.")
    k, n = r_in.shape
    cap = min(k, n) if max_rank is None else max(0, min(int(max_rank), k, n))
    whitened = gram is not None
    empty = Correction(np.zeros((k, 0), np.float32), np.zeros((0, n), np.float32), 0, whitened, 0.0)
    if rank is not None and (rank <= 0 or cap == 0):
        return empty
    if not np.any(r_in):
        return empty
    lf = None
    a = r_in
    if gram is not None:
        if gram.shape != (k, k):
            raise ValueError(f"Got a Gram matrix of shape {gram.shape} for a ({k}, {n}) residual; expected ({k}, {k}).")
        lf, _ = whitening_factor(gram, damping)
        a = lf.T @ r_in
    spec = spectrum(a, method="exact")
    r = min(rank, cap) if rank is not None else min(energy_rank(spec.s, float(energy)), cap)
    if r <= 0:
        return empty
    left = spec.u[:, :r] * spec.s[:r]
    if lf is not None:
        left = np.linalg.solve(lf.T, left)
    return Correction(np.ascontiguousarray(left, np.float32), np.ascontiguousarray(spec.vt[:r], np.float32), r, whitened,
                      energy_kept(spec.s, r))


@dataclass(frozen=True)
class Fit:
    """A weight as 4-bit blocks plus a correction branch (:func:`fit`).

    Attributes:
        q: The blocks.
        correction: The branch (rank 0: none).
        error_int4: ``||L^T (W - Q(W))||_F / ||L^T W||_F`` of the first rounding (``L = I``
            without statistics): the error the branch starts from.
        error: The same with the branch and the final blocks: ``W - Q'(W) - A B``.
        rounds: Alternations made (module docstring, "Alternating").
        rounding: How the blocks were rounded: ``gptq`` (errors fed back through the Gram) or
            ``nearest`` (asked for, or no Gram).
    """

    q: BlockQuantized
    correction: Correction
    error_int4: float
    error: float
    rounds: int
    rounding: str = "nearest"


def fit(w: np.ndarray, gram: np.ndarray | None = None, *, block: int = 32, energy: float | None = None, rank: int | None = None,
        max_rank: int | None = None, damping: float = DEFAULT_DAMPING, rounds: int = 2, rounding: str = "nearest") -> Fit:
    """Quantize ``w`` (K, N) to 4-bit blocks with a low-rank branch for the error.

    The rank is chosen on the residual of the first rounding (``energy`` or ``rank``, at most
    ``max_rank``; neither: no branch).  Then, ``rounds`` times, the blocks are refitted to
    ``W - A B`` and the branch to the new residual; the pair with the smallest whitened error
    is kept (so more rounds never make it worse).

    Args:
        w: The weight as multiplied, ``x @ w``.
        gram: The input Gram ``X^T X`` (K, K), or ``None`` (plain residual).
        block, energy, rank, max_rank, damping: As for :func:`quantize_blocks` and :func:`correction`.
        rounds: Alternations after the first fit.
        rounding: ``nearest``, or ``gptq``: with ``gram``, each block's rows rounded in order
            with their error fed forward (module docstring, "Error feedback"); every rounding of
            the blocks, the alternations' too.
    """
    w64 = np.asarray(w, dtype=np.float64)
    lf = whitening_factor(gram, damping)[0] if gram is not None else None

    def norm(m: np.ndarray) -> float:
        return float(np.linalg.norm(lf.T @ m if lf is not None else m))

    whole = norm(w64) or 1.0
    u = _feedback(gram, w64.shape[0], damping, rounding)
    q = _rounded(w, block, u)
    done = "gptq" if u is not None else "nearest"
    residual = w64 - dequantize(q)
    first = norm(residual) / whole
    k, n = w64.shape
    none = Correction(np.zeros((k, 0), np.float32), np.zeros((0, n), np.float32), 0, gram is not None, 0.0)
    if energy is None and not rank:
        return Fit(q, none, first, first, 0, done)
    corr = correction(residual, gram, energy=energy, rank=None if energy is not None else rank, max_rank=max_rank,
                      damping=damping)
    if corr.rank == 0:
        return Fit(q, corr, first, first, 0, done)
    best = Fit(q, corr, first, norm(residual - _product(corr)) / whole, 0, done)
    for i in range(rounds):
        q = _rounded((w64 - _product(corr)).astype(np.float32), block, u)
        residual = w64 - dequantize(q)
        corr = correction(residual, gram, rank=best.correction.rank, damping=damping)
        err = norm(residual - _product(corr)) / whole
        if err < best.error:
            best = Fit(q, corr, first, err, i + 1, done)
    return best


def _product(c: Correction) -> np.ndarray:
    return c.a.astype(np.float64) @ c.b.astype(np.float64)


def quantize_columns(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per column: ``a ~ q * scale`` (``q`` in [-127, 127]).

    Returns:
        ``(q, scale)``: int8 ``a.shape`` and float32 ``(a.shape[1],)``, as ``DequantizeLinear``
        with ``axis=1`` reads them.
    """
    a = np.asarray(a, dtype=np.float32)
    top = np.abs(a).max(axis=0) if a.size else np.zeros(a.shape[1], np.float32)
    scale = np.where(top > 0, top / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(a / scale), -127, 127).astype(np.int8)
    return q, scale


def dequantize_columns(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``q * scale`` per column, in float32 (``DequantizeLinear``, zero point 0)."""
    return q.astype(np.float32) * scale.astype(np.float32)


def block_bytes(k: int, n: int, block: int) -> int:
    """Bytes of a ``(K, N)`` weight in 4-bit blocks: codes, float32 scales, packed zero points."""
    blocks = -(-int(k) // int(block))
    return int(n) * (blocks * (int(block) // 2) + 4 * blocks + (blocks + 1) // 2)


def branch_bytes(k: int, n: int, rank: int, storage: str = "int8") -> int:
    """Bytes of a rank-``rank`` pair ``(K, r) (r, N)``: int8 with one float32 scale per singular
    direction on each side, or float32."""
    if storage == "float":
        return 4 * int(rank) * (int(k) + int(n))
    return int(rank) * (int(k) + int(n)) + 8 * int(rank)


def stacked_bytes(k: int, n: int, rank: int, block: int) -> int:
    """Bytes of a rank-``rank`` branch inside the blocks (module docstring): ``A`` in int8 with a
    scale per column (and the ``-K mod block`` zero columns in front), ``B`` as the 4-bit rows the
    product gains."""
    if rank <= 0:
        return 0
    cols = stack_padding(k, block) + int(rank)
    return cols * int(k) + 4 * cols + block_bytes(int(k) + cols, n, block) - block_bytes(k, n, block)


def stack_padding(k: int, block: int) -> int:
    """Rows between ``K`` rows of blocks and what is stacked below them: ``-K mod block``."""
    return -int(k) % int(block)


@dataclass(frozen=True)
class Stacked:
    """A branch inside the blocks: ``x Q(W) + (x A) B^`` with ``B^`` the 4-bit ``b``.

    Attributes:
        a: float32 ``(K, r)``, refitted to ``B^``.
        b: ``B`` in 4-bit blocks (``(r, N)``).
        error: ``||L^T (W - Q(W) - A B^)||_F / ||L^T W||_F`` (as :class:`Fit`'s).
    """

    a: np.ndarray
    b: BlockQuantized
    error: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])


def stacked(w: np.ndarray, q: BlockQuantized, c: Correction, gram: np.ndarray | None = None, *,
            damping: float = DEFAULT_DAMPING) -> Stacked:
    """The branch ``c`` of ``w`` (fitted against blocks ``q``) with ``B`` in 4-bit blocks of
    ``q.block`` rows and ``A`` refitted to the dequantized ``B^`` (module docstring); ``gram``
    and ``damping`` only weigh the error reported.

    Raises:
        ValueError: ``c`` has no rank.
    """
    if c.rank <= 0:
        raise ValueError("A stacked branch needs a correction of rank at least 1.")
    qb = quantize_blocks(c.b, q.block)
    bh = dequantize(qb).astype(np.float64)
    w64 = np.asarray(w, np.float64)
    residual = w64 - dequantize(q)
    a = np.ascontiguousarray(residual @ np.linalg.pinv(bh), np.float32)
    left = residual - a.astype(np.float64) @ bh
    if gram is not None:
        lf = whitening_factor(gram, damping)[0]
        left, w64 = lf.T @ left, lf.T @ w64
    return Stacked(a, qb, float(np.linalg.norm(left) / (np.linalg.norm(w64) or 1.0)))


def stack_blocks(q: BlockQuantized, extra: BlockQuantized) -> BlockQuantized:
    """``q``'s blocks with ``extra``'s below them, as one weight of ``K + p + K'`` rows: each keeps
    its own blocks, and the ``p = -K mod block`` padded rows of ``q``'s last block (zeros) stay in
    between (module docstring)."""
    if q.block != extra.block or q.n != extra.n:
        raise ValueError(f"Cannot stack ({extra.k}, {extra.n}) blocks of {extra.block} below ({q.k}, {q.n}) ones of {q.block}.")
    zeros = np.concatenate([q.zeros(), extra.zeros()], axis=1)
    return BlockQuantized(packed=np.ascontiguousarray(np.concatenate([q.packed, extra.packed], axis=1)),
                          scales=np.ascontiguousarray(np.concatenate([q.scales, extra.scales], axis=1)),
                          zero_points=_pack_pairs(zeros.astype(np.uint8)), k=q.blocks * q.block + extra.k, n=q.n,
                          block=q.block)


def correction_errors(w: np.ndarray, gram: np.ndarray | None, ranks: list[int], *, block: int = 32,
                      damping: float = DEFAULT_DAMPING, rounding: str = "nearest") -> np.ndarray:
    """What a budget needs to price int4: per rank ``c`` in ``ranks``, the squared (whitened)
    error of 4-bit blocks plus a rank-``c`` branch, relative to the weight's own,
    ``||L^T (R - A_c B_c)||^2 / ||L^T W||^2`` (the blocks rounded once, without alternation:
    the same normalization as a factor pair's ``1 - E(r)`` on the whitened spectrum).

    Args:
        w: The weight as multiplied, ``x @ w`` (K, N).
        gram: The input Gram (K, K), or ``None`` (plain norms).
        ranks: Branch ranks to price (0: none).
        block, damping, rounding: As for :func:`fit`.
    """
    return column_correction_errors(w, gram, ranks, [None], block=block, damping=damping, rounding=rounding)[0]


def column_correction_errors(w: np.ndarray, gram: np.ndarray | None, ranks: list[int], columns: list[np.ndarray | None], *,
                             block: int = 32, damping: float = DEFAULT_DAMPING, rounding: str = "nearest") -> list[np.ndarray]:
    """:func:`correction_errors` of ``w[:, c]`` for each column selection ``c`` in ``columns``
    (``None``: every column), from one quantization and one whitening: blocks run along ``K``,
    and error feedback too, so each column is quantized on its own and a selection's codes are
    the whole weight's."""
    w64 = np.asarray(w, dtype=np.float64)
    residual = w64 - dequantize(_rounded(w, block, _feedback(gram, w64.shape[0], damping, rounding)))
    if gram is not None:
        lf = whitening_factor(gram, damping)[0]
        residual, w64 = lf.T @ residual, lf.T @ w64
    top = max([0, *ranks])
    out = []
    for c in columns:
        r, ww = (residual, w64) if c is None else (residual[:, c], w64[:, c])
        whole = float(np.sum(ww * ww)) or 1.0
        total = float(np.sum(r * r))
        s = np.linalg.svd(r, compute_uv=False)[:top] if top else np.zeros(0)  # values only
        held = np.concatenate([[0.0], np.cumsum(s.astype(np.float64) ** 2)])
        out.append(np.array([max(total - held[min(int(k), s.size)], 0.0) / whole for k in ranks]))
    return out


def whitened_values(w: np.ndarray, gram: np.ndarray | None, *, damping: float = DEFAULT_DAMPING) -> np.ndarray:
    """Singular values of ``L^T W`` (of ``W`` without a Gram): a factor pair's error on the
    scale of :func:`correction_errors` is ``1 - E(r)`` of these."""
    a = np.asarray(w, dtype=np.float64)
    if gram is not None:
        a = whitening_factor(gram, damping)[0].T @ a
    return np.linalg.svd(a, compute_uv=False)
