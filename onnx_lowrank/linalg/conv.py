"""Convolutions as matrices: the two views, the kernels of the split, and their MACs.  Pure NumPy.

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

import numpy as np

__all__ = ["CONV_MODES", "conv_matrix_shape", "conv_matrix", "conv_weight", "conv_kernels", "conv_output_size", "conv_macs"]


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


def conv_weight(matrix: np.ndarray, w_shape: tuple[int, ...], mode: str) -> np.ndarray:
    """The Conv weight of shape ``w_shape`` whose :func:`conv_matrix` view is ``matrix`` (its inverse)."""
    _check_conv_mode(w_shape, mode)
    if tuple(matrix.shape) != conv_matrix_shape(w_shape, mode):
        raise ValueError(f"Got a matrix of shape {tuple(matrix.shape)}; the {mode} view of {tuple(w_shape)} is "
                         f"{conv_matrix_shape(w_shape, mode)}.")
    if mode == "channel":
        return np.ascontiguousarray(matrix.reshape(w_shape))
    c_out, c_in, kh, kw = (int(d) for d in w_shape)
    return np.ascontiguousarray(matrix.reshape(c_in, kh, c_out, kw).transpose(2, 0, 1, 3))


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
