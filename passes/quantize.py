"""int8 after factorization: onnxruntime dynamic quantization, and a check that the factors took it.

Approach
--------
Low-rank factors and int8 compose: factorization cuts the number of weights (``r (m + n)``
instead of ``m n``), quantization cuts the bytes per weight (4 -> 1).  The factors are ordinary
constant MatMul/Gemm operands, so ``onnxruntime.quantization.quantize_dynamic`` treats them like
any dense weight: each becomes an int8 initializer (``<name>_quantized``, or
``<name>_Transposed_quantized`` when a Gemm with ``transB`` is rewritten as a MatMul) consumed by
``MatMulInteger`` or ``DynamicQuantizeMatMul``, with activations quantized per call.

:func:`quantize_int8` runs it with onnxruntime's defaults (int8 weights, per-tensor scales: the
same call a user would make on the dense model), or with one scale per output column
(``per_channel``, mode ``int8-per-channel``), through temporary files because the quantizer works
on paths; :func:`unquantized` lists the weights that did not end up quantized.

Why per-channel matters more after factorization: the factor facing the input,
``A = U_r S_r^(1/2)`` (mapped back through the whitening in data-aware mode), has columns whose
scales follow the singular values, often across two orders of magnitude.  With one scale for the
whole tensor the columns of the small singular values get a handful of int8 levels; one scale per
column gives each direction its own range.  Dense trained weights have outlier columns too, so
per-channel also helps int8 alone (all-MiniLM-L6-v2, held-out text: mean embedding cosine 0.961
per-tensor, 0.993 per-channel, at the same size).  onnxruntime applies per-channel scales to
MatMul weights only; Conv kernels (``ConvInteger``) keep one scale per tensor.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import onnx

from onnx_lowrank import io
from onnx_lowrank.config import QUANTIZE_MODES
from onnx_lowrank.errors import ModelError, UsageError, option, option_value
from onnx_lowrank.pipeline import Context, StageResult, Step

from .rewrite import Rewritten

__all__ = ["QUANTIZE_MODES", "quantize", "quantize_int8", "lift_constants", "quantized_weights", "unquantized", "Quantize", "Quantized",
           "float_matmul_weights"]

log = logging.getLogger(__name__)

INTEGER_MATMULS = ("MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat")
_SUFFIXES = ("_quantized", "_Transposed")


class _DropPreprocessHint(logging.Filter):
    # quantize_dynamic logs a suggestion on the root logger on every call; it is advice to the
    # caller of the quantizer, which here is this module, so it is not passed on.
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in str(record.msg)


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    # The quantizer logs through the module-level logging functions, which configure the root
    # logger (basicConfig) when it has no handler: a library must not leave that behind, so the
    # root logger's handlers and level are restored afterwards.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    f = _DropPreprocessHint()
    root.addFilter(f)
    if not handlers:
        root.addHandler(logging.NullHandler())
    try:
        yield
    finally:
        root.removeFilter(f)
        root.handlers[:] = handlers
        root.setLevel(level)


def _check_float32(model: onnx.ModelProto) -> None:
    """Dynamic int8 quantization expects float32 activations; anything else gives an invalid graph."""
    from onnx import TensorProto

    for v in model.graph.input:
        t = v.type.tensor_type
        if v.type.HasField("tensor_type") and t.elem_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE):
            name = TensorProto.DataType.Name(t.elem_type)
            raise UsageError(f"{option('quantize')} needs a float32 model; input '{v.name}' is {name}. "
                             f"Quantize the float32 export, or drop {option('quantize')}.")


def quantize(model: onnx.ModelProto, mode: str, *, base_dir: str | os.PathLike | io.DataFiles | None = None) -> onnx.ModelProto:
    """Quantize by ``--quantize`` mode name (one of :data:`QUANTIZE_MODES`)."""
    if mode not in QUANTIZE_MODES:
        raise UsageError(f"{option('quantize')} got {mode!r}; expected one of {', '.join(QUANTIZE_MODES)}.")
    if mode == "int4":  # with the default int4 options and no input statistics (passes/int4.py)
        from .int4 import quantize_int4

        return quantize_int4(model, base_dir=base_dir)[0]
    return quantize_int8(model, base_dir=base_dir, per_channel=mode == "int8-per-channel")


def lift_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the main graph's tensor-valued ``Constant`` nodes as initializers of the
    same name (a copy; the model itself when there are none).  onnxruntime's quantizer reads
    weights from initializers only and fails on a weight held in a ``Constant`` node, as some
    exporters (Paddle, older TensorFlow) write every weight.  Before IR 4 an initializer must
    also be a graph input, so such models are left as they are."""
    outputs = {o.name for o in model.graph.output}

    def value(n: onnx.NodeProto) -> onnx.TensorProto | None:
        if (n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.attribute) == 1 and n.attribute[0].name == "value"
                and n.output[0] not in outputs):
            return n.attribute[0].t
        return None

    if model.ir_version < 4 or not any(value(n) is not None for n in model.graph.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = []
    for n in out.graph.node:
        t = value(n)
        if t is None:
            keep.append(n)
            continue
        init = out.graph.initializer.add()
        init.CopyFrom(t)
        init.name = n.output[0]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def quantize_int8(model: onnx.ModelProto, *, base_dir: str | os.PathLike | io.DataFiles | None = None,
                  op_types: Iterable[str] | None = None, per_channel: bool = False) -> onnx.ModelProto:
    """Dynamic int8 quantization of a model's constant MatMul/Gemm weights (onnxruntime).

    Args:
        model: The (factorized) model; left unmodified.
        base_dir: Where its external data references point.
        op_types: Op types to quantize; onnxruntime's defaults when ``None``.
        per_channel: One scale per output column of each weight instead of one per tensor.

    Returns:
        The quantized model, fully in memory.

    Raises:
        ModelError: onnxruntime's quantizer failed on the model.
    """
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
        raise UsageError(f"{option('quantize')} needs onnxruntime's quantization tools ({exc}).") from None
    _check_float32(model)
    model = lift_constants(model)
    large = io.uses_external_data(model) or model.ByteSize() > io.PROTOBUF_LIMIT // 2
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-int8-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        io.save_model(model, src, data=io.as_data(base_dir), external=large or None)
        try:
            with _quiet_quantizer():
                quantize_dynamic(src, dst, weight_type=QuantType.QInt8, use_external_data_format=large, per_channel=per_channel,
                                 op_types_to_quantize=list(op_types) if op_types is not None else None)
        except Exception as exc:  # the quantizer raises assorted exception types
            raise ModelError(f"onnxruntime dynamic quantization failed: {type(exc).__name__}: {exc}") from None
        out = onnx.load(str(dst), load_external_data=True)
    log.info("quantized to int8%s: %d integer MatMul node(s)", " per channel" if per_channel else "", sum(n.op_type in INTEGER_MATMULS for n in out.graph.node))
    return out


def _original_name(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for suffix in _SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                changed = True
    return name


def quantized_weights(model: onnx.ModelProto) -> set[str]:
    """Names (as before quantization) of the float weights that integer MatMul nodes now consume."""
    inits = {t.name for g in io.iter_graphs(model.graph) for t in g.initializer}
    names: set[str] = set()
    for g in io.iter_graphs(model.graph):
        for node in g.node:
            if node.op_type in INTEGER_MATMULS:
                for inp in node.input:
                    if inp in inits and inp.endswith("_quantized"):
                        names.add(_original_name(inp))
    return names


def unquantized(model: onnx.ModelProto, weights: Iterable[str]) -> list[str]:
    """The names among ``weights`` that no integer MatMul consumes in ``model``."""
    done = quantized_weights(model)
    return [w for w in weights if w not in done]


@dataclass
class Quantized(StageResult):
    """The model after onnxruntime's dynamic int8 quantization, fully in memory."""

    section = "quantize"
    model: onnx.ModelProto
    data: io.DataFiles
    mode: str
    factors: list[str]
    missed: list[str]

    dense_float: dict[str, bool] = field(default_factory=dict)  # dense weights it left float: read in a body?

    def to_dict(self) -> dict[str, Any]:
        out = {"mode": self.mode, "factors": len(self.factors), "factors_quantized": len(self.factors) - len(self.missed),
               "unquantized_factors": list(self.missed)}
        if self.dense_float:
            out["dense_left_float"] = sorted(self.dense_float)
            out["dense_left_float_in_bodies"] = sum(self.dense_float.values())
        return out


class Quantize(Step):
    """int8 after factorization (``quantize``); records whether every factor ended up quantized.
    ``int4`` is :mod:`.int4`'s (its result is an :class:`~.int4.Int4Quantized`)."""

    name = "quantize"
    changes_model = True

    def applies(self, ctx: Context) -> bool:
        return ctx.config.quantize is not None and not ctx.request.dry_run

    def run(self, ctx: Context) -> StageResult:
        mode = ctx.config.quantize
        if mode == "int4":
            from .int4 import run_stage

            return run_stage(ctx)
        quantized = quantize(ctx.model, mode, base_dir=ctx.data)
        factors = [name for names in ctx.need(Rewritten).factors.values() for name in names]
        missed = unquantized(quantized, factors)
        if missed:
            log.warning("int8 quantization left %d factor(s) in float: %s", len(missed), ", ".join(missed))
        dense = {name: body for name, body in float_matmul_weights(quantized).items() if name not in set(factors)}
        if dense:
            inside = sum(dense.values())
            log.warning("onnxruntime's quantizer left %d dense MatMul/Gemm weight(s) in float%s", len(dense),
                        f", {inside} of them read inside If/Loop/Scan bodies, which it does not quantize; "
                        f"{option_value('quantize', 'int4')} takes those" if inside else "")
        return Quantized(quantized, io.DataFiles(), mode, factors, missed, dense)


def float_matmul_weights(model: onnx.ModelProto) -> dict[str, bool]:
    """The float 2-D constants that a MatMul or Gemm of any graph multiplies ``x`` by (input 1),
    with whether one of those products is inside an If/Loop/Scan body."""
    from onnx import TensorProto

    from .scopes import Scopes

    sc = Scopes(model.graph)
    out: dict[str, bool] = {}
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
    for key, c in sc.consts.items():
        if c.tensor.data_type not in floats or len(c.tensor.dims) != 2:
            continue
        users = [u for u in sc.readers.get(key, []) if u.node >= 0 and u.slot == 1
                 and sc.node(u).op_type in ("MatMul", "Gemm") and sc.node(u).domain in ("", "ai.onnx")]
        if users:
            out[c.name] = out.get(c.name, False) or any(u.graph > 0 for u in users)
    return out
