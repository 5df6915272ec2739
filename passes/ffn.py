"""Find feed-forward blocks: two constant projections with an elementwise activation between.

A block is, in the main graph::

    u = x @ W1 (+ b1)          MatMul(x, W1) [+ Add(., b1)], or Gemm(x, W1[, b1]) with transA=0
    h = act(u)                 nodes that only combine u's values elementwise with scalars
    y = h @ W2 (+ b2)          MatMul(h, W2) [+ Add(., b2)], or Gemm(h, W2[, b2]) with transA=0

with ``f`` hidden neurons (the last axis of ``u`` and ``h``; ``W1`` may be stored transposed for a
Gemm with ``transB=1``, ``W2`` likewise).  The activation is any chain of the elementwise
operators in :data:`ELEMENTWISE` whose other operands are single values (``Relu``, ``Gelu``, the
``Erf`` form ``0.5 x (1 + erf(x / sqrt 2))``, the ``Tanh`` approximation, ``x * Sigmoid(x)``,
...), so that neuron ``j`` of ``h`` depends on neuron ``j`` of ``u`` alone and dropping it from
``W1``, ``b1`` and ``W2`` is exact.  Every tensor between the two projections must be used by
the block only (not a graph output, nor read by another node or a subgraph).

A gated block (LLaMA's ``SiLU(x Wg) * (x Wu)``, GeGLU) has a second first projection whose
output the activation joins elementwise (:attr:`FfnBlock.gate`): neuron ``j`` then depends on
column ``j`` of both, which lose the same columns.

Exporters may also flatten the rows around each projection (GPT-2's ``Conv1D``: a 2-D Gemm, a
``Reshape`` to 3-D for the activation, a ``Reshape`` back to 2-D).  A ``Reshape`` inside a block
keeps the neurons on the last axis when its target ends with the width: either a constant ``f``
(the whole target, or the last input of the ``Concat`` that builds it), which the rewrite
replaces by the new width in a tensor of its own (:class:`ShapeEdit`), or the block's own width
read at run time (``Shape`` of a tensor inside the block, its last entry picked by ``Gather``/
``Slice`` and put last by ``Concat``), which follows by itself.  A ``Shape`` of a tensor inside the
block may be read for anything else only through entries that narrowing leaves alone (the batch
and sequence sizes that shape the output of ``W2``, say).

Every pair of projections joined by an elementwise path that is not a block says why
(:attr:`Blocks.skipped`); those are the blocks a user would expect to be found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_lowrank import io
from onnx_lowrank.errors import ModelError

from .discover import Discovery, Layer, WeightGroup

__all__ = ["ELEMENTWISE", "Bias", "FfnBlock", "Blocks", "ShapeEdit", "find_blocks"]

#: Operators an activation chain may hold: each output element depends on the same element of
#: its inputs (other operands: single values).
ELEMENTWISE = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "FastGelu", "QuickGelu", "Erf", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Mul", "Add", "Sub", "Div", "Pow", "Sqrt",
    "Exp", "Log", "Abs", "Neg", "Reciprocal", "Clip", "Identity", "Cast", "Min", "Max", "Sin", "Cos",
})


#: Elementwise operators that keep a map affine; a chain of these alone is no activation (a
#: residual path, a scaled product), so it makes no block and no near miss.
AFFINE = frozenset({"Add", "Sub", "Mul", "Div", "Identity", "Cast", "Neg"})


@dataclass(frozen=True)
class Bias:
    """A bias over the neurons (or outputs) of a projection.

    Attributes:
        name: The tensor's name.
        value: Its values, flattened (shape ``(size,)``).
        shape: Its stored shape (``(size,)``, ``(1, size)``, ...).
        dtype: Its ONNX element type.
        holder: The initializer, or the Constant node whose value it is.
    """

    name: str
    value: np.ndarray
    shape: tuple[int, ...]
    dtype: int
    holder: onnx.TensorProto | onnx.NodeProto


@dataclass(frozen=True)
class ShapeEdit:
    """A constant that holds a block's width as the last entry of a ``Reshape`` target inside the
    block; the rewrite points the target at a copy that holds the new width instead.

    Attributes:
        reshape: The Reshape.
        name: The constant's name: the Reshape's target itself, or the last input of ``concat``.
        value: Its values (1-D, integer; the last entry is the width).
        concat: The Concat that builds the target from ``name`` and other pieces, if any.
    """

    reshape: onnx.NodeProto
    name: str
    value: np.ndarray
    concat: onnx.NodeProto | None = None


@dataclass(frozen=True)
class FusedCut:
    """A fused first projection (a gate and an up projection in one weight, as Phi-3 writes
    ``gate_up_proj``) whose ``2 f`` outputs are cut into two halves before the activation: neuron
    ``j`` is columns ``j`` and ``f + j``.  The rewrite cuts at the new width.

    Attributes:
        nodes: The Split, or the two Slices (the first half's first).
        sizes: A Split's constant ``split`` input (``[f, f]``), or ``None`` (equal halves by
            ``num_outputs`` or by default; or the ``split`` attribute of opsets before 13).
    """

    nodes: tuple[onnx.NodeProto, ...]
    sizes: str | None = None
    follows: bool = False  # two Slices whose bounds are computed from the projection's own width (torch.chunk)


#: Integer arithmetic on shape entries that :func:`_evaluate` follows.
_ARITH = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.floor_divide}


def _evaluate(g: _Graph, name: str, start: str, shape: list[int], depth: int = 0) -> np.ndarray | None:
    """The integer values of ``name`` where ``Shape(start)`` is ``shape`` (``None``: not computed
    from constants and that shape alone by shape operators and integer arithmetic)."""
    known = _ints(g, name)
    if known is not None:
        return np.asarray(known, np.int64)
    node = g.producer.get(name)
    if node is None or depth > 24 or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Shape":
        if node.input[0] != start:
            return None
        lo, hi = int(_attr(node, "start", 0)), _attr(node, "end", None)
        return np.asarray(shape[slice(lo, None if hi is None else int(hi))], np.int64)
    args = [_evaluate(g, i, start, shape, depth + 1) if i else None for i in node.input]
    first = args[0] if args else None
    if node.op_type in _ARITH and len(args) == 2 and first is not None and args[1] is not None:
        return _ARITH[node.op_type](first, args[1])
    if node.op_type in ("Squeeze", "Unsqueeze", "Cast", "Identity") and first is not None:
        return first.reshape(-1)
    if node.op_type == "Concat" and all(a is not None for a in args):
        return np.concatenate([a.reshape(-1) for a in args])
    if node.op_type == "Gather" and first is not None and len(args) > 1 and args[1] is not None \
            and int(_attr(node, "axis", 0)) == 0 and all(-len(first) <= i < len(first) for i in args[1].reshape(-1)):
        return first[args[1].reshape(-1)]
    return None


def _shape_reads_only(g: _Graph, start: str, into: set[str]) -> bool:
    """Whether every ``Shape`` of ``start`` reaches nothing but shape arithmetic ending in the
    nodes ``into`` (by :func:`_key`)."""
    todo = [o for r in g.readers.get(start, []) if r.op_type == "Shape" for o in r.output]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in g.outputs or name in g.captured:
            return False
        for reader in g.readers.get(name, []):
            if _key(reader) in into:
                continue
            if reader.op_type not in (*_ARITH, "Squeeze", "Unsqueeze", "Cast", "Identity", "Concat", "Gather"):
                return False
            todo += list(reader.output)
    return True


@dataclass
class FfnBlock:
    """One feed-forward block (module docstring).

    Attributes:
        up, down: The weight groups of ``W1`` and ``W2`` (one node each).
        up_bias, down_bias: ``b1`` and ``b2`` when the block has them.
        hidden: ``f``, the number of neurons.
        up_t, down_t: Whether ``W1`` / ``W2`` are stored transposed (a Gemm's ``transB``):
            neuron ``j`` is then row ``j`` of ``W1`` / column ``j`` of ``W2``.
        activation: The activation's operators, in graph order.
        between: The tensors between the two projections (their shapes change with the width).
        reshapes: The Reshape targets inside the block that hold the width as a constant.
        follows: The Reshapes inside the block whose target reads the width at run time.
        gate, gate_bias, gate_t, gate_shape: A gated block's other first projection (LLaMA's
            ``SiLU(x Wg) * (x Wu)``, GeGLU: the activation joins the outputs of two projections
            elementwise); narrowed with ``up``, column for column.
        fused: A fused gate and up projection's cut (:class:`FusedCut`); ``up`` then has
            ``2 * hidden`` outputs.
        graph: The graph that holds this instance of the block (the main graph, or an If branch).
        display: The first projection's node, as reports name it.
        twins: The block's other instances: the same weights read in other If branches (a
            merged decoder's two branches), narrowed together with this one.
    """

    up: WeightGroup
    down: WeightGroup
    up_bias: Bias | None
    down_bias: Bias | None
    hidden: int
    up_t: bool
    down_t: bool
    activation: tuple[str, ...]
    between: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())  # W1's and W2's, as found
    reshapes: tuple[ShapeEdit, ...] = ()
    follows: tuple[str, ...] = ()
    gate: WeightGroup | None = None
    gate_bias: Bias | None = None
    gate_t: bool = False
    gate_shape: tuple[int, ...] = ()
    fused: FusedCut | None = None
    graph: onnx.GraphProto | None = None
    display: str = ""
    twins: tuple["FfnBlock", ...] = ()

    def columns(self, keep) -> np.ndarray:
        """The first projections' output columns (and bias entries) of the neurons ``keep``."""
        keep = np.asarray(keep)
        return np.concatenate([keep, keep + self.hidden]) if self.fused is not None else keep

    @property
    def name(self) -> str:
        return self.display or self.up.layers[0].display_name

    @property
    def instances(self) -> tuple["FfnBlock", ...]:
        """This instance and its twins."""
        return (self,) + self.twins

    @property
    def down_alpha(self) -> float:
        """The second projection's ``alpha`` (a Gemm's; 1 for a MatMul): what its product is scaled by."""
        node = self.down.layers[0].node
        return float(_attr(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0

    @property
    def firsts(self) -> list[tuple[WeightGroup, Bias | None, bool]]:
        """The projections into the neurons (``up``, and ``gate`` when gated): group, bias, transposed."""
        out = [(self.up, self.up_bias, self.up_t)]
        if self.gate is not None:
            out.append((self.gate, self.gate_bias, self.gate_t))
        return out

    @property
    def keys(self) -> tuple[int, ...]:
        """The group keys of every projection of the block."""
        return (self.up.key, self.down.key) + ((self.gate.key,) if self.gate is not None else ())

    def found_shape(self, key: int) -> tuple[int, ...]:
        """The shape of the block's projection ``key`` as found (before narrowing)."""
        if key == self.down.key:
            return self.shapes[1]
        return self.gate_shape if self.gate is not None and key == self.gate.key else self.shapes[0]

    @property
    def dense_params(self) -> int:
        """Weight parameters of the block's projections before narrowing."""
        return sum(int(np.prod(self.found_shape(k))) for k in self.keys)

    def w2_rows(self, w2: np.ndarray) -> np.ndarray:
        """``W2`` with one row per neuron."""
        return w2.T if self.down_t else w2


@dataclass
class Blocks:
    """The blocks found, and why each near miss is not one (``(up node, reason)``)."""

    blocks: list[FfnBlock] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _attr(node: onnx.NodeProto, name: str, default=0):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def own_constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto | onnx.NodeProto]:
    """A graph's own constants by name: initializers and Constant nodes (a graph input with a
    default initializer is no constant)."""
    own: dict[str, onnx.TensorProto | onnx.NodeProto] = {t.name: t for t in graph.initializer}
    own.update({n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output})
    for i in graph.input:
        own.pop(i.name, None)
    return own


class _Graph:
    """Who produces and who reads each tensor of a graph, and the constants it sees (its own, and
    ``outer``: those of the graphs around an If branch)."""

    def __init__(self, graph: onnx.GraphProto, data: io.DataFiles | None = None,
                 outer: Mapping[str, onnx.TensorProto | onnx.NodeProto] | None = None):
        self.graph, self.data = graph, data
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.constants: dict[str, onnx.TensorProto | onnx.NodeProto] = {**(outer or {}), **own_constants(graph)}
        self.outputs = {o.name for o in graph.output}
        self.captured: set[str] = set()  # names that subgraphs read from here
        for node in graph.node:
            for name in node.input:
                if name:
                    self.readers.setdefault(name, []).append(node)
            for name in node.output:
                self.producer[name] = node
            for a in node.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    self.captured |= _names_read(sub)

    def value(self, name: str) -> tuple[np.ndarray, onnx.TensorProto, onnx.TensorProto | onnx.NodeProto] | None:
        """A constant's values, its tensor and its holder (``None``: not a constant, or unreadable)."""
        holder = self.constants.get(name)
        if holder is None:
            return None
        tensor = holder if isinstance(holder, onnx.TensorProto) else next(
            (a.t for a in holder.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if tensor is None and isinstance(holder, onnx.NodeProto):  # Constant(value_ints=...) and its kin
            kinds = {"value_ints": np.int64, "value_int": np.int64, "value_floats": np.float32, "value_float": np.float32}
            a = next((a for a in holder.attribute if a.name in kinds), None)
            if a is None:
                return None
            value = np.asarray(helper.get_attribute_value(a), dtype=kinds[a.name])
            return value, numpy_helper.from_array(value, name), holder
        if tensor is None:
            return None
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            if self.data is None:
                return None
            try:
                return self.data.read(tensor), tensor, holder
            except (OSError, ModelError):
                return None
        try:
            return numpy_helper.to_array(tensor), tensor, holder
        except Exception:  # a malformed constant is no bias
            return None

    def private(self, name: str, users: int = 1) -> bool:
        """Whether ``name`` is read by exactly ``users`` nodes here and nothing else."""
        return (name not in self.outputs and name not in self.captured
                and len(self.readers.get(name, [])) == users)


def _names_read(graph: onnx.GraphProto) -> set[str]:
    out: set[str] = set()
    for node in graph.node:
        out |= {n for n in node.input if n}
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                out |= _names_read(sub)
    return out


def _copied_constant(g: _Graph, name: str) -> bool:
    """Whether ``name`` is a constant passed through Identity, Cast or a layout operator (an
    exporter's shared copy of equal tensors)."""
    made = g.producer.get(name)
    return made is not None and made.op_type in LAYOUT | {"Identity", "Cast"} and bool(made.input) and made.input[0] in g.constants


def _bias(g: _Graph, name: str, size: int) -> Bias | str:
    got = g.value(name)
    if got is None:
        made = g.producer.get(name)
        if made is not None and made.op_type in LAYOUT | {"Identity", "Cast"}:  # (an exporter's shared copy of a constant)
            return (f"its bias '{name}' is made by {_label(made)} from '{made.input[0] if made.input else ''}', a copy of a "
                    "tensor other layers may share (exporters share equal tensors, such as untrained biases)")
        return f"its bias '{name}' cannot be read as a constant"
    value, tensor, holder = got
    if isinstance(holder, onnx.NodeProto) and not any(a.name == "value" for a in holder.attribute):
        return f"its bias '{name}' is a Constant without a tensor value (value_floats)"
    if value.size != size or (value.ndim and value.shape[-1] != size):
        return f"its bias '{name}' has shape {list(value.shape)}, not one value per neuron ({size})"
    if not g.private(name):
        return f"its bias '{name}' is shared with other nodes"
    return Bias(name, value.reshape(-1), tuple(value.shape), tensor.data_type, holder)


def _projection(layer: Layer) -> tuple[bool, int, str | None]:
    """``(transposed, neurons, problem)`` of a projection ``x @ W`` (MatMul) or ``Gemm(x, W)``."""
    node, shape = layer.node, layer.weight.shape
    if layer.weight_index != 1:
        return False, 0, "its weight is the first operand (W @ x)"
    if node.op_type == "Gemm":
        if _attr(node, "transA"):
            return False, 0, "a Gemm with transA=1"
        t = bool(_attr(node, "transB"))
        return t, shape[0] if t else shape[1], None
    return False, shape[1], None


def _after(g: _Graph, layer: Layer, size: int) -> tuple[str, Bias | None] | str:
    """The projection's output past its bias: ``(tensor, bias)``."""
    node = layer.node
    if node.op_type == "Gemm":
        bias = None
        if len(node.input) > 2 and node.input[2]:
            if float(_attr(node, "beta", 1.0)) != 1.0:
                return "a Gemm with beta != 1"
            got = _bias(g, node.input[2], size)
            if isinstance(got, str):
                return got
            bias = got
        return node.output[0], bias
    out = node.output[0]
    readers = g.readers.get(out, [])
    late = _late_bias(g, out, size)
    if late is not None:
        return late
    if len(readers) == 1 and readers[0].op_type == "Add" and g.private(out):
        add = readers[0]
        other = add.input[1] if add.input[0] == out else add.input[0]
        if other in g.constants:
            got = _bias(g, other, size)
            if isinstance(got, str):
                return got
            return add.output[0], got
        if _copied_constant(g, other):
            return _bias(g, other, size)  # (the reason: a constant behind an exporter's copy)
    return out, None


def _late_bias(g: _Graph, out: str, size: int) -> tuple[str, Bias] | None:
    """The bias added after a Reshape back to the activation's layout (tf2onnx writes a Keras
    Dense on 3-D input as Reshape to 2-D, MatMul, Reshape back, Add): ``(out, bias)``, the walk
    starting before the Reshape (which then follows the width) and the Add passing as the bias."""
    readers = g.readers.get(out, [])
    if len(readers) != 1 or readers[0].op_type != "Reshape" or readers[0].input[0] != out or not g.private(out):
        return None
    back = readers[0].output[0]
    after = g.readers.get(back, [])
    if len(after) != 1 or after[0].op_type != "Add" or not g.private(back):
        return None
    other = after[0].input[1] if after[0].input[0] == back else after[0].input[0]
    if other not in g.constants:
        return None
    got = _bias(g, other, size)
    return None if isinstance(got, str) else (out, got)


def _scalar(g: _Graph, name: str) -> bool:
    got = g.value(name)
    return got is not None and got[0].size == 1


#: Layout operators an exporter may put inside a feed-forward block (GPT-2's Conv1D flattens the
#: rows around each projection).  A Reshape whose target ends with the width follows the narrowing
#: (module docstring); the others are reported, not narrowed.
LAYOUT = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose"})

#: Operators that only pick or join the entries of a shape vector.
SHAPE_MOVES = frozenset({"Gather", "Slice", "Squeeze", "Unsqueeze", "Concat", "Cast", "Identity"})

_WIDTH, _FIXED, _ANY = "w", ".", "*"  # a shape entry that is the block's width; one narrowing leaves; any number of those


def _key(node: onnx.NodeProto) -> str:
    """A node's handle within its graph: its first output (a graph names each value once)."""
    return node.output[0] if node.output else ""


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node.name or node.output[0]}'"


def _ints(g: _Graph, name: str) -> list[int] | None:
    got = g.value(name)
    if got is None or got[0].dtype.kind not in "iu":
        return None
    return [int(v) for v in got[0].reshape(-1)]


def _moved(g: _Graph, node: onnx.NodeProto, entries: dict[str, list[str]]) -> list[str] | None:
    """The entries of a shape-moving node's output from its inputs' (``None``: cannot tell)."""
    op, src = node.op_type, entries.get(node.input[0]) if node.input else None
    if op == "Concat":
        if int(_attr(node, "axis", 0)) not in (0, -1):
            return None
        out: list[str] = []
        for name in node.input:
            known = _ints(g, name)
            out += entries[name] if name in entries else [_FIXED] * len(known) if known is not None else [_ANY]
        return out
    if src is None or _ANY in src:
        return None
    if op in ("Squeeze", "Unsqueeze", "Cast", "Identity"):
        return src
    if op == "Gather":
        picks = _ints(g, node.input[1]) if len(node.input) > 1 else None
        if int(_attr(node, "axis", 0)) != 0 or picks is None or not all(-len(src) <= i < len(src) for i in picks):
            return None
        return [src[i] for i in picks]
    if op == "Slice":
        if len(node.input) > 1:  # opset 10 and later
            bounds = [_ints(g, n) if n else None for n in (list(node.input[1:5]) + [""] * 4)[:4]]
            starts, ends, axes, steps = bounds
            if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None) \
                    or (len(node.input) > 4 and node.input[4] and steps is None):
                return None
        else:
            starts, ends, axes, steps = (list(_attr(node, a, [])) or None for a in ("starts", "ends", "axes", "steps"))
        if len(starts) != 1 or len(ends) != 1 or (axes or [0])[0] not in (0, -1) or (steps or [1])[0] == 0:
            return None
        return src[slice(starts[0], ends[0], (steps or [1])[0])]
    return None


def _width_reads(g: _Graph, shapes: list[onnx.NodeProto], block_reshapes: set[str], rank_of
                 ) -> tuple[set[str], str | None]:
    """Follow the block's width from the ``Shape`` readers of its tensors: the Reshapes inside the
    block whose target ends with it (``(ids, None)``), or why it reaches something else."""
    entries: dict[str, list[str]] = {}
    for node in shapes:
        rank = rank_of(node.input[0])
        if rank is None:
            return set(), f"{_label(node)} reads a tensor of the block whose rank is unknown"
        lo, hi = int(_attr(node, "start", 0)), _attr(node, "end", None)
        entries[node.output[0]] = ([_FIXED] * (rank - 1) + [_WIDTH])[slice(lo, None if hi is None else int(hi))]
    follows: set[str] = set()
    readers = {_key(s) for s in shapes}
    for node in g.graph.node:  # graph order: every piece of a Concat is known before it
        if _key(node) in readers or not any(n in entries for n in node.input):
            continue
        carries = [n for n in node.input if _WIDTH in entries.get(n, ())]
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx") and len(node.input) > 1 and carries == [node.input[1]]:
            target = entries[node.input[1]]
            if _key(node) not in block_reshapes:
                return set(), f"the block's width reaches {_label(node)} outside the block"
            if target[-1] != _WIDTH or _WIDTH in target[:-1]:
                return set(), f"{_label(node)} reads the block's width into its target elsewhere than last"
            follows.add(_key(node))
            continue
        got = _moved(g, node, entries) if node.op_type in SHAPE_MOVES and node.domain in ("", "ai.onnx") else None
        if got is None:
            if carries:
                return set(), f"the block's width is read by {_label(node)}"
            continue
        entries[node.output[0]] = got
    for name, got in entries.items():
        if _WIDTH in got and (name in g.outputs or name in g.captured):
            return set(), f"the block's width reaches '{name}', a graph output or read by a subgraph"
    return follows, None


def _targets(g: _Graph, reshapes: list[onnx.NodeProto], follows: set[str], f: int) -> tuple[list[ShapeEdit], str | None]:
    """How each Reshape inside a block follows the width: its constant target (or the constant
    last piece of the Concat that builds it) ending with ``f``, rewritten; or its own reading."""
    edits: list[ShapeEdit] = []
    for node in reshapes:
        if node.op_type != "Reshape":
            return [], (f"{_label(node)} between the projections changes the layout; only a Reshape that keeps the "
                        "neurons last is narrowed through")
        if _key(node) in follows:
            continue
        target = node.input[1] if len(node.input) > 1 else ""
        value = _ints(g, target)
        concat, name = None, target
        if value is None:
            producer = g.producer.get(target)
            if producer is not None and producer.op_type in ("Cast", "Identity") and producer.input and g.private(target) \
                    and g.private(producer.input[0]):  # (tf2onnx: an int32 Concat cast to int64; edited in place)
                producer = g.producer.get(producer.input[0])
            if producer is not None and producer.op_type == "Concat" and producer.domain in ("", "ai.onnx") \
                    and int(_attr(producer, "axis", 0)) in (0, -1) and producer.input:
                concat, name = producer, producer.input[-1]
                value = _ints(g, name)
        if value is None or not value or value[-1] != f:
            return [], (f"{_label(node)} between the projections: its target does not end with the {f} neurons "
                        "(a constant, or the block's own width read at run time)")
        holder = g.value(name)
        edits.append(ShapeEdit(node, name, np.asarray(value, dtype=holder[0].dtype if holder else np.int64), concat))
    return edits, None


@dataclass(frozen=True)
class _Join:
    """The activation joins another projection's output (``layer``): a gated block."""

    layer: Layer


def _source(g: _Graph, name: str, outputs: Mapping[str, Layer]) -> Layer | None:
    """The one projection ``name`` is computed from by elementwise nodes alone (with single values
    or constants beside it), if any."""
    seen, todo, found = set(), [name], []
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in outputs:
            if outputs[t] not in found:
                found.append(outputs[t])
            continue
        node = g.producer.get(t)
        if node is None or node.op_type not in ELEMENTWISE or node.domain not in ("", "ai.onnx", "com.microsoft"):
            return None
        todo += [i for i in node.input if i and not _scalar(g, i) and i not in g.constants]
    return found[0] if len(found) == 1 else None


def _from_block(g: _Graph, name: str, inside: set[str], limit: int = 64) -> onnx.NodeProto | None:
    """The node by which ``name`` is computed from the block's own tensors (``inside``), if it is
    within ``limit`` nodes upstream (a norm over the neurons, the width read by ``Shape``, ...)."""
    seen, todo, steps = set(), [(name, None)], 0
    while todo and steps < limit:
        t, via = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        node = g.producer.get(t)
        if node is None:
            continue
        steps += 1
        last = node if node.op_type not in ELEMENTWISE else via  # (the one nearest the block, on this path)
        if any(i in inside for i in node.input):
            return last or node
        todo += [(i, last) for i in node.input if i]
    return None


def _chain(g: _Graph, starts: list[str], down_inputs: dict[str, Layer], outputs: Mapping[str, Layer] | None = None,
           f: int = 0, rank_of=None, biases: frozenset[str] = frozenset()):
    """Follow ``start`` through elementwise nodes to a projection's input: the nodes, the
    projection, why the path is not a block, and how its Reshapes follow the width
    (:class:`ShapeEdit` s, and the names of those that read it).  ``(.., None, None, ..)``: no
    elementwise path reaches a projection at all (a residual add, a norm, an attention product
    ...).  ``outputs``: the projections by their output (or their bias Add's), to name a gated
    block; ``rank_of``: a tensor's rank, where a ``Shape`` reads one inside the block;
    ``biases``: the first projections' biases where the walk meets them (:func:`_late_bias`)."""
    nodes: list[onnx.NodeProto] = []
    inside = set(starts)
    frontier = list(starts)
    ends: list[Layer] = []
    others: list[str] = []  # readers that are neither elementwise nor the projection
    shapes: list[onnx.NodeProto] = []  # Shape readers of the block's tensors
    visited: set[str] = set()  # (nodes and Shape readers taken, by _key)
    none: tuple = ((), ())

    def fail(end, why):
        return nodes, end, why, none

    while frontier:
        name = frontier.pop()
        for reader in g.readers.get(name, []):
            if _key(reader) in visited:
                continue
            layer = down_inputs.get(name)
            if layer is not None and _key(reader) == _key(layer.node):
                if layer not in ends:
                    ends.append(layer)
                continue
            standard = reader.domain in ("", "ai.onnx")
            if reader.op_type == "Shape" and standard:
                shapes.append(reader)
                visited.add(_key(reader))
                continue
            layout = reader.op_type in LAYOUT and standard and reader.input[0] == name
            if not layout and (reader.op_type not in ELEMENTWISE or reader.domain not in ("", "ai.onnx", "com.microsoft")):
                others.append(_label(reader))
                continue
            nodes.append(reader)
            visited.add(_key(reader))
            for out in reader.output[:1] if layout else reader.output:
                if out and out not in inside:
                    inside.add(out)
                    frontier.append(out)
    if not ends or not any(n.op_type not in AFFINE and n.op_type not in LAYOUT for n in nodes):
        return fail(None, None)  # no elementwise path, or one with no activation on it: no block
    for node in nodes:
        if node.op_type in LAYOUT:
            continue  # (its shape input)
        for other in node.input:
            if other and other not in inside and not _scalar(g, other) and other not in g.constants \
                    and not _copied_constant(g, other):
                gate = _source(g, other, outputs or {})
                if gate is not None and len(ends) == 1:
                    if len(starts) > 1:
                        return fail(None, f"the activation joins the outputs of three projections ({gate.display_name})")
                    return fail(None, _Join(gate))
                via = _from_block(g, other, inside)
                if via is not None and len(ends) == 1:
                    return fail(None, (f"{_label(node)} combines the activation with '{other}', computed from the block's own "
                                       f"tensors by {_label(via)}, which narrowing would change"))
                return fail(None, None)  # joins another activation (a residual add ...): no block
    if len(ends) > 1:
        return fail(None, "the activation reaches two projections")
    end = ends[0]
    if others:
        return fail(None, f"the activation is also read by {others[0]}")
    h = end.node.input[0]
    for name in inside:
        if name in g.outputs or name in g.captured:
            return fail(None, f"'{name}' between the projections is also a graph output or read by a subgraph")
        if name != h and not g.readers.get(name):
            return fail(None, f"'{name}' is computed between the projections but not used")
    for node in nodes:
        if node.op_type in LAYOUT:
            continue
        for other in node.input:
            if other and other not in inside and not _scalar(g, other) and other not in biases:
                return fail(None, (f"{_label(node)} combines the activation with "
                                   f"'{other}', which is not a single value"))
        if node.op_type == "FastGelu" and len(node.input) > 1 and node.input[1]:
            return fail(None, f"FastGelu '{node.name}' adds a bias inside the activation")
    layouts = [n for n in nodes if n.op_type in LAYOUT]
    follows: set[str] = set()
    if shapes:
        follows, why = _width_reads(g, shapes, {_key(n) for n in layouts}, rank_of or (lambda name: None))
        if why is not None:
            return fail(None, why)
    edits, why = _targets(g, layouts, follows, f)
    if why is not None:
        return fail(None, why)
    return nodes, end, None, (tuple(edits), tuple(n.name or n.output[0] for n in layouts if _key(n) in follows))


def _halves(g: _Graph, cut: list[onnx.NodeProto], start: str, f2: int, rank_of) -> tuple[FusedCut, list[str]] | str:
    """The two halves of ``start`` (``f2`` wide) that ``cut`` (a Split, or two Slices) makes on
    its last axis, first half first; or why they are not that."""
    rank = rank_of(start)
    last = (-1,) if rank is None else (-1, rank - 1)
    if f2 % 2:
        return f"{_label(cut[0])} cuts {f2} outputs, an odd number, in parts"
    f = f2 // 2
    if len(cut) == 1 and cut[0].op_type == "Split":
        node = cut[0]
        outs = [o for o in node.output]
        if len(outs) != 2 or not all(outs) or int(_attr(node, "axis", 0)) not in last:
            return f"{_label(node)} does not cut the last axis in two"
        sizes_name = node.input[1] if len(node.input) > 1 and node.input[1] else None
        sizes = _ints(g, sizes_name) if sizes_name else list(_attr(node, "split", [])) or [f, f]
        if sizes != [f, f]:
            return f"{_label(node)} cuts {f2} outputs into {sizes}, not two halves"
        return FusedCut((node,), sizes_name), outs
    if len(cut) == 2 and all(n.op_type == "Slice" and len(n.input) >= 3 for n in cut):
        def cuts(width: int) -> list[tuple[int, int, onnx.NodeProto]] | None:
            """Each Slice's bounds on the last axis when the projection has ``width`` outputs."""
            out = []
            shape = [1] * ((rank or 1) - 1) + [width]
            for n in cut:
                starts, ends = (_evaluate(g, n.input[i], start, shape) for i in (1, 2))
                axes = _ints(g, n.input[3]) if len(n.input) > 3 and n.input[3] else None
                steps = _ints(g, n.input[4]) if len(n.input) > 4 and n.input[4] else [1]
                if starts is None or ends is None or len(starts) != 1 or len(ends) != 1 or axes is None \
                        or axes[0] not in last or steps != [1]:
                    return None
                lo, hi = (int(v) + width if v < 0 else int(v) for v in (starts[0], ends[0]))
                out.append((min(lo, width), min(hi, width), n))
            return sorted(out, key=lambda b: b[0])

        bounds = cuts(f2)
        if bounds is None:
            return f"{_label(cut[0])} cuts with bounds it computes otherwise than from constants and the projection's width"
        if [(lo, hi) for lo, hi, _ in bounds] != [(0, f), (f, f2)]:
            return f"{_label(cut[0])} and {_label(cut[1])} do not cut {f2} outputs into two halves"
        constant = all(_ints(g, n.input[i]) is not None for n in cut for i in (1, 2))
        follows = not constant and all((c := cuts(2 * k)) is not None and [(lo, hi) for lo, hi, _ in c] == [(0, k), (k, 2 * k)]
                                       for k in (f - 1, max(1, f // 2)))
        if not constant and not follows:
            return f"{_label(cut[0])} computes bounds that do not follow a narrower projection into two halves"
        if not _shape_reads_only(g, start, {_key(n) for n in cut}):
            return "its size is read by Shape for something other than the cut"
        return FusedCut(tuple(n for _, _, n in bounds), follows=follows), [n.output[0] for _, _, n in bounds]
    return f"{_label(cut[0])} cuts the output in other parts than two halves"


def _fused(g: _Graph, start: str, down_inputs: dict[str, Layer], outputs: Mapping[str, Layer], f2: int, rank_of):
    """A fused gate and up projection (Phi-3's ``gate_up_proj``: its output cut into two halves
    before the activation): ``(cut, nodes, end, why, edits, follows)``, a reason it is not
    narrowed, or ``None`` when the output is not cut before an activation that reaches a projection."""
    readers = [r for r in g.readers.get(start, []) if r.op_type != "Shape"]  # (a Shape may size the cut)
    std = [r for r in readers if r.domain in ("", "ai.onnx") and r.input and r.input[0] == start]
    if not readers or len(std) != len(readers) or not all(r.op_type in ("Split", "Slice", "Gather") for r in std):
        return None
    parts = [o for r in std for o in r.output if o]
    nodes, end, why, extra = _chain(g, parts, down_inputs, outputs, f2 // 2, rank_of)
    if end is None and why is None:
        return None
    what = (f"its output is cut into parts by {_label(std[0])} before the activation (a gate and an up projection in one "
            "weight, as Phi-3 writes gate_up_proj)")
    halves = _halves(g, std, start, f2, rank_of)
    if isinstance(halves, str):
        return f"{what}: {halves}"
    if isinstance(why, _Join):
        return f"{what}: the activation joins {why.layer.display_name} as well"
    if why is not None:
        return f"{what}: {why}"
    if not _shape_reads_only(g, start, {_key(n) for n in halves[0].nodes}):  # (a Split's cut reads no size)
        return f"{what}: its size is read by Shape for something other than the cut"
    return halves[0], nodes, end, extra, halves[1]


def find_blocks(model: onnx.ModelProto, found: Discovery, data: io.DataFiles | None = None) -> Blocks:
    """Every feed-forward block among discovery's candidates (module docstring); ``data``
    resolves biases held in external data.  Blocks are looked for in the main graph and in If
    branches; a block whose weights several branches read (a merged decoder's) is one block whose
    instances are narrowed together (:attr:`FfnBlock.twins`)."""
    result = Blocks()
    info: list = []
    reads: dict[str, int] = {}  # readers of each name, in every graph
    for graph in io.iter_graphs(model.graph):
        for node in graph.node:
            for name in node.input:
                if name:
                    reads[name] = reads.get(name, 0) + 1

    nested: list[str] = []
    left_out: dict[int, str] = {}
    group_of: dict[Layer, WeightGroup] = {}  # every projection -> its group
    in_scope: dict[str, list[Layer]] = {}  # the projections of each graph searched, by discovery's scope
    for group in found.groups:
        first = group.layers[0]
        if first.is_conv or group.weight is None or group.weight.tensor is None or len(group.weight.shape) != 2:
            continue
        if not all(layer.in_if_branches for layer in group.layers):
            if group.skip is None:
                nested.append(first.display_name)
            continue
        if group.skip is not None:
            left_out[group.key] = group.skip.message
        for layer in group.layers:
            group_of[layer] = group
            in_scope.setdefault(layer.scope, []).append(layer)

    found_here: list[FfnBlock] = []
    pairs: set[frozenset] = set()  # gated near misses said once, from whichever first projection
    for layers in in_scope.values():  # the main graph, and each If branch (a merged decoder's two)
        outer: dict = {}
        for graph in layers[0].outers:  # (the names a branch sees from the graphs around it)
            outer.update(own_constants(graph))
        g = _Graph(layers[0].graph, data, outer)
        found_here += _search(g, layers, group_of, left_out, _rank_finder(g, model, info), result.skipped, pairs)
    # the instances of one block (its weights read in several branches) become one block
    by_key: dict[tuple, list[FfnBlock]] = {}
    for b in found_here:
        by_key.setdefault(b.keys, []).append(b)
    claimed: set[int] = set()
    for keys, instances in by_key.items():
        first = instances[0]
        problems = []
        for name, grp in (("W1", first.up), ("the gate's weight", first.gate), ("W2", first.down)):
            if grp is not None and len(grp.layers) != len(instances):
                problems.append(f"{name} '{grp.weight.name}' is shared by {len(grp.layers)} nodes")
        for bias in (first.up_bias, first.gate_bias, first.down_bias):
            if bias is not None and reads.get(bias.name, 0) != len(instances):
                problems.append(f"its bias '{bias.name}' is shared with other nodes")
        same = {(b.hidden, b.up_t, b.down_t, b.gate_t, b.fused is None, b.activation,
                 tuple(x.name if x is not None else None for x in (b.up_bias, b.gate_bias, b.down_bias))) for b in instances}
        if len(same) > 1:
            problems.append("the If branches that read its weights hold it in different forms")
        if set(keys) & claimed:
            problems.append("a projection already belongs to another block")
        if problems:
            result.skipped.append((first.name, "; ".join(dict.fromkeys(problems))))
            continue
        first.twins = tuple(instances[1:])
        result.blocks.append(first)
        claimed |= set(keys)
    # a projection that is part of a block found (the second of one, say) is no unmatched block
    inside = {layer.display_name for b in result.blocks for p in (b.up, b.down, b.gate) if p is not None for layer in p.layers}
    result.skipped = list(dict.fromkeys((name, why) for name, why in result.skipped if name not in inside))
    if nested:
        more = f" and {len(nested) - 1} more" if len(nested) > 1 else ""
        result.skipped.append((f"{nested[0]}{more}", "inside a Loop/Scan body: width reduction looks for blocks in the main "
                                                     "graph and in If branches"))
    return result


def _rank_finder(g: _Graph, model: onnx.ModelProto, info: list):
    """``rank_of(name)`` for the tensors of ``g`` (``info``: shape inference, made once, shared)."""
    ranks: dict[str, int | None] = {}

    def rank_of(name: str) -> int | None:
        """A tensor's rank, where a ``Shape`` reads one inside a block: from shape inference, else
        from the Reshape or the elementwise node that makes it (inference stops at a target built
        at run time)."""
        if name in ranks:
            return ranks[name]
        if not info:
            from onnx_lowrank.shapes import value_shapes
            info.append(value_shapes(model))
        ranks[name] = None  # (no cycles in a valid graph; this guards a broken one)
        got, node = info[0].get(name), g.producer.get(name)
        if got is not None:
            rank = len(got)
        elif node is not None and node.op_type == "Reshape" and len(node.input) > 1:
            target = info[0].get(node.input[1])
            rank = target[0] if target and len(target) == 1 else None
        elif node is not None and node.op_type in ELEMENTWISE:
            known = [rank_of(i) if i not in g.constants else (len(g.value(i)[0].shape) if g.value(i) else None)
                     for i in node.input if i]
            rank = None if None in known or not known else max(known)
        else:
            rank = None
        ranks[name] = rank
        return rank

    return rank_of


def _search(g: _Graph, layers: list[Layer], group_of: Mapping[Layer, WeightGroup], left_out: Mapping[int, str], rank_of,
            skipped: list[tuple[str, str]], pairs: set[frozenset]) -> list[FfnBlock]:
    """The block instances of one graph (``layers``: the projections in it), and its near misses
    (added to ``skipped``)."""
    by_node = {layer: group_of[layer] for layer in layers}
    down_inputs: dict[str, Layer] = {}
    for layer in layers:
        if layer.weight_index == 1 and layer.node.input:
            down_inputs[layer.node.input[0]] = layer
    outputs: dict[str, Layer] = {}  # each projection's output, and its bias Add's
    for layer in layers:
        if layer.node.output:
            outputs[layer.node.output[0]] = layer
            for reader in g.readers.get(layer.node.output[0], []):
                if reader.op_type == "Add" and any(i in g.constants for i in reader.input):
                    outputs[reader.output[0]] = layer
    blocks: list[FfnBlock] = []
    claimed: set[Layer] = set()
    for up in layers:
        group = by_node[up]
        t1, f, problem = _projection(up)
        if problem is not None:
            continue
        after = _after(g, up, f)
        if isinstance(after, str):
            start = up.node.output[0]
            nodes, end, why, _ = _chain(g, [start], down_inputs, outputs, f, rank_of)
            if end is not None or why is not None:
                skipped.append((up.display_name, after))
            continue
        start, b1 = after
        biases = frozenset({b1.name} if b1 is not None else ())
        nodes, end, why, (edits, follows) = _chain(g, [start], down_inputs, outputs, f, rank_of, biases)
        gate = gate_group = gate_bias = gate_start = None
        tg = False
        if isinstance(why, _Join):  # a gated block: walk again from both first projections
            gate = why.layer
            gate_group = by_node.get(gate)
            tg, fg, pg = _projection(gate)
            after_g = _after(g, gate, fg) if pg is None else pg
            if gate_group is None:
                why = f"gated: the activation joins the output of {gate.display_name}, which is not a candidate here"
            elif pg is not None or isinstance(after_g, str):
                why = f"gated: the other first projection {gate.display_name}: {after_g}"
            elif fg != f:
                why = f"gated: the activation joins {f} neurons with {gate.display_name}'s {fg}"
            else:
                gate_start, gate_bias = after_g
                biases |= {gate_bias.name} if gate_bias is not None else set()
                nodes, end, why, (edits, follows) = _chain(g, [start, gate_start], down_inputs, outputs, f, rank_of, biases)
                if isinstance(why, _Join):  # (the two-start walk words a third projection itself)
                    why = f"the activation joins the outputs of three projections ({why.layer.display_name})"
        cut, width = None, f
        if end is None and why is None:
            fused = _fused(g, start, down_inputs, outputs, f, rank_of)
            if fused is None:
                continue  # no elementwise path to another projection: not a block at all
            if isinstance(fused, str):
                skipped.append((up.display_name, fused))
                continue
            cut, nodes, end, (edits, follows), parts = fused
            width = f // 2
            nodes = [*cut.nodes, *nodes]
        if why is not None:
            if gate is not None:
                pair = frozenset((up.display_name, gate.display_name))
                if pair in pairs:
                    continue
                pairs.add(pair)
            skipped.append((up.display_name, why))
            continue
        down = by_node[end]
        problems = []
        t2, _, p2 = _projection(end)
        if p2 is not None:
            problems.append(f"the second projection: {p2}")
        rows = down.weight.shape[1] if t2 else down.weight.shape[0]
        if rows != width:
            problems.append(f"W2 has {rows} inputs for {width} neurons")
        mine = {up, end} | ({gate} if gate is not None else set())
        keys = {group.key, down.key} | ({gate_group.key} if gate_group is not None else set())
        if mine & claimed or len(keys) < (3 if gate_group is not None else 2):
            problems.append("a projection already belongs to another block")
        for key, grp in ((group.key, group), (down.key, down), *(((gate_group.key, gate_group),) if gate_group else ())):
            if key in left_out:
                problems.append(f"{grp.layers[0].display_name} is left out: {left_out[key]}")
        if problems:
            skipped.append((up.display_name, "; ".join(problems)))
            continue
        out_size = down.weight.shape[0] if t2 else down.weight.shape[1]
        b2 = _after(g, end, out_size)
        down_bias = None if isinstance(b2, str) else b2[1]
        between = (up.node.output[0], start) + tuple(o for n in nodes for o in n.output if o)
        if gate is not None:
            between += (gate.node.output[0], gate_start)
        blocks.append(FfnBlock(group, down, b1, down_bias, width, t1, t2, tuple(n.op_type for n in nodes),
                               tuple(dict.fromkeys(between)), (group.weight.shape, down.weight.shape), edits,
                               follows, gate_group, gate_bias, tg, gate_group.weight.shape if gate_group else (), cut,
                               graph=g.graph, display=up.display_name))
        claimed |= mine
    return blocks
