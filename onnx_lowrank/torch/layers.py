"""SVD-parameterized layers: a weight held as ``U diag(s) V^T`` and trained in that form.

Approach
--------
Every layer views its weight as a matrix ``M`` of shape ``(m, n)`` and stores the three factors
of ``M = U diag(s) V^T`` as parameters: ``U`` (m, r), ``s`` (r,) and ``V`` (n, r).

=================================  ==========================  ==========================
layer                              ``M``                       forward
=================================  ==========================  ==========================
:class:`SVDLinear`                 ``W`` [out, in]             ``((x V) * s) U^T + b``
:class:`SVDConv2d`, channel-wise   ``W`` as out x (in kh kw)   kh x kw conv in -> r,
                                                               scale by s, 1x1 conv r -> out
:class:`SVDConv2d`, spatial-wise   ``W`` as (in kh) x (out kw) kh x 1 conv in -> r,
                                                               scale by s, 1 x kw conv r -> out
=================================  ==========================  ==========================

Channel-wise, ``M[o, (c, i, j)] = W[o, c, i, j]``: the first conv carries the kernel, stride,
padding and dilation, the second (1x1) the bias.  Spatial-wise, ``M[(c, i), (o, j)] =
W[o, c, i, j]``, so ``W[o, c, i, j] = sum_k U[(c, i), k] s_k V[(o, j), k]``: the first conv is
kh x 1 with the vertical stride, padding and dilation and keeps every column; the second is
1 x kw with the horizontal ones and the bias.  Both are exactly the original conv for the full
rank ``r = min(m, n)``.

The forward pass always runs in the factored form, so a pruned layer trains at its own cost; the
same two products are what :func:`onnx_lowrank.torch.export_onnx` writes.

A state dict of another rank (a pruned checkpoint) loads into a layer of any rank: the
parameters are resized to the shapes in the state dict.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from onnx_lowrank.errors import UsageError
from onnx_lowrank.linalg import CONV_MODES

__all__ = ["SVDLayer", "SVDLinear", "SVDConv2d", "CONV_MODES", "INITS"]

INITS = ("weights", "random")


def _svd(mat: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64 (so that the layer reproduces the weight to float32 rounding), signs fixed.

    Returns ``U`` (m, r), ``s`` (r,), ``V`` (n, r) in the matrix's dtype.
    """
    u, s, vh = torch.linalg.svd(mat.detach().to(torch.float64), full_matrices=False)
    # Deterministic signs, as in onnx_lowrank.decompose: the largest-|.| entry of each column of U is positive.
    pivots = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivots, torch.arange(u.shape[1])])
    signs[signs == 0] = 1
    u, vh = u * signs, vh * signs[:, None]
    r = s.shape[0] if rank is None else max(1, min(int(rank), s.shape[0]))
    dt = mat.dtype
    return u[:, :r].to(dt).contiguous(), s[:r].to(dt).contiguous(), vh[:r].T.to(dt).contiguous()


def _random_factors(m: int, n: int, rank: int | None, fan_in: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """Random orthonormal ``U``, ``V`` and a constant ``s``.

    PyTorch's default init draws ``W`` from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), so
    ``E ||W||_F^2 = m n / (3 fan_in)``; with orthonormal factors ``||W||_F^2 = r s^2``, which fixes s.
    """
    r = min(m, n) if rank is None else max(1, min(int(rank), m, n))
    u, _ = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64))
    s = torch.full((r,), math.sqrt(m * n / (3.0 * fan_in * r)), dtype=torch.float64)
    return tuple(t.to(dtype=dtype, device=device).contiguous() for t in (u, s, v))


class SVDLayer(nn.Module):
    """Base of the SVD layers: parameters ``U`` (m, r), ``s`` (r,), ``V`` (n, r) and an optional bias."""

    U: nn.Parameter
    s: nn.Parameter
    V: nn.Parameter
    bias: nn.Parameter | None

    def _init_factors(self, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> None:
        self.U = nn.Parameter(u)
        self.s = nn.Parameter(s)
        self.V = nn.Parameter(v)

    @property
    def rank(self) -> int:
        """The current rank ``r``."""
        return int(self.s.shape[0])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(m, n)``, the shape of the matrix ``M = U diag(s) V^T``."""
        return int(self.U.shape[0]), int(self.V.shape[0])

    def matrix(self) -> torch.Tensor:
        """``M = U diag(s) V^T``, shape ``(m, n)``."""
        return (self.U * self.s) @ self.V.T

    def dense_weight(self) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def dense_params(self) -> int:
        """Weight parameters of the original dense layer."""
        m, n = self.matrix_shape
        return m * n

    def factor_params(self) -> int:
        """Weight parameters of the two exported factors, ``r (m + n)``."""
        m, n = self.matrix_shape
        return self.rank * (m + n)

    def break_even(self) -> int:
        """Largest rank whose factors hold fewer parameters than the dense weight."""
        m, n = self.matrix_shape
        return (m * n - 1) // (m + n)

    @torch.no_grad()
    def keep(self, index: torch.Tensor) -> None:
        """Keep only the singular triplets at ``index`` (a 1-D index tensor), in that order.

        The parameters are replaced by smaller ones: build the optimizer after calling this.
        """
        index = index.to(self.s.device)
        self._init_factors(self.U[:, index].clone(), self.s[index].clone(), self.V[:, index].clone())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A pruned checkpoint has smaller U, s, V: take its rank before the copy checks shapes.
        s_key = prefix + "s"
        if s_key in state_dict and state_dict[s_key].dim() == 1 and state_dict[s_key].shape[0] != self.rank:
            r = int(state_dict[s_key].shape[0])
            m, n = self.matrix_shape
            like = self.s
            self._init_factors(like.new_empty(m, r), like.new_empty(r), like.new_empty(n, r))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        m, n = self.matrix_shape
        return f"matrix={m}x{n}, rank={self.rank}, bias={self.bias is not None}"


class SVDLinear(SVDLayer):
    """``nn.Linear`` with its weight ``W`` [out, in] held as ``U diag(s) V^T`` (U: out x r, V: in x r).

    Args:
        in_features: Input size ``n``.
        out_features: Output size ``m``.
        rank: Rank ``r``; ``None`` for full rank ``min(m, n)``.
        bias: Whether the layer has a bias.
    """

    def __init__(self, in_features: int, out_features: int, rank: int | None = None, bias: bool = True,
                 *, dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        dtype = dtype or torch.get_default_dtype()
        u, s, v = _random_factors(self.out_features, self.in_features, rank, self.in_features, dtype, device)
        self._init_factors(u, s, v)
        if bias:
            bound = 1.0 / math.sqrt(self.in_features)
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, layer: nn.Linear, init: str = "weights", rank: int | None = None) -> SVDLinear:
        """An :class:`SVDLinear` equal to ``layer`` (``init="weights"``) or freshly initialized (``"random"``).

        The bias is copied in both cases.
        """
        w = layer.weight
        new = cls(layer.in_features, layer.out_features, rank=rank, bias=layer.bias is not None, dtype=w.dtype, device=w.device)
        if init == "weights":
            new._init_factors(*_svd(w, rank))
        if layer.bias is not None:
            with torch.no_grad():
                new.bias.copy_(layer.bias)
        return new

    def dense_weight(self) -> torch.Tensor:
        """The dense weight ``W = U diag(s) V^T``, shape ``[out, in]``."""
        return self.matrix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V.T) * self.s, self.U, self.bias)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


class SVDConv2d(SVDLayer):
    """``nn.Conv2d`` (groups = 1, zero padding) with its weight held as ``U diag(s) V^T``.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        kernel_size: ``k`` or ``(kh, kw)``.
        stride, padding, dilation: As for ``nn.Conv2d``; ``padding`` may be ``"same"``/``"valid"``.
        bias: Whether the layer has a bias.
        rank: Rank ``r``; ``None`` for full rank.
        mode: ``"channel"`` (M is C_out x C_in kh kw) or ``"spatial"`` (M is C_in kh x C_out kw).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, bias: bool = True, rank: int | None = None, mode: str = "channel",
                 *, dtype: torch.dtype | None = None, device: Any = None):
        super().__init__()
        if mode not in CONV_MODES:
            raise UsageError(f"got conv_mode={mode!r}; expected one of {', '.join(CONV_MODES)}.")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.mode = mode
        kh, kw = self.kernel_size
        m, n = self._matrix_dims()
        dtype = dtype or torch.get_default_dtype()
        self._init_factors(*_random_factors(m, n, rank, self.in_channels * kh * kw, dtype, device))
        if bias:
            bound = 1.0 / math.sqrt(self.in_channels * kh * kw)
            self.bias = nn.Parameter(torch.empty(self.out_channels, dtype=dtype, device=device).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def _matrix_dims(self) -> tuple[int, int]:
        kh, kw = self.kernel_size
        if self.mode == "channel":
            return self.out_channels, self.in_channels * kh * kw
        return self.in_channels * kh, self.out_channels * kw

    @classmethod
    def from_conv(cls, layer: nn.Conv2d, init: str = "weights", rank: int | None = None, mode: str = "channel") -> SVDConv2d:
        """An :class:`SVDConv2d` equal to ``layer`` (``init="weights"``) or freshly initialized (``"random"``)."""
        w = layer.weight
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                  bias=layer.bias is not None, rank=rank, mode=mode, dtype=w.dtype, device=w.device)
        if init == "weights":
            new._init_factors(*_svd(new.weight_to_matrix(w), rank))
        if layer.bias is not None:
            with torch.no_grad():
                new.bias.copy_(layer.bias)
        return new

    def weight_to_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """Reshape a conv weight ``[C_out, C_in, kh, kw]`` to this layer's matrix ``M``."""
        c_out, c_in, kh, kw = w.shape
        if self.mode == "channel":
            return w.reshape(c_out, c_in * kh * kw)
        return w.permute(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)

    def dense_weight(self) -> torch.Tensor:
        """The dense conv weight ``[C_out, C_in, kh, kw]`` that the factors represent."""
        kh, kw = self.kernel_size
        mat = self.matrix()
        if self.mode == "channel":
            return mat.reshape(self.out_channels, self.in_channels, kh, kw)
        return mat.reshape(self.in_channels, kh, self.out_channels, kw).permute(2, 0, 1, 3).contiguous()

    def conv_weights(self, s_first: torch.Tensor, s_second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two conv kernels, with ``diag(s_first)`` folded into the first and ``diag(s_second)`` into the second.

        Channel-wise: ``[r, C_in, kh, kw]`` and ``[C_out, r, 1, 1]``; spatial-wise: ``[r, C_in, kh, 1]`` and
        ``[C_out, r, 1, kw]``.
        """
        kh, kw = self.kernel_size
        r = self.rank
        if self.mode == "channel":
            first = (self.V * s_first).T.reshape(r, self.in_channels, kh, kw)
            second = (self.U * s_second).reshape(self.out_channels, r, 1, 1)
        else:
            first = (self.U * s_first).T.reshape(r, self.in_channels, kh, 1)
            second = (self.V * s_second).reshape(self.out_channels, kw, r).permute(0, 2, 1).reshape(self.out_channels, r, 1, kw)
        return first, second

    def conv_args(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Stride, padding and dilation of the first and the second conv."""
        if self.mode == "channel":
            return ({"stride": self.stride, "padding": self.padding, "dilation": self.dilation}, {})
        sh, sw = self.stride
        dh, dw = self.dilation
        if isinstance(self.padding, str):
            # "same"/"valid" act per kernel, and a kernel of size 1 needs no padding on its axis.
            ph = pw = self.padding
        else:
            ph, pw = (self.padding[0], 0), (0, self.padding[1])
        return ({"stride": (sh, 1), "padding": ph, "dilation": (dh, 1)},
                {"stride": (1, sw), "padding": pw, "dilation": (1, dw)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ones = torch.ones_like(self.s)
        first, second = self.conv_weights(ones, ones)
        a1, a2 = self.conv_args()
        h = F.conv2d(x, first, None, **a1) * self.s[:, None, None]
        return F.conv2d(h, second, self.bias, **a2)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, mode={self.mode}, " + super().extra_repr())
