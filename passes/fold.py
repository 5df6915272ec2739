"""Fold: a weight an exporter left behind a layout operator becomes a constant the pass can take.

Exports made without constant folding (``torch.onnx.export(..., do_constant_folding=False)``,
unoptimised dynamo graphs, ALBERT's layers sharing one transposed matrix) feed a MatMul or Gemm
``Transpose(W)`` instead of ``W``, sometimes through ``Reshape``, ``Squeeze``, ``Unsqueeze``,
``Flatten``, ``Identity`` or a narrowing ``Cast``.  Discovery only takes constants, so such a
layer would be left alone.  This stage evaluates each such chain once (onnx's reference
evaluator, at the model's own opsets) and puts its result in place of the chain's last value,
under the same name and in the same kind of holder as the source (an initializer or a
``Constant`` node of the same graph).

It folds only where nothing is stored twice: the source and every value inside the chain must
have no reader besides the next node of the chain (the last value may have any number of
readers: they all read the folded constant).  A source also read by something else, such as a
vocabulary table that a ``Gather`` reads and a tied output projection reads transposed, is left
as it is and discovery says why.  A ``Cast`` that widens (float16 weights computed in float32)
would double the bytes and is not folded.  The result computes exactly what the chain computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_lowrank import io
from onnx_lowrank.pipeline import Context, StageResult, Step
from onnx_lowrank.plan import SkipCode

from .discover import discover

__all__ = ["Fold", "Folded", "fold_layout", "LAYOUT_OPS"]

#: Operators that only move, reshape or (narrowing) retype a constant on its way to a product.
LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Cast"})

#: Input slots that hold a weight, by product type.
_WEIGHT_SLOTS = {"MatMul": (0, 1), "Gemm": (0, 1), "Conv": (1,)}

_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@dataclass
class Folded(StageResult):
    """The model with the chains folded, and what was folded.

    Attributes:
        model, data: The working copy (changed in place when anything was folded).
        chains: One entry per folded chain: the constant made (``name``), its ``source``, the
            operators folded (``ops``), the graph (``graph``: ``main`` or a body's name) and the
            products that read it (``readers``).
    """

    section = "fold"
    model: onnx.ModelProto
    data: io.DataFiles
    chains: list[dict[str, Any]] = field(default_factory=list)

    def report_sections(self) -> dict[str, dict[str, Any]]:
        return {"fold": {"chains": self.chains}} if self.chains else {}


def _constants(graph: onnx.GraphProto) -> dict[str, tuple[str, Any]]:
    """Constants of ``graph`` by name: ("initializer", tensor) or ("constant", node)."""
    inputs = {i.name for i in graph.input}
    out: dict[str, tuple[str, Any]] = {}
    for t in graph.initializer:
        if t.name not in inputs:  # an initializer that is also an input can be overridden: not a constant
            out[t.name] = ("initializer", t)
    for n in graph.node:
        if n.op_type == "Constant" and len(n.output) == 1 and not n.input:
            if len(n.attribute) == 1 and n.attribute[0].name == "value" and n.attribute[0].HasField("t"):
                out[n.output[0]] = ("constant", n)
    return out


def _readers(model: onnx.ModelProto) -> dict[str, int]:
    """How many node inputs (in every graph) and graph outputs read each name."""
    count: dict[str, int] = {}
    for g in io.iter_graphs(model.graph):
        for n in g.node:
            for name in n.input:
                if name:
                    count[name] = count.get(name, 0) + 1
        for o in g.output:
            count[o.name] = count.get(o.name, 0) + 1
    return count


def _narrowing_cast(node: onnx.NodeProto, source_type: int) -> bool:
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    if to not in _FLOATS or source_type not in _FLOATS:
        return False
    size = lambda t: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)).itemsize  # noqa: E731
    return size(to) <= size(source_type)


def _evaluate(chain: list[onnx.NodeProto], root: str, array: np.ndarray, extra: dict[str, np.ndarray],
              opsets: list[onnx.OperatorSetIdProto]) -> np.ndarray:
    """The value the chain computes from ``array``, by onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    out = chain[-1].output[0]
    graph = onnx.helper.make_graph(
        [onnx.NodeProto.FromString(n.SerializeToString()) for n in chain], "fold",
        [onnx.helper.make_tensor_value_info(root, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)],
        [onnx.helper.make_tensor_value_info(out, onnx.TensorProto.UNDEFINED, None)],
        [numpy_helper.from_array(v, k) for k, v in extra.items()])
    model = onnx.helper.make_model(graph, opset_imports=[o for o in opsets if o.domain in ("", "ai.onnx")])
    return ReferenceEvaluator(model).run(None, {root: array})[0]


def fold_layout(model: onnx.ModelProto, data: io.DataFiles | None = None, op_types=("MatMul", "Gemm", "Conv"), *,
                only: set[str] | None = None, dry_run: bool = False) -> list[dict[str, Any]]:
    """Fold, in place, every chain of :data:`LAYOUT_OPS` from a constant to a weight slot of an
    ``op_types`` node, where no tensor would be stored twice (see the module's text).

    Args:
        only: Fold only the chains from these sources (names of constants).
        dry_run: Find the chains, change nothing.

    Returns:
        One entry per chain (:class:`Folded`'s ``chains``).
    """
    data = data or io.DataFiles()
    slots = {op: _WEIGHT_SLOTS[op] for op in op_types if op in _WEIGHT_SLOTS}
    readers = _readers(model)
    outputs = {o.name for g in io.iter_graphs(model.graph) for o in g.output}
    done: list[dict[str, Any]] = []
    for graph, where in _graphs(model.graph):
        consts = _constants(graph)
        producer = {o: n for n in graph.node for o in n.output}
        chains: dict[str, list[onnx.NodeProto]] = {}  # by the value the product reads
        for node in graph.node:
            for slot in slots.get(node.op_type, ()):
                if slot < len(node.input) and node.input[slot] not in chains:
                    chain = _chain(node.input[slot], producer, consts, readers)
                    if chain is not None and _foldable(chain, consts, model.ir_version) and (only is None or chain[0].input[0] in only):
                        chains[node.input[slot]] = chain
        for out, chain in chains.items():
            root_name = chain[0].input[0]
            alias = all(n.op_type == "Identity" for n in chain) and out not in outputs
            if not alias and readers.get(root_name, 0) != 1:
                continue  # an Identity chain to a graph output, from a source read elsewhere too
            name = out if out in outputs else root_name  # (the source's name, which the report and filters know)
            products = sorted({n.name or n.output[0] for n in graph.node if out in n.input and n.op_type in slots})
            done.append({"name": name, "source": root_name, "value": out, "ops": [n.op_type for n in chain], "graph": where,
                         "readers": products})
            if dry_run:
                continue
            if alias:
                _alias(graph, chain, out, root_name)  # the readers read the constant itself
                continue
            extra = {x: io.read_tensor(_tensor(consts[x]), data) for n in chain for x in n.input[1:] if x}
            value = _evaluate(chain, root_name, io.read_tensor(_tensor(consts[root_name]), data), extra, list(model.opset_import))
            _replace(graph, chain, consts, out, np.ascontiguousarray(value), name)
    return done


def _foldable(chain: list[onnx.NodeProto], consts: dict[str, tuple[str, Any]], ir_version: int) -> bool:
    if all(n.op_type == "Identity" for n in chain):
        return True  # (made an alias: nothing new is stored)
    kind, _ = consts[chain[0].input[0]]
    source_type = _tensor(consts[chain[0].input[0]]).data_type
    if any(n.op_type == "Cast" and not _narrowing_cast(n, source_type) for n in chain):
        return False  # a widening Cast would store the weight in more bytes
    return not (kind == "initializer" and ir_version < 4)  # (an initializer there must also be a graph input)


def _graphs(graph: onnx.GraphProto, where: str = "main"):
    yield graph, where
    for node in graph.node:
        for body in io.node_bodies(node):
            yield from _graphs(body, f"{node.op_type} '{node.name or node.output[0]}' / {body.name or 'body'}")


def _tensor(entry: tuple[str, Any]) -> onnx.TensorProto:
    kind, holder = entry
    return holder if kind == "initializer" else holder.attribute[0].t


def _chain(value: str, producer: dict[str, onnx.NodeProto], consts: dict[str, tuple[str, Any]],
           readers: dict[str, int]) -> list[onnx.NodeProto] | None:
    """The layout nodes from a constant of this graph to ``value``, in order; ``None`` when
    ``value`` is not such a chain's end or folding it would store a tensor twice."""
    chain: list[onnx.NodeProto] = []
    while value not in consts:
        node = producer.get(value)
        if node is None or node.op_type not in LAYOUT_OPS or len(node.output) != 1 or not node.input:
            return None
        if any(name and name not in consts for name in node.input[1:]):
            return None  # a shape or axes computed at run time
        if chain and readers.get(value, 0) != 1:
            return None  # an inner value read elsewhere too
        chain.insert(0, node)
        value = node.input[0]
    if not chain:
        return None
    if readers.get(value, 0) != 1 and any(n.op_type != "Identity" for n in chain):
        return None  # the source is read elsewhere too: folding would store it twice (an alias stores nothing)
    if any(readers.get(name, 0) != 1 for n in chain for name in n.input[1:] if name):
        return None  # a shape constant another node reads stays where it is
    return chain


def _replace(graph: onnx.GraphProto, chain: list[onnx.NodeProto], consts: dict[str, tuple[str, Any]], out: str,
             value: np.ndarray, name: str) -> None:
    """Put ``value`` under ``name`` in the root's kind of holder, readers of ``out`` reading
    ``name``; drop the chain and its constants."""
    root_kind, root = consts[chain[0].input[0]]
    gone = {chain[0].input[0], *(n for node in chain for n in node.input[1:] if n)}
    tensor = numpy_helper.from_array(value, name)
    made = {n.output[0] for n in chain}  # (nodes are told apart by their outputs, which are unique)
    keep_nodes = []
    for n in graph.node:
        if n.output and n.output[0] == out and root_kind == "constant":
            keep_nodes.append(onnx.helper.make_node("Constant", [], [name], value=tensor, name=_fresh_name(graph, name)))
        if n.output and (n.output[0] in made or n.op_type == "Constant" and n.output[0] in gone):
            continue
        keep_nodes.append(n)
    root_name = chain[0].input[0]
    keep_inits = [tensor if t.name == root_name else t for t in graph.initializer if t.name not in gone or t.name == root_name]
    del graph.node[:]
    graph.node.extend(keep_nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    infos = [v for v in graph.value_info if v.name not in gone and v.name != out]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    if name != out:
        _rename_reads(graph, out, name)


def _alias(graph: onnx.GraphProto, chain: list[onnx.NodeProto], out: str, root: str) -> None:
    """Drop a chain of Identity nodes; what read its end reads ``root``."""
    made = {n.output[0] for n in chain}
    keep = [n for n in graph.node if not (n.output and n.output[0] in made)]
    del graph.node[:]
    graph.node.extend(keep)
    infos = [v for v in graph.value_info if v.name not in made]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    _rename_reads(graph, out, root)


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of ``old`` in ``graph`` and the bodies inside it reads ``new``."""
    for node in graph.node:
        for i, x in enumerate(node.input):
            if x == old:
                node.input[i] = new
        for body in io.node_bodies(node):
            _rename_reads(body, old, new)


def _fresh_name(graph: onnx.GraphProto, base: str) -> str:
    names = {n.name for n in graph.node}
    name, k = f"{base}/folded", 1
    while name in names:
        name, k = f"{base}/folded_{k}", k + 1
    return name


class Fold(Step):
    """Fold layout operators between a constant and a product (:func:`fold_layout`)."""

    name = "fold"
    changes_model = True

    def run(self, ctx: Context) -> Folded:
        cfg = ctx.config
        ops = tuple(t for t in cfg.op_types if t in _WEIGHT_SLOTS)
        # A layer that --include, --exclude or --min-params leaves alone keeps its graph as it was:
        # discovery, on the model as loaded, says which layers read a weight through layout nodes
        # and which of them those filters leave out.
        found = discover(ctx.model, op_types=cfg.op_types, include=cfg.include, exclude=cfg.exclude, min_params=cfg.min_params,
                         allow_input_weights=cfg.allow_input_weights)
        filtered = {SkipCode.EXCLUDED, SkipCode.NOT_INCLUDED, SkipCode.TOO_SMALL}
        wanted = {layer.behind.name for layer in found.layers if layer.behind is not None and layer.skip.code not in filtered}
        return Folded(ctx.model, ctx.data, fold_layout(ctx.model, ctx.data, ops, only=wanted) if wanted else [])
