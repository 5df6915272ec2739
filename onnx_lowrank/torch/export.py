"""Export an SVD-trained model to ONNX in the factored form the ONNX pass emits.

Approach
--------
Each SVD layer ``M = U diag(s) V^T`` becomes two constant products, ``diag(s)`` split evenly
between them (``|s|^(1/2)`` on each side, the sign on the first), exactly as
:func:`onnx_lowrank.decompose.factors` splits a spectrum:

* ``nn.Linear`` (``y = x W^T + b`` with ``W^T = V diag(s) U^T``):
  ``A = V diag(sign(s) |s|^(1/2))`` (in, r), ``B = diag(|s|^(1/2)) U^T`` (r, out), written as
  ``Add(MatMul(MatMul(x, A), B), b)``: the ``MatMul(MatMul(x, A), B)`` of
  :mod:`onnx_lowrank.rewrite`, for inputs of any rank;
* ``nn.Conv2d``: two ``Conv`` nodes, channel-wise (kh x kw conv ``C_in -> r``, then 1x1 conv
  ``r -> C_out`` with the bias) or spatial-wise (kh x 1 conv with the vertical stride, padding and
  dilation, then 1 x kw conv with the horizontal ones and the bias).

A layer whose rank is at or above break-even (``r (m + n) >= m n``) would be larger factored than
dense, so by default it is written as one dense product ``M`` (``dense_above_break_even``).

The ONNX pass (:func:`onnx_lowrank.compress`) recognizes each exported Linear pair and leaves it
alone with the reason ``"already low-rank: factor pair ... (inner rank r)"``; a dry run describes
the exported model.  The export is checked in onnxruntime against the PyTorch model on the example
inputs.

The TorchScript-based exporter (``dynamo=False``) is used by default: it needs no package beyond
torch, and it writes the products as they are called.  Its deprecation warning is silenced here
because the choice is this module's, not the caller's.
"""

from __future__ import annotations

import copy
import io as _io
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from onnx_lowrank import io
from onnx_lowrank.errors import ModelError, UsageError, VerificationFailed
from onnx_lowrank.torch.convert import svd_layers
from onnx_lowrank.torch.layers import SVDConv2d, SVDLayer, SVDLinear

__all__ = ["ExportedLayer", "ExportResult", "export_onnx", "METADATA_KEY"]

log = logging.getLogger(__name__)

#: ``metadata_props`` key under which the export records each layer's form and rank.
METADATA_KEY = "onnx_lowrank.svd_training"
MIN_OPSET = 13


@dataclass(frozen=True)
class ExportedLayer:
    """How one SVD layer was written.

    Attributes:
        name: Qualified module name.
        kind: ``"Linear"`` or ``"Conv2d"`` (with ``mode``).
        form: ``"factor pair"`` (two products) or ``"dense"`` (rank at or above break-even).
        rank: Rank of the layer.
        matrix_shape: ``(m, n)`` of ``M = U diag(s) V^T``.
        params: Weight parameters written: ``r (m + n)``, or ``m n`` when dense.
        dense_params: ``m n``.
        mode: Conv decomposition, ``"channel"`` or ``"spatial"``; ``None`` for Linear.
    """

    name: str
    kind: str
    form: str
    rank: int
    matrix_shape: tuple[int, int]
    params: int
    dense_params: int
    mode: str | None = None


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: The ONNX file.
        layers: One entry per SVD layer, in module order.
        max_abs_error: Largest ``|torch - onnxruntime|`` over the outputs on the example inputs
            (``None`` when the check was turned off).
        opset: The opset written.
    """

    path: Path
    layers: list[ExportedLayer] = field(default_factory=list)
    max_abs_error: float | None = None
    opset: int = 17

    @property
    def weight_params(self) -> int:
        """Weight parameters of the SVD layers as written."""
        return sum(l.params for l in self.layers)

    def describe(self, **options: Any):
        """A dry run of the ONNX pass on the exported model: its per-layer report.

        Returns:
            The :class:`onnx_lowrank.CompressResult`; exported factor pairs show as left alone,
            ``"already low-rank: factor pair ..."``.
        """
        from onnx_lowrank.api import compress

        return compress(self.path, dry_run=True, **options)


class _FactoredLinear(nn.Module):
    def __init__(self, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.lowrank_A = nn.Parameter(a)
        self.lowrank_B = nn.Parameter(b)
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch.matmul, not F.linear: it is written as MatMul for every input rank, with the factors
        # stored as they are used (F.linear would add a Gemm or a transposed copy depending on rank).
        y = torch.matmul(torch.matmul(x, self.lowrank_A), self.lowrank_B)
        return y + self.bias if self.bias is not None else y


class _FactoredConv2d(nn.Module):
    def __init__(self, first: torch.Tensor, second: torch.Tensor, bias: torch.Tensor | None,
                 args1: dict[str, Any], args2: dict[str, Any]):
        super().__init__()
        self.lowrank_A = nn.Parameter(first)
        self.lowrank_B = nn.Parameter(second)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.args1, self.args2 = args1, args2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, self.lowrank_A, None, **self.args1), self.lowrank_B, self.bias, **self.args2)


def _bias(layer: SVDLayer) -> torch.Tensor | None:
    return layer.bias.detach().clone() if layer.bias is not None else None


@torch.no_grad()
def _export_module(name: str, layer: SVDLayer, dense_above_break_even: bool) -> tuple[nn.Module, ExportedLayer]:
    m, n = layer.matrix_shape
    dense = dense_above_break_even and layer.rank > layer.break_even()
    is_conv = isinstance(layer, SVDConv2d)
    info = ExportedLayer(name=name, kind="Conv2d" if is_conv else "Linear", form="dense" if dense else "factor pair",
                         rank=layer.rank, matrix_shape=(m, n), params=m * n if dense else layer.factor_params(),
                         dense_params=m * n, mode=layer.mode if is_conv else None)
    root = layer.s.abs().sqrt()
    signed = torch.sign(layer.s) * root
    if isinstance(layer, SVDLinear):
        if dense:
            mod = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            mod.weight.copy_(layer.dense_weight())
            if layer.bias is not None:
                mod.bias.copy_(layer.bias)
        else:
            mod = _FactoredLinear((layer.V * signed).clone(), (layer.U * root).T.contiguous(), _bias(layer))
    elif isinstance(layer, SVDConv2d):
        if dense:
            mod = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                            layer.dilation, bias=layer.bias is not None)
            mod.weight.copy_(layer.dense_weight())
            if layer.bias is not None:
                mod.bias.copy_(layer.bias)
        else:
            first, second = layer.conv_weights(signed, root)
            a1, a2 = layer.conv_args()
            mod = _FactoredConv2d(first.clone(), second.clone(), _bias(layer), a1, a2)
    else:  # pragma: no cover - SVDLayer has no other subclasses
        raise ModelError(f"{name}: cannot export an SVD layer of type {type(layer).__name__}.")
    mod.to(dtype=layer.s.dtype, device=layer.s.device)
    return mod, info


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise UsageError(f"got example_inputs of type {type(example_inputs).__name__}; expected a tensor or a tuple of tensors.")


def _flatten(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _flatten(o)]
    raise ModelError(f"model returned a {type(out).__name__}; expected tensors (in tuples, lists or dicts).")


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Any,
    *,
    opset: int = 17,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    dense_above_break_even: bool = True,
    check: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    dynamo: bool = False,
) -> ExportResult:
    """Write ``model`` to ONNX with every SVD layer as two chained products.

    The model itself is not changed: a copy, in eval mode, is exported.

    Args:
        model: A model with SVD layers (after :func:`to_svd`, training and :func:`prune`).
        path: Output ``.onnx`` file; its directory must exist.
        example_inputs: A tensor or a tuple of tensors, as for ``torch.onnx.export``.
        opset: ONNX opset, at least 13.
        input_names: Graph input names; default ``input`` (``input_0``, ... for several).
        output_names: Graph output names; default ``output`` (``output_0``, ...).
        dynamic_batch: Make the first axis of every input and output dynamic.
        dense_above_break_even: Write a layer whose rank saves nothing (``r (m + n) >= m n``) as
            one dense product.
        check: Run the file in onnxruntime on ``example_inputs`` and compare with PyTorch.
        atol: Absolute tolerance of that check.
        rtol: Relative tolerance of that check.
        dynamo: Use the torch.export-based exporter (needs the ``onnxscript`` package) instead of
            the TorchScript-based one.

    Returns:
        An :class:`ExportResult`.

    Raises:
        UsageError: bad opset, names or inputs, or an unusable path.
        ModelError: PyTorch cannot export the model.
        VerificationFailed: onnxruntime's outputs differ from PyTorch's beyond the tolerances
            (nothing is written then).
    """
    if int(opset) < MIN_OPSET:
        raise UsageError(f"got opset={opset}; expected {MIN_OPSET} or newer.")
    out_path = io.check_output_path(path)
    args = _as_tuple(example_inputs)
    export_model = copy.deepcopy(model).eval()
    with torch.no_grad():
        # Reference outputs come from the eval-mode copy before its layers are swapped.
        try:
            expected = [t.detach().cpu().numpy() for t in _flatten(export_model(*args))]
        except Exception as exc:  # (torch raises many types: a shape mismatch is a RuntimeError)
            raise UsageError(f"the model does not run on example_inputs ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                             "pass inputs of the shapes and types it takes.") from None
    infos = []
    for name, layer in list(svd_layers(export_model)):
        mod, info = _export_module(name, layer, dense_above_break_even)
        _replace(export_model, name, mod)
        infos.append(info)
    if not infos:
        log.warning("export_onnx: the model has no SVD layers; it is written as it is")

    n_in = len([a for a in args if isinstance(a, torch.Tensor)])
    in_names = list(input_names) if input_names else (["input"] if n_in == 1 else [f"input_{i}" for i in range(n_in)])
    out_names = list(output_names) if output_names else (["output"] if len(expected) == 1 else [f"output_{i}" for i in range(len(expected))])
    if len(in_names) != n_in or len(out_names) != len(expected):
        raise UsageError(f"got {len(in_names)} input names and {len(out_names)} output names; the model takes "
                         f"{n_in} tensor inputs and returns {len(expected)} tensors.")
    dynamic_axes = {nm: {0: "batch"} for nm in in_names + out_names} if dynamic_batch else None

    buffer = _io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            torch.onnx.export(export_model, args, buffer, input_names=in_names, output_names=out_names,
                              opset_version=int(opset), dynamic_axes=dynamic_axes, do_constant_folding=True, dynamo=dynamo)
    except Exception as exc:  # torch raises many types here; the caller needs one
        raise ModelError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
    proto = onnx.load_model_from_string(buffer.getvalue())
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps({"layers": [asdict(l) for l in infos]}, sort_keys=True))
    onnx.checker.check_model(proto)
    worst = _check(proto, in_names, args, expected, atol, rtol) if check else None  # (before writing: a failed check writes nothing)
    io.save_model(proto, out_path)
    result = ExportResult(path=out_path, layers=infos, opset=int(opset), max_abs_error=worst)
    for info in infos:
        log.info("exported %s as %s, rank %d: %d weight parameters (dense %d)", info.name, info.form, info.rank, info.params, info.dense_params)
    return result


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _check(proto: onnx.ModelProto, in_names: list[str], args: tuple[Any, ...], expected: list[np.ndarray], atol: float, rtol: float) -> float:
    from onnx_lowrank.runtime import session as ort_session

    session = ort_session(proto, threads=1)
    feeds = {nm: a.detach().cpu().numpy() for nm, a in zip(in_names, [a for a in args if isinstance(a, torch.Tensor)])}
    got = session.run(None, feeds)
    worst = 0.0
    for i, (e, g) in enumerate(zip(expected, got)):
        diff = np.abs(e.astype(np.float64) - np.asarray(g, dtype=np.float64))
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
        bound = atol + rtol * np.abs(e)
        if np.any(diff > bound):
            raise VerificationFailed(f"exported output {i}: onnxruntime differs from PyTorch by up to {float(diff.max()):.3g}, "
                                     f"more than atol={atol} + rtol={rtol} * |y|; nothing was written (export with check=False to write it anyway).")
    return worst
