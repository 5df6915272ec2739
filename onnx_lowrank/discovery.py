"""Find the layers the pass can factorize, and say why every other one is left alone.

A *candidate* is a MatMul, Gemm or Conv node (as selected by ``op_types``) in the main graph or
in any If/Loop/Scan body.  A MatMul/Gemm is factorizable when one operand is a constant 2-D
floating-point matrix; a Conv when its weight (input 1) is a constant floating-point tensor
``[C_out, C_in, k_1, ...]``, ``group`` is 1 and its attributes agree with the weight.  Constants
are initializers or outputs of Constant nodes, found by ONNX's lexical scoping (a body may use
tensors of the graphs around it).  Weights are grouped: a tensor used by several nodes is
factorized once and all of its users switch to the same two factors.

ConvTranspose nodes are listed when Conv is selected, so that the report says why they stay.

Every candidate that is left alone carries a human-readable ``reason``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto

from .errors import option

__all__ = ["Weight", "Layer", "WeightGroup", "Discovery", "ConvSpec", "conv_spec", "discover", "FLOAT_TYPES"]

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
MATRIX_OPS = ("MatMul", "Gemm")
CONV_OPS = ("Conv",)
AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


@dataclass(eq=False)
class Weight:
    """A constant tensor: an initializer, or the value of a Constant node."""

    name: str
    graph: onnx.GraphProto
    tensor: TensorProto | None
    constant_node: onnx.NodeProto | None = None
    is_graph_input: bool = False
    problem: str | None = None  # why it cannot be read as a dense tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.dims) if self.tensor is not None else ()

    @property
    def dtype_name(self) -> str:
        return TensorProto.DataType.Name(self.tensor.data_type) if self.tensor is not None else "?"


@dataclass(eq=False)
class Layer:
    """One MatMul/Gemm node and what discovery decided about it."""

    node: onnx.NodeProto
    graph: onnx.GraphProto
    display_name: str
    weight: Weight | None = None
    weight_index: int | None = None  # which input holds the weight: 1 = x @ W, 0 = W @ x
    reason: str | None = None
    conv: ConvSpec | None = None  # a Conv's validated geometry

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def is_conv(self) -> bool:
        return self.node.op_type in CONV_OPS

    @property
    def weight_name(self) -> str | None:
        return self.weight.name if self.weight is not None else None


@dataclass(frozen=True)
class ConvSpec:
    """A Conv node's geometry, checked against its weight; every field has one entry per axis.

    Attributes:
        kernel: Spatial kernel size, from the weight ``[C_out, C_in, *kernel]``.
        strides: Strides.
        pads: ONNX order ``[x1_begin, x2_begin, ..., x1_end, x2_end, ...]``.
        dilations: Dilations.
        auto_pad: ``NOTSET``, ``SAME_UPPER``, ``SAME_LOWER`` or ``VALID``.
        group: The ``group`` attribute (only 1 is factorized).
    """

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    auto_pad: str = "NOTSET"
    group: int = 1

    @property
    def ndim(self) -> int:
        return len(self.kernel)


def _int_list(value) -> list[int] | None:
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return [int(v) for v in value]
    return None


def conv_spec(node: onnx.NodeProto, w_shape: tuple[int, ...]) -> tuple[ConvSpec | None, str | None]:
    """Read a Conv node's attributes and check them against its weight's shape.

    Returns:
        ``(spec, reason)``: the spec when the attributes are well-formed (also for a grouped
        conv, whose MACs the report still counts), and the reason the node is left alone, if any.
    """
    group = _attr(node, "group", 1)
    if not isinstance(group, int) or group < 1:
        return None, f"malformed Conv: group={group!r}; expected a positive integer"
    if len(w_shape) < 3:
        return None, f"Conv weight is {len(w_shape)}-D {list(w_shape)}; expected [C_out, C_in, k_1, ...]"
    nd = len(w_shape) - 2
    kernel = tuple(int(k) for k in w_shape[2:])
    given = _attr(node, "kernel_shape")
    if given is not None and _int_list(given) != list(kernel):
        return None, (f"malformed Conv: kernel_shape {given} disagrees with the weight's kernel {list(kernel)} "
                      f"(weight {list(w_shape)}); re-export the model")
    values = {}
    for name, default, length, low in (("strides", 1, nd, 1), ("dilations", 1, nd, 1), ("pads", 0, 2 * nd, 0)):
        raw = _attr(node, name)
        v = [default] * length if raw is None else _int_list(raw)
        if v is None or len(v) != length or any(x < low for x in v):
            what = "non-negative" if low == 0 else "positive"
            return None, f"malformed Conv: {name} {raw} does not fit a {nd}-D kernel; expected {length} {what} integers"
        values[name] = tuple(v)
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode("utf-8", "replace")
    if auto_pad not in AUTO_PADS:
        return None, f"malformed Conv: unknown auto_pad '{auto_pad}'; expected one of {', '.join(AUTO_PADS)}"
    if auto_pad != "NOTSET" and any(values["pads"]):
        return None, (f"malformed Conv: both auto_pad={auto_pad} and explicit pads {list(values['pads'])} are set; "
                      "ONNX allows only one of them")
    spec = ConvSpec(kernel=kernel, strides=values["strides"], pads=values["pads"], dilations=values["dilations"],
                    auto_pad=auto_pad, group=group)
    if group != 1 and w_shape[1] == 1:
        return spec, (f"depthwise Conv (group={group}): every output channel has its own one-channel kernel, "
                      "so there is no channel matrix to factorize; only group=1 is factorized")
    if group != 1:
        return spec, (f"grouped Conv (group={group}): the factors would have to be block-diagonal per group; "
                      "only group=1 is factorized")
    return spec, None


@dataclass(eq=False)
class WeightGroup:
    """A weight and every candidate node that uses it."""

    weight: Weight
    layers: list[Layer]
    reason: str | None = None


@dataclass
class Discovery:
    """What discovery found, in graph order."""

    layers: list[Layer] = field(default_factory=list)
    groups: list[WeightGroup] = field(default_factory=list)


@dataclass(eq=False)
class _Def:
    kind: str  # "initializer", "constant", "input", "node"
    graph: onnx.GraphProto
    node: onnx.NodeProto | None = None
    weight: Weight | None = None
    uses: list[tuple[onnx.NodeProto | None, int]] = field(default_factory=list)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _constant_weight(node: onnx.NodeProto, graph: onnx.GraphProto) -> Weight:
    name = node.output[0]
    for a in node.attribute:
        if a.name == "value":
            return Weight(name=name, graph=graph, tensor=a.t, constant_node=node)
        if a.name == "sparse_value":
            return Weight(name=name, graph=graph, tensor=None, constant_node=node, problem="weight is a sparse constant")
    return Weight(name=name, graph=graph, tensor=None, constant_node=node, problem="weight is a scalar or 1-D constant")


def _compile(pattern: str | None) -> re.Pattern | None:
    return re.compile(pattern) if pattern else None


def discover(
    model: onnx.ModelProto,
    *,
    op_types: Iterable[str] = MATRIX_OPS,
    include: str | None = None,
    exclude: str | None = None,
    min_params: int = 0,
    allow_input_weights: bool = False,
) -> Discovery:
    """Walk the model and classify every MatMul/Gemm/Conv node.

    Args:
        model: The model; it is only read.
        op_types: Node types to consider (``MatMul``, ``Gemm``, ``Conv``).
        include: Regex; when given, only nodes whose name or weight name matches are factorized.
        exclude: Regex; nodes whose name or weight name matches are left alone.
        min_params: Weights with fewer elements are left alone.
        allow_input_weights: Factorize weights that are also graph inputs (IR < 4 lists every
            initializer as an input); the factors then become inputs in its place.
    """
    wanted = {t for t in op_types if t in MATRIX_OPS or t in CONV_OPS}
    if "Conv" in wanted:
        wanted.add("ConvTranspose")
    inc, exc = _compile(include), _compile(exclude)
    result = Discovery()
    defs_by_weight: dict[int, _Def] = {}
    _walk(model.graph, [], "", wanted, result, defs_by_weight)
    # First, so that a re-run names the pair even for a factor under --min-params.
    _mark_factor_pairs(result)

    groups: dict[int, WeightGroup] = {}
    for layer in result.layers:
        if layer.weight is None or layer.reason is not None:
            continue
        w = layer.weight
        shape_problem = None
        if w.problem is None and layer.is_conv:
            layer.conv, shape_problem = conv_spec(layer.node, w.shape)
        elif w.problem is None and len(w.shape) != 2:
            shape_problem = f"weight is {len(w.shape)}-D {list(w.shape)}; only 2-D matrices are factorized"
        if w.problem:
            layer.reason = w.problem
        elif w.tensor.data_type not in FLOAT_TYPES:
            layer.reason = f"weight is {w.dtype_name}, not floating point (quantized and integer weights are left alone)"
        elif shape_problem is not None:
            layer.reason = shape_problem
        elif w.is_graph_input and not allow_input_weights:
            layer.reason = (
                "weight is also a graph input, so it can be overridden at run time; "
                f"pass {option('allow_input_weights')} if it never is"
            )
        elif int(np.prod(w.shape)) < min_params:
            layer.reason = f"{int(np.prod(w.shape)):,} parameters, fewer than {option('min_params')} {min_params:,}"
        elif exc is not None and (exc.search(layer.display_name) or exc.search(w.name)):
            layer.reason = f"excluded by {option('exclude')} '{exc.pattern}'"
        elif inc is not None and not (inc.search(layer.display_name) or inc.search(w.name)):
            layer.reason = f"not matched by {option('include')} '{inc.pattern}'"
        group = groups.get(id(w))
        if group is None:
            group = groups[id(w)] = WeightGroup(weight=w, layers=[])
            result.groups.append(group)
        group.layers.append(layer)

    # A weight is rewritten only if every user can switch to the factors; otherwise W would stay
    # and the factors would only add parameters.
    for group in result.groups:
        d = defs_by_weight[id(group.weight)]
        layer_nodes = {id(l.node) for l in group.layers}
        others = [n for n, _ in d.uses if n is None or id(n) not in layer_nodes]
        blocked = [l for l in group.layers if l.reason is not None]
        kinds = sorted({l.op_type for l in group.layers})
        per_node: dict[int, int] = {}
        for n, _ in d.uses:
            if n is not None:
                per_node[id(n)] = per_node.get(id(n), 0) + 1
        twice = [l for l in group.layers if per_node.get(id(l.node), 0) > 1]
        if twice:
            group.reason = f"weight is also another input of {twice[0].display_name} (e.g. its bias), which cannot use the factors"
        elif others:
            n = others[0]
            what = "a graph output" if n is None else f"{n.op_type} node '{n.name or '?'}'"
            group.reason = f"weight is also used by {what}, which cannot use the factors"
        elif any(l.is_conv for l in group.layers) and not all(l.is_conv for l in group.layers):
            # A Conv splits a reshaped view of the weight; a MatMul/Gemm needs the matrix itself.
            group.reason = f"weight is used by both {' and '.join(kinds)} nodes, which cannot share factors"
        elif blocked and len(blocked) < len(group.layers):
            group.reason = f"weight is shared with {blocked[0].display_name}, which is left alone ({blocked[0].reason})"
        elif blocked:
            group.reason = blocked[0].reason
        if group.reason is not None:
            for layer in group.layers:
                layer.reason = layer.reason or group.reason
    return result


def _walk(
    graph: onnx.GraphProto,
    outer: list[dict[str, _Def]],
    scope: str,
    wanted: set[str],
    result: Discovery,
    defs_by_weight: dict[int, _Def],
) -> None:
    local: dict[str, _Def] = {}
    chain = [local, *outer]
    inputs = {i.name for i in graph.input}
    for init in graph.initializer:
        w = Weight(name=init.name, graph=graph, tensor=init, is_graph_input=init.name in inputs)
        local[init.name] = d = _Def("initializer", graph, weight=w)
        defs_by_weight[id(w)] = d
    for sparse in graph.sparse_initializer:
        name = sparse.values.name
        w = Weight(name=name, graph=graph, tensor=None, problem="weight is a sparse initializer")
        local[name] = d = _Def("initializer", graph, weight=w)
        defs_by_weight[id(w)] = d
    for name in inputs:
        local.setdefault(name, _Def("input", graph))

    def resolve(name: str) -> _Def | None:
        for scope_defs in chain:
            if name in scope_defs:
                return scope_defs[name]
        return None

    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        display = node.name or f"{node.op_type}#{counts[node.op_type] - 1}"
        if scope:
            display = f"{scope}/{display}"
        for i, name in enumerate(node.input):
            if name:
                d = resolve(name)
                if d is not None:
                    d.uses.append((node, i))
        if node.op_type in wanted and node.domain in ("", "ai.onnx"):
            result.layers.append(_classify(node, graph, display, resolve))
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []
            for k, sub in enumerate(subs):
                tag = attr.name if len(subs) == 1 else f"{attr.name}[{k}]"
                _walk(sub, chain, f"{display}/{tag}", wanted, result, defs_by_weight)
        for out in node.output:
            if not out:
                continue
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                w = _constant_weight(node, graph)
                local[out] = d = _Def("constant", graph, node=node, weight=w)
                defs_by_weight[id(w)] = d
            else:
                local[out] = _Def("node", graph, node=node)
    for out in graph.output:
        d = resolve(out.name)
        if d is not None:
            d.uses.append((None, 0))


def _classify(node: onnx.NodeProto, graph: onnx.GraphProto, display: str, resolve) -> Layer:
    layer = Layer(node=node, graph=graph, display_name=display)
    if node.op_type == "ConvTranspose":
        d = resolve(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if d is not None and d.weight is not None:
            layer.weight, layer.weight_index = d.weight, 1
        layer.reason = "ConvTranspose is left alone: only Conv (group=1) is factorized"
        return layer
    if len(node.input) < 2 or not node.input[0] or not node.input[1]:
        layer.reason = "malformed node: fewer than two inputs"
        return layer
    consts: dict[int, _Def] = {}
    producers: dict[int, _Def | None] = {}
    for i in (0, 1):
        d = resolve(node.input[i])
        producers[i] = d
        if d is not None and d.weight is not None:
            consts[i] = d
    if len(consts) == 2:
        layer.reason = "both operands are constant (a constant-folding pass removes this node)"
        return layer
    if node.op_type in CONV_OPS and 1 not in consts:
        consts = {}  # a Conv's weight is input 1; a constant image with a computed kernel is no candidate
    if not consts:
        for i in ((1,) if node.op_type in CONV_OPS else (1, 0)):
            d = producers[i]
            if d is not None and d.kind == "node" and d.node is not None and d.node.op_type == "DequantizeLinear":
                layer.reason = "weight is quantized (DequantizeLinear output); factorize the float model before quantizing"
                return layer
        layer.reason = ("no constant weight: the kernel (input 1) is computed at run time" if node.op_type in CONV_OPS
                        else "no constant weight: both operands are computed at run time")
        return layer
    index = next(iter(consts))
    layer.weight = consts[index].weight
    layer.weight_index = index
    return layer


def _in_out(layer: Layer) -> tuple[int, int]:
    """``(in, out)`` features of a MatMul/Gemm layer's 2-D weight, from its operand slot and transposes."""
    s = layer.weight.shape
    node = layer.node
    if node.op_type == "Gemm":
        flipped = bool(_attr(node, "transB", 0)) if layer.weight_index == 1 else not _attr(node, "transA", 0)
    else:
        flipped = layer.weight_index == 0
    return (s[1], s[0]) if flipped else (s[0], s[1])


def _mark_factor_pairs(result: Discovery) -> None:
    """Name the reason when two chained constant products already form a low-rank pair.

    A model that was factorized before (by this pass, or exported from SVD training) holds
    ``(x @ A) @ B``, or a conv to ``r`` channels feeding a conv from ``r``, with a small inner
    dimension; re-running the pass should say so rather than
    report that each half 'saves nothing'.
    """
    by_output: dict[str, Layer] = {}
    for layer in result.layers:
        if layer.weight is not None and len(layer.node.output) == 1:
            by_output[layer.node.output[0]] = layer
    for second in result.layers:
        if second.weight is None or second.weight_index is None:
            continue
        act = second.node.input[1 - second.weight_index]
        first = by_output.get(act)
        if first is None or first.graph is not second.graph or first.weight is None:
            continue
        s1, s2 = first.weight.shape, second.weight.shape
        if first.is_conv and second.is_conv:
            # Conv(Conv(x, K1[r, C_in, ...]), K2[C_out, r, ...]) is the split this pass makes.
            if len(s1) < 3 or len(s2) != len(s1) or s2[1] != s1[0]:
                continue
            inner = s1[0]
            if inner >= int(np.prod(s1[1:])) or inner >= s2[0] * int(np.prod(s2[2:])):
                continue
        else:
            if len(s1) != 2 or len(s2) != 2 or first.is_conv or second.is_conv:
                continue
            (m, inner), (inner2, n) = _in_out(first), _in_out(second)
            # the dimension the two share is the inner rank; a pair only when it is below the
            # composed product's break-even (a plain chain of two wide layers is not a factorization)
            if inner != inner2 or inner * (m + n) >= m * n:
                continue
        reason = f"already low-rank: factor pair {first.display_name} -> {second.display_name} (inner rank {inner})"
        for layer in (first, second):
            if layer.reason is None:
                layer.reason = reason
