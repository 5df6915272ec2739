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

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank import io
from onnx_lowrank.config import QUANTIZE_MODES
from onnx_lowrank.errors import ModelError, UsageError, option, option_value
from onnx_lowrank.pipeline import Context, StageResult, Step

from .rewrite import NameScope, Rewritten, remove_constant

__all__ = ["QUANTIZE_MODES", "quantize", "quantize_int8", "converted_ops", "lift_constants", "quantized_weights", "unquantized", "Quantize", "Quantized",
           "float_matmul_weights", "quantize_bodies"]

log = logging.getLogger(__name__)

INTEGER_MATMULS = ("MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat")
INTEGER_CONVS = ("ConvInteger", "QLinearConv")
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


def quantize(model: onnx.ModelProto, mode: str, *, base_dir: str | os.PathLike | io.DataFiles | None = None,
             op_types: Iterable[str] | None = None) -> onnx.ModelProto:
    """Quantize by ``--quantize`` mode name (one of :data:`QUANTIZE_MODES`); ``op_types``: the
    op types int8 takes (onnxruntime's defaults when ``None``)."""
    if mode not in QUANTIZE_MODES:
        raise UsageError(f"{option('quantize')} got {mode!r}; expected one of {', '.join(QUANTIZE_MODES)}.")
    if mode == "int4":  # with the default int4 options and no input statistics (passes/int4.py)
        from .int4 import quantize_int4

        return quantize_int4(model, base_dir=base_dir)[0]
    return quantize_int8(model, base_dir=base_dir, per_channel=mode == "int8-per-channel", op_types=op_types)


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
    sort_nodes(out.graph)
    log.info("quantized to int8%s: %d integer MatMul node(s)", " per channel" if per_channel else "", sum(n.op_type in INTEGER_MATMULS for n in out.graph.node))
    return out


def converted_ops(before: onnx.ModelProto, after: onnx.ModelProto) -> dict[str, int]:
    """Per op type other than MatMul/Gemm, how many of ``before``'s main-graph nodes onnxruntime's
    quantizer replaced (``Conv`` by ``ConvInteger``, ``LSTM`` by ``DynamicQuantizeLSTM``, a
    ``Gather`` of a constant table by one of int8 codes and a dequantization...): those whose first
    named output ``after`` computes with another op or from other inputs."""
    made = {out: (n.op_type, list(n.input)) for n in after.graph.node for out in n.output if out}
    counts: dict[str, int] = {}
    for node in before.graph.node:
        out = next((o for o in node.output if o), None)  # (an LSTM often leaves its first output, Y, unnamed)
        if node.op_type in ("MatMul", "Gemm", "Constant") or node.domain not in ("", "ai.onnx") or out is None:
            continue
        if made.get(out) != (node.op_type, list(node.input)):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _same(t: onnx.TensorProto | None, arr: np.ndarray) -> bool:
    return t is not None and tuple(t.dims) == arr.shape and np.array_equal(numpy_helper.to_array(t), arr)


def sort_nodes(graph: onnx.GraphProto) -> None:
    """In place: ``graph``'s nodes (and each body's) in an order where every node comes after the
    nodes whose outputs it reads, the names its If/Loop/Scan bodies read from it included, and
    otherwise as they were.  onnxruntime's quantizer sorts by explicit inputs only and can put
    an If before the node whose output its branches read, which onnx's checker refuses."""
    import heapq

    for node in graph.node:
        for sub in io.node_bodies(node):
            sort_nodes(sub)
    nodes = list(graph.node)
    made = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    users: list[list[int]] = [[] for _ in nodes]
    waiting = [0] * len(nodes)
    for i, n in enumerate(nodes):
        for j in {made[name] for name in _reads(n) if made.get(name, i) != i}:
            users[j].append(i)
            waiting[i] += 1
    ready = [i for i in range(len(nodes)) if not waiting[i]]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:  # Kahn's algorithm, the earliest ready node first: the stored order where it is valid
        i = heapq.heappop(ready)
        order.append(i)
        for k in users[i]:
            waiting[k] -= 1
            if not waiting[k]:
                heapq.heappush(ready, k)
    if len(order) == len(nodes) and order != list(range(len(nodes))):  # (a cycle is left as found)
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)


def _reads(node: onnx.NodeProto) -> set[str]:
    """The names ``node`` reads: its inputs and whatever its bodies read (a body's own names
    included, which match no node of the enclosing graph unless they shadow one)."""
    names = {name for name in node.input if name}
    for sub in io.node_bodies(node):
        for inner in sub.node:
            names |= _reads(inner)
        names |= {v.name for v in sub.output}
    return names


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
    """Names (as before quantization) of the float weights that integer MatMul or Conv nodes now consume."""
    inits = {t.name for g in io.iter_graphs(model.graph) for t in g.initializer}
    names: set[str] = set()
    for g in io.iter_graphs(model.graph):
        for node in g.node:
            if node.op_type in INTEGER_MATMULS or node.op_type in INTEGER_CONVS:
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
    in_bodies: list[str] = field(default_factory=list)  # weights read in bodies, quantized here (quantize_bodies)
    other_ops: dict[str, int] = field(default_factory=dict)  # op type -> nodes other than MatMul/Gemm the quantizer converted

    def to_dict(self) -> dict[str, Any]:
        out = {"mode": self.mode, "factors": len(self.factors), "factors_quantized": len(self.factors) - len(self.missed),
               "unquantized_factors": list(self.missed)}
        if self.in_bodies:
            out["body_weights_quantized"] = len(self.in_bodies)
        if self.dense_float:
            out["dense_left_float"] = sorted(self.dense_float)
            out["dense_left_float_in_bodies"] = sum(self.dense_float.values())
        if self.other_ops:
            out["other_ops_quantized"] = dict(self.other_ops)
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
        nothing = not float_matmul_weights(ctx.model)
        if mode == "int4":
            from .int4 import run_stage

            if nothing:
                _nothing_to_quantize(mode)
            return run_stage(ctx)
        quantized = quantize(ctx.model, mode, base_dir=ctx.data, op_types=["MatMul"] if ctx.config.int8_ops == "matmul" else None)
        in_bodies = quantize_bodies(quantized, per_channel=mode == "int8-per-channel")
        factors = [name for names in ctx.need(Rewritten).factors.values() for name in names]
        missed = unquantized(quantized, factors)
        if missed:
            log.warning("int8 quantization left %d factor(s) in float: %s", len(missed), ", ".join(missed))
        dense = {name: body for name, body in float_matmul_weights(quantized).items() if name not in set(factors)}
        if dense:
            inside = sum(dense.values())
            log.warning("int8 left %d dense MatMul/Gemm weight(s) in float%s", len(dense),
                        f", {inside} of them read inside If/Loop/Scan bodies by something other than MatMul alone; "
                        f"{option_value('quantize', 'int4')} takes Gemm readers too" if inside else "")
        others = converted_ops(ctx.model, quantized)
        if nothing and not others:  # (int8's default ops may still have taken Convs, LSTMs, tables)
            _nothing_to_quantize(mode)
        return Quantized(quantized, io.DataFiles(), mode, factors, missed, dense, in_bodies, others)


def _nothing_to_quantize(mode: str) -> None:
    log.warning("%s: the model has no float MatMul/Gemm weight left to quantize (is it quantized already?); its "
                "weights stay as they are", option_value("quantize", mode))


def quantize_bodies(model: onnx.ModelProto, *, per_channel: bool = False) -> list[str]:
    """In place, after onnxruntime's quantizer, which does not reach them: the float32 weights
    that MatMul nodes inside If/Loop/Scan bodies multiply by (and only MatMul nodes, as input 1)
    become int8 codes, and each of those products the nodes that quantizer writes for one in the
    main graph, where the product is: ``DynamicQuantizeLinear`` of the input, ``MatMulInteger``,
    ``Cast`` and ``Mul`` by the two scales (onnxruntime fuses them when the session starts).  The
    codes are symmetric, as it writes int8 weights: ``round(W / s)`` in [-127, 127] with
    ``s = max|W| / 127`` for the tensor, or for each output column (``per_channel``); they go into
    the main graph, which every body sees.  Returns the names of the weights taken."""
    from .scopes import Scopes

    sc = Scopes(model.graph)
    inputs = {v.name for v in model.graph.input} if model.ir_version >= 4 else set()
    names = NameScope(model)
    main = {t.name: t for t in model.graph.initializer}
    taken, gone = [], []
    rewrites: list[tuple[int, int, list[str]]] = []  # (graph, node index, the weight's codes, scale, zero point)
    for key, c in list(sc.consts.items()):
        users = sc.readers.get(key, [])
        if (c.tensor.data_type != TensorProto.FLOAT or len(c.tensor.dims) != 2 or not any(u.graph > 0 for u in users)
                or (c.graph == 0 and c.name in inputs) or (c.graph > 0 and model.ir_version < 4 and c.node is None)
                or any(u.node < 0 or u.slot != 1 or sc.node(u).op_type != "MatMul" or sc.node(u).domain not in ("", "ai.onnx")
                       for u in users)):
            continue
        w = numpy_helper.to_array(c.tensor).astype(np.float64)
        top = np.abs(w).max(axis=0) if per_channel else np.array(np.abs(w).max())
        scale = np.where(top > 0, top / 127.0, 1.0).astype(np.float32)
        codes = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        made = [(codes, f"{c.name}_quantized"), (scale, f"{c.name}_scale"), (np.zeros_like(codes, shape=scale.shape), f"{c.name}_zero_point")]
        args = [name for _, name in made]
        if not all(_same(main.get(name), arr) for arr, name in made):  # (the quantizer's own, for readers in the main graph)
            args = []
            for arr, base in made:
                t = numpy_helper.from_array(arr, names.fresh(base))
                model.graph.initializer.append(t)
                args.append(t.name)
        rewrites += [(u.graph, u.node, args) for u in users]
        taken.append(c.name)
        gone.append(c)
    for g, i, (codes_name, scale_name, zero_name) in sorted(rewrites, key=lambda r: (r[0], -r[1])):  # (later nodes first)
        graph = sc.graphs[g]
        node = graph.node[i]
        x, out = node.input[0], node.output[0]
        xq, xs, xz, both, y, yf = (names.fresh(f"{out}_{tag}") for tag in
                                   ("x_quantized", "x_scale", "x_zero_point", "scales", "quantized", "quantized_cast"))
        base = node.name or out
        new = [helper.make_node("DynamicQuantizeLinear", [x], [xq, xs, xz], name=names.fresh(f"{base}_x_quantize")),
               helper.make_node("Mul", [xs, scale_name], [both], name=names.fresh(f"{base}_scales")),
               helper.make_node("MatMulInteger", [xq, codes_name, xz, zero_name], [y], name=names.fresh(f"{base}_quant")),
               helper.make_node("Cast", [y], [yf], name=names.fresh(f"{base}_cast"), to=TensorProto.FLOAT)]
        node.op_type = "Mul"  # the last node keeps the product's place, name and output
        del node.input[:]
        node.input.extend([yf, both])
        for k, n in enumerate(new):
            graph.node.insert(i + k, n)
    for c in gone:  # (after the rewrites: a removed Constant node would shift the sites' indices)
        remove_constant(sc.graphs[c.graph], c.name, constant=c.node is not None)
    return taken


def float_matmul_weights(model: onnx.ModelProto) -> dict[str, bool]:
    """The float 2-D constants that a MatMul or Gemm of any graph multiplies ``x`` by (input 1),
    with whether one of those products is inside an If/Loop/Scan body."""
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
