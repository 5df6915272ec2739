"""Find the layers the pass can factorize, and say why every other one is left alone.

A *candidate* is a MatMul, Gemm or Conv node (as selected by ``op_types``) in the main graph or
in any If/Loop/Scan body.  A MatMul/Gemm is factorizable when one operand is a constant 2-D
floating-point matrix; a Conv when its weight (input 1) is a constant floating-point tensor
``[C_out, C_in, k_1, ...]``, ``group`` is 1 and its attributes agree with the weight.  Constants
are initializers or outputs of Constant nodes, found by ONNX's lexical scoping (a body may use
tensors of the graphs around it).  Weights are grouped: a tensor used by several nodes is
factorized once and all of its users switch to the same two factors.

ConvTranspose nodes are listed when Conv is selected, so that the report says why they stay.

Every candidate that is left alone carries a :class:`~onnx_lowrank.plan.Skip`: a code, a
message, and this stage's name.  MatMul/Gemm nodes inside model-local functions are listed
with the code ``in_function``: a function body is shared by every call and has no
initializers of its own, so it is not rewritten.

Handles: each layer gets its ``index`` in graph order and each weight group its ``key``, the
handles that every later stage keys its results by.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto

from onnx_lowrank import io
from onnx_lowrank.errors import option
from onnx_lowrank.pipeline import Context, StageResult, Step
from onnx_lowrank.plan import Skip, SkipCode

__all__ = ["Weight", "Layer", "WeightGroup", "Discovery", "ConvSpec", "conv_spec", "discover", "Discover", "FLOAT_TYPES"]

log = logging.getLogger(__name__)

STAGE = "discover"


def _skip(code: SkipCode, message: str) -> Skip:
    return Skip(code, message, STAGE)

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
    problem: Skip | None = None  # why it cannot be read as a dense tensor
    uses: list[tuple[int | None, int]] = field(default_factory=list)  # (node number or None for a graph output, input slot)
    no: int = -1  # the walk's number for this definition
    scope: str = ""  # where it is defined: "" for the main graph, else the path of its If/Loop/Scan body

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensor.dims) if self.tensor is not None else ()

    @property
    def dtype_name(self) -> str:
        return TensorProto.DataType.Name(self.tensor.data_type) if self.tensor is not None else "?"


@dataclass(eq=False)
class Layer:
    """One MatMul/Gemm/Conv node and what discovery decided about it.

    Attributes:
        index: The node's position among the candidates, in graph order (its handle).
        weight_index: Which input holds the weight: 1 = ``x @ W``, 0 = ``W @ x``.
        skip: Why the node is left alone, when discovery already knows.
        conv: A Conv's validated geometry.
    """

    node: onnx.NodeProto
    graph: onnx.GraphProto
    display_name: str
    weight: Weight | None = None
    weight_index: int | None = None
    skip: Skip | None = None
    conv: ConvSpec | None = None
    index: int = -1
    node_no: int = -1  # the walk's number for the node
    scope: str = ""  # "" for the main graph, else the path of its If/Loop/Scan body or function
    holders: tuple[str, ...] = ()  # the op types of the nodes that hold its graph, outermost first ("If", "Loop", ...)
    outers: tuple[onnx.GraphProto, ...] = ()  # the graphs around its graph, outermost first (whose names it sees)
    behind: Weight | None = None  # a constant that reaches the node only through layout operators (not folded)
    behind_slot: int = -1  # (the input it reaches)

    @property
    def in_if_branches(self) -> bool:
        """In the main graph, or in If branches alone (no Loop/Scan body, no function, around it)."""
        return not self.scope or (bool(self.holders) and all(h == "If" for h in self.holders))

    @property
    def reason(self) -> str | None:
        return self.skip.message if self.skip is not None else None

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


def conv_spec(node: onnx.NodeProto, w_shape: tuple[int, ...]) -> tuple[ConvSpec | None, Skip | None]:
    """Read a Conv node's attributes and check them against its weight's shape.

    Returns:
        ``(spec, skip)``: the spec when the attributes are well-formed (also for a grouped
        conv, whose MACs the report still counts), and why the node is left alone, if it is.
    """
    spec, problem = _conv_spec(node, w_shape)
    if problem is None:
        return spec, None
    code = (SkipCode.DEPTHWISE_CONV if problem.startswith("depthwise") else SkipCode.GROUPED_CONV if problem.startswith("grouped")
            else SkipCode.NOT_A_MATRIX if problem.startswith("Conv weight is") else SkipCode.MALFORMED_CONV)
    return spec, _skip(code, problem)


def _conv_spec(node: onnx.NodeProto, w_shape: tuple[int, ...]) -> tuple[ConvSpec | None, str | None]:
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
    """A weight and every candidate node that uses it.  ``key`` is its handle."""

    weight: Weight
    layers: list[Layer]
    skip: Skip | None = None
    key: int = -1

    @property
    def reason(self) -> str | None:
        return self.skip.message if self.skip is not None else None


@dataclass
class Discovery(StageResult):
    """What discovery found, in graph order."""

    layers: list[Layer] = field(default_factory=list)
    groups: list[WeightGroup] = field(default_factory=list)
    recurrent: list[tuple[str, str, int]] = field(default_factory=list)  # (node, op type, constant weight parameters)

    def report_sections(self) -> dict[str, dict]:
        """Recurrent nodes (LSTM, GRU, RNN) hold weights the pass leaves as they are: said, not hidden."""
        if not self.recurrent:
            return {}
        return {"recurrent": {"nodes": [{"node": n, "op_type": op, "params": p} for n, op, p in self.recurrent]}}

    def group(self, key: int) -> WeightGroup:
        return self.groups[key]

    @property
    def candidates(self) -> list[WeightGroup]:
        """The groups nothing has ruled out."""
        return [g for g in self.groups if g.skip is None]


_FOLD_HINT = "; fold constants first (onnxsim, or an onnxruntime session with optimized_model_filepath), then compress"
#: The same advice where this tool's own fold stage declined for a reason another folder may not have.
FOLD_ELSEWHERE_HINT = _FOLD_HINT.replace("first", "elsewhere if that suits", 1)

#: Recurrent operators: their weights are not factorized (the report lists them).
_RECURRENT = frozenset({"LSTM", "GRU", "RNN"})

#: Operators an exporter may put between a weight and its product, which constant folding removes.
_FOLDABLE = frozenset({"Transpose", "Cast", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten"})


@dataclass(eq=False)
class _Def:
    kind: str  # "initializer", "constant", "input", "node"
    graph: onnx.GraphProto
    node: onnx.NodeProto | None = None
    weight: Weight | None = None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _constant_weight(node: onnx.NodeProto, graph: onnx.GraphProto, make) -> Weight:
    name = node.output[0]
    for a in node.attribute:
        if a.name == "value":
            return make(name=name, graph=graph, tensor=a.t, constant_node=node)
        if a.name == "sparse_value":
            return make(name=name, graph=graph, tensor=None, constant_node=node,
                        problem=_skip(SkipCode.SPARSE_WEIGHT, "weight is a sparse constant"))
    return make(name=name, graph=graph, tensor=None, constant_node=node,
                problem=_skip(SkipCode.NOT_A_MATRIX, "weight is a scalar or 1-D constant"))


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
    declined: Mapping[str, str] | None = None,
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
        declined: Why the fold stage left a chain of layout operators as it is, by the value the
            product reads (its row then says so).
    """
    wanted = {t for t in op_types if t in MATRIX_OPS or t in CONV_OPS}
    if "Conv" in wanted:
        wanted.add("ConvTranspose")
    inc, exc = _compile(include), _compile(exclude)
    result = Discovery()
    walk = _Walk(wanted, result)
    walk.graph(model.graph, [], "")
    for f in model.functions:
        walk.function(f)
    for k, layer in enumerate(result.layers):
        layer.index = k
    # First, so that a re-run names the pair even for a factor under --min-params.
    _mark_factor_pairs(result)

    for layer in result.layers:  # a weight the fold stage left behind its layout operators: say why
        if layer.behind is not None and layer.skip is not None and layer.skip.code is SkipCode.NO_CONSTANT_WEIGHT:
            filtered = _filter_skip(layer, layer.behind, min_params, inc, exc)
            why = (declined or {}).get(layer.node.input[layer.behind_slot])
            if filtered is not None:
                layer.skip = filtered
            elif why:
                layer.skip = _skip(SkipCode.NO_CONSTANT_WEIGHT, f"{layer.skip.message.removesuffix(_FOLD_HINT)}, not folded: {why}")

    groups: dict[int, WeightGroup] = {}  # by the weight's definition number
    for layer in result.layers:
        if layer.weight is None or layer.skip is not None:
            continue
        w = layer.weight
        layer.skip = _weight_skip(layer, min_params, allow_input_weights, inc, exc)
        group = groups.get(w.no)
        if group is None:
            group = groups[w.no] = WeightGroup(weight=w, layers=[], key=len(result.groups))
            result.groups.append(group)
        group.layers.append(layer)

    # A weight is rewritten only if every user can switch to the factors; otherwise W would stay
    # and the factors would only add parameters.
    for group in result.groups:
        group.skip = _group_skip(group, walk.node_of)
        if group.skip is not None:
            for layer in group.layers:
                layer.skip = layer.skip or group.skip
    return result


def _weight_skip(layer: Layer, min_params: int, allow_input_weights: bool, inc: re.Pattern | None,
                 exc: re.Pattern | None) -> Skip | None:
    """Why the weight of ``layer`` cannot or should not be factorized, judged on its own."""
    w = layer.weight
    if w.problem is not None:
        return w.problem
    if layer.is_conv:
        layer.conv, skip = conv_spec(layer.node, w.shape)
        if skip is not None:
            return skip
    elif len(w.shape) != 2:
        return _skip(SkipCode.NOT_A_MATRIX, f"weight is {len(w.shape)}-D {list(w.shape)}; only 2-D matrices are factorized")
    if w.tensor.data_type not in FLOAT_TYPES:
        return _skip(SkipCode.NOT_FLOAT, f"weight is {w.dtype_name}, not floating point (quantized and integer weights are left alone)")
    if w.is_graph_input and not allow_input_weights:
        return _skip(SkipCode.GRAPH_INPUT, "weight is also a graph input, so it can be overridden at run time; "
                     f"pass {option('allow_input_weights')} if it never is")
    return _filter_skip(layer, w, min_params, inc, exc)


def _filter_skip(layer: Layer, w: Weight, min_params: int, inc: re.Pattern | None, exc: re.Pattern | None) -> Skip | None:
    """Whether --min-params, --exclude or --include leaves the layer of weight ``w`` alone."""
    size = int(np.prod(w.shape))
    if size < min_params:
        return _skip(SkipCode.TOO_SMALL, f"{size:,} parameters, fewer than {option('min_params')} {min_params:,}")
    if exc is not None and (exc.search(layer.display_name) or exc.search(w.name)):
        return _skip(SkipCode.EXCLUDED, f"excluded by {option('exclude')} '{exc.pattern}'")
    if inc is not None and not (inc.search(layer.display_name) or inc.search(w.name)):
        return _skip(SkipCode.NOT_INCLUDED, f"not matched by {option('include')} '{inc.pattern}'")
    return None


def _group_skip(group: WeightGroup, node_of: list[onnx.NodeProto]) -> Skip | None:
    """Why a weight cannot be rewritten although some of its users could use the factors."""
    mine = {layer.node_no for layer in group.layers}
    uses = group.weight.uses
    others = [n for n, _ in uses if n is None or n not in mine]
    per_node: dict[int, int] = {}
    for n, _ in uses:
        if n is not None:
            per_node[n] = per_node.get(n, 0) + 1
    twice = [l for l in group.layers if per_node.get(l.node_no, 0) > 1]
    blocked = [l for l in group.layers if l.skip is not None]
    if twice:
        return _skip(SkipCode.SHARED_AS_OTHER_INPUT,
                     f"weight is also another input of {twice[0].display_name} (e.g. its bias), which cannot use the factors")
    if others:
        n = others[0]
        what = "a graph output" if n is None else f"{node_of[n].op_type} node '{node_of[n].name or '?'}'"
        return _skip(SkipCode.SHARED_WITH_OTHER_USE, f"weight is also used by {what}, which cannot use the factors")
    if any(l.is_conv for l in group.layers) and not all(l.is_conv for l in group.layers):
        # A Conv splits a reshaped view of the weight; a MatMul/Gemm needs the matrix itself.
        kinds = sorted({l.op_type for l in group.layers})
        return _skip(SkipCode.SHARED_ACROSS_OP_TYPES, f"weight is used by both {' and '.join(kinds)} nodes, which cannot share factors")
    if blocked and len(blocked) < len(group.layers):
        return _skip(SkipCode.SHARED_WITH_SKIPPED,
                     f"weight is shared with {blocked[0].display_name}, which is left alone ({blocked[0].reason})")
    if blocked:
        return blocked[0].skip
    return None


class _Walk:
    """One pass over the graphs: every definition, every use, every candidate node, in order.

    Nodes are numbered as they are visited (:attr:`node_of` maps a number back to its node);
    a weight records its uses by those numbers, so no map is keyed by object identity.
    """

    def __init__(self, wanted: set[str], result: Discovery):
        self.wanted = wanted
        self.result = result
        self.node_of: list[onnx.NodeProto] = []
        self.weights = 0
        self.holders: list[str] = []  # (while a body is walked: the nodes around it, and their graphs)
        self.outers: list[onnx.GraphProto] = []

    def _number(self, node: onnx.NodeProto) -> int:
        self.node_of.append(node)
        return len(self.node_of) - 1

    def _weight(self, **fields) -> Weight:
        self.weights += 1
        return Weight(no=self.weights, **fields)

    def graph(self, graph: onnx.GraphProto, outer: list[dict[str, _Def]], scope: str) -> None:
        local: dict[str, _Def] = {}
        chain = [local, *outer]
        inputs = {i.name for i in graph.input}
        for init in graph.initializer:
            local[init.name] = _Def("initializer", graph, weight=self._weight(name=init.name, graph=graph, tensor=init,
                                                                              is_graph_input=init.name in inputs, scope=scope))
        for sparse in graph.sparse_initializer:
            name = sparse.values.name
            local[name] = _Def("initializer", graph, weight=self._weight(
                name=name, graph=graph, tensor=None, problem=_skip(SkipCode.SPARSE_WEIGHT, "weight is a sparse initializer"),
                scope=scope))
        for name in inputs:
            local.setdefault(name, _Def("input", graph))
        self._nodes(graph.node, graph, chain, local, scope)
        for out in graph.output:
            d = _resolve(chain, out.name)
            if d is not None and d.weight is not None:
                d.weight.uses.append((None, 0))

    def function(self, f: onnx.FunctionProto) -> None:
        """A model-local function: its MatMul/Gemm/Conv nodes are listed and left alone."""
        scope = f"{f.domain}.{f.name}" if f.domain else f.name
        counts: dict[str, int] = {}
        for node in f.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            if node.op_type in self.wanted and node.domain in ("", "ai.onnx"):
                display = f"function {scope}/{node.name or f'{node.op_type}#{counts[node.op_type] - 1}'}"
                layer = Layer(node=node, graph=f, display_name=display, node_no=self._number(node), scope=f"function {scope}")
                layer.skip = _skip(SkipCode.IN_FUNCTION, f"inside model-local function '{scope}', whose body every call "
                                   "shares and which holds no initializers; functions are not rewritten")
                self.result.layers.append(layer)

    def _nodes(self, nodes, graph, chain, local, scope) -> None:
        counts: dict[str, int] = {}
        for node in nodes:
            no = self._number(node)
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            display = node.name or f"{node.op_type}#{counts[node.op_type] - 1}"
            if scope:
                display = f"{scope}/{display}"
            for i, name in enumerate(node.input):
                d = _resolve(chain, name) if name else None
                if d is not None and d.weight is not None:
                    d.weight.uses.append((no, i))
            if node.op_type in _RECURRENT and node.domain in ("", "ai.onnx"):
                held = [_resolve(chain, x) for x in node.input[1:4] if x]  # W, R, B
                self.result.recurrent.append((display, node.op_type, sum(int(np.prod(d.weight.shape)) for d in held
                                                                         if d is not None and d.weight is not None)))
            if node.op_type in self.wanted and node.domain in ("", "ai.onnx"):
                layer = _classify(node, graph, display, lambda n: _resolve(chain, n))
                layer.node_no, layer.scope = no, scope
                layer.holders, layer.outers = tuple(self.holders), tuple(self.outers)
                self.result.layers.append(layer)
            for attr in node.attribute:
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []
                for k, sub in enumerate(subs):
                    tag = attr.name if len(subs) == 1 else f"{attr.name}[{k}]"
                    self.holders.append(node.op_type)
                    self.outers.append(graph)
                    try:
                        self.graph(sub, chain, f"{display}/{tag}")
                    finally:
                        self.holders.pop()
                        self.outers.pop()
            for out in node.output:
                if not out:
                    continue
                if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                    local[out] = _Def("constant", graph, node=node,
                                      weight=_constant_weight(node, graph, lambda **f: self._weight(scope=scope, **f)))
                else:
                    local[out] = _Def("node", graph, node=node)


def _resolve(chain: list[dict[str, _Def]], name: str) -> _Def | None:
    for scope_defs in chain:
        if name in scope_defs:
            return scope_defs[name]
    return None


def _classify(node: onnx.NodeProto, graph: onnx.GraphProto, display: str, resolve) -> Layer:
    layer = Layer(node=node, graph=graph, display_name=display)
    if node.op_type == "ConvTranspose":
        d = resolve(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if d is not None and d.weight is not None:
            layer.weight, layer.weight_index = d.weight, 1
        layer.skip = _skip(SkipCode.CONV_TRANSPOSE, "ConvTranspose is left alone: only Conv (group=1) is factorized")
        return layer
    if not node.output or not node.output[0]:
        layer.skip = _skip(SkipCode.MALFORMED_NODE, "malformed node: no output")
        return layer
    if len(node.input) < 2 or not node.input[0] or not node.input[1]:
        layer.skip = _skip(SkipCode.MALFORMED_NODE, "malformed node: fewer than two inputs")
        return layer
    consts: dict[int, _Def] = {}
    producers: dict[int, _Def | None] = {}
    for i in (0, 1):
        d = resolve(node.input[i])
        producers[i] = d
        if d is not None and d.weight is not None:
            consts[i] = d
    if len(consts) == 2:
        layer.skip = _skip(SkipCode.CONSTANT_OPERANDS, "both operands are constant (a constant-folding pass removes this node)")
        return layer
    if node.op_type in CONV_OPS and 1 not in consts:
        consts = {}  # a Conv's weight is input 1; a constant image with a computed kernel is no candidate
    if not consts:
        for i in ((1,) if node.op_type in CONV_OPS else (1, 0)):
            d = producers[i]
            if d is not None and d.kind == "node" and d.node is not None and d.node.op_type == "DequantizeLinear":
                layer.skip = _skip(SkipCode.QUANTIZED_WEIGHT, "weight is quantized (DequantizeLinear output); "
                                                              "factorize the float model before quantizing")
                return layer
        for i in ((1,) if node.op_type in CONV_OPS else (1, 0)):
            d = producers[i]
            if d is not None and d.kind == "node" and d.node is not None and d.node.op_type in _FOLDABLE and d.node.input:
                src, seen = resolve(d.node.input[0]), {d.node.input[0]}
                while src is not None and src.weight is None and src.kind == "node" and src.node is not None:
                    if src.node.op_type not in _FOLDABLE or not src.node.input or src.node.input[0] in seen:
                        break  # (back through a chain of them: Unsqueeze then Reshape, ...)
                    seen.add(src.node.input[0])
                    src = resolve(src.node.input[0])
                if src is not None and src.weight is not None:
                    layer.behind, layer.behind_slot = src.weight, i
                    made = d.node.name or d.node.output[0]
                    layer.skip = _skip(SkipCode.NO_CONSTANT_WEIGHT, f"no constant weight: input {i} is {d.node.op_type} "
                                       f"'{made}' of the constant '{src.weight.name}'" + _FOLD_HINT)
                    return layer
        layer.skip = _skip(SkipCode.NO_CONSTANT_WEIGHT, "no constant weight: the kernel (input 1) is computed at run time"
                           if node.op_type in CONV_OPS else "no constant weight: both operands are computed at run time")
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
        if first is None or first.scope != second.scope or first.weight is None:
            continue
        s1, s2 = first.weight.shape, second.weight.shape
        if first.is_conv and second.is_conv:
            # Conv(Conv(x, K1[r, C_in, ...]), K2[C_out, r, ...]) in the shapes of the splits this
            # pass makes: channel-wise (K2 is 1 x 1) or spatial-wise (K1 is kh x 1, K2 1 x kw), with
            # fewer weights than the conv they compose.  Two full k x k convs in a row (a folded
            # BatchNorm between them, say) are two layers, not a pair.
            if len(s1) < 3 or len(s2) != len(s1) or s2[1] != s1[0]:
                continue
            inner, k1, k2 = s1[0], s1[2:], s2[2:]
            channel = all(d == 1 for d in k2)
            spatial = len(k1) == 2 and k1[1] == 1 and k2[0] == 1
            if not (channel or spatial):
                continue
            composed = s2[0] * s1[1] * int(np.prod(k1 if channel else (k1[0], k2[1])))
            if inner >= int(np.prod(s1[1:])) or inner >= s2[0] * int(np.prod(k2)) or \
                    int(np.prod(s1)) + int(np.prod(s2)) >= composed:
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
            if layer.skip is None:
                layer.skip = _skip(SkipCode.ALREADY_LOW_RANK, reason)


class Discover(Step):
    """Find the candidate layers and group them by weight (reads the model, writes nothing)."""

    name = STAGE

    def run(self, ctx: Context) -> Discovery:
        cfg = ctx.config
        from .fold import Folded

        folded = ctx.get(Folded)
        found = discover(ctx.model, op_types=cfg.op_types, include=cfg.include, exclude=cfg.exclude, min_params=cfg.min_params,
                         allow_input_weights=cfg.allow_input_weights, declined=folded.declined if folded else None)
        if not found.layers:
            from .quantize import INTEGER_CONVS, INTEGER_MATMULS

            products = {*INTEGER_MATMULS, *INTEGER_CONVS, "MatMulNBits", "QGemm"}  # (weights quantized already)
            quantized: dict[str, int] = {}
            plain = False  # (a float product the filters left out: the filters, not quantization, explain it)
            for graph in io.iter_graphs(ctx.model.graph):
                for node in graph.node:
                    if node.op_type in products:
                        quantized[node.op_type] = quantized.get(node.op_type, 0) + 1
                    plain = plain or node.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose")
            if quantized and not plain:
                log.warning("no float MatMul/Gemm/Conv node to factorize: the model's products are quantized already (%s)",
                            ", ".join(f"{op} {n}" for op, n in sorted(quantized.items())))
        return found

