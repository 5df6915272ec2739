"""Fold: a weight an exporter left behind a layout operator becomes a constant the pass can take.

Exports made without constant folding (``torch.onnx.export(..., do_constant_folding=False)``,
unoptimised dynamo graphs, ALBERT's layers sharing one transposed matrix) feed a MatMul or Gemm
``Transpose(W)`` instead of ``W``, sometimes through ``Reshape``, ``Squeeze``, ``Unsqueeze``,
``Flatten``, ``Identity`` or a narrowing ``Cast``.  Discovery only takes constants, so such a
layer would be left alone.  This stage evaluates each such chain once (onnx's reference
evaluator, at the model's own opsets) and puts its result in place of the chain's last value,
under the same name and in the same kind of holder as the source (an initializer or a
``Constant`` node of the same graph).

It folds only where nothing is stored twice and every reader of the result is a product that
can take it: the source and every value inside a chain have no reader besides the chain; several
chains from one source fold once when they compute the same value (an unoptimised ALBERT export
transposes its shared matrix once per layer); the last value is read by weight slots of products
alone.  A source also read by something else (a vocabulary table that a ``Gather`` reads and a
tied output projection reads transposed), a ``Cast`` that widens (float16 weights computed in
float32) or rounds twice in onnxruntime (float64 to a 16-bit type), and the like stay as they
are; :attr:`Folded.declined` says why, and discovery puts it in the layer's row.  The result
computes exactly what the chains computed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_lowrank import io
from onnx_lowrank.pipeline import Context, StageResult, Step
from onnx_lowrank.plan import SkipCode

from .discover import FOLD_ELSEWHERE_HINT, discover
from .ffn import own_constants
from .load import tensor_bytes

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
        chains: One entry per folded constant: its ``name`` (the source's), the ``source``, the
            operators folded (``ops``, of the first chain), how many chains it replaced
            (``chains``), the graph (``graph``: ``main`` or a body's path) and the products that
            read it (``readers``).
        declined: Why a chain was left as it is, by the value a product reads.
        tensor_bytes: The constants' bytes by kind once folded (a weight a Loop carried is a
            MatMul weight now), when nothing folded changed bytes; else ``None``.
    """

    section = "fold"
    model: onnx.ModelProto
    data: io.DataFiles
    chains: list[dict[str, Any]] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)
    tensor_bytes: dict[str, int] | None = None  # by kind, as folded (when no Cast changed a tensor's bytes)

    def report_sections(self) -> dict[str, dict[str, Any]]:
        return {"fold": {"chains": self.chains}} if self.chains else {}


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto | onnx.NodeProto]:
    """Constants of ``graph`` with a tensor value, by name: the initializer, or the Constant node."""
    return {name: holder for name, holder in own_constants(graph).items()
            if isinstance(holder, onnx.TensorProto) or (not holder.input and len(holder.attribute) == 1
                                                        and holder.attribute[0].name == "value" and holder.attribute[0].HasField("t"))}


def _tensor(holder: onnx.TensorProto | onnx.NodeProto) -> onnx.TensorProto:
    return holder if isinstance(holder, onnx.TensorProto) else holder.attribute[0].t


def _reads(graph: onnx.GraphProto) -> dict[str, int]:
    """How often each name is read in ``graph`` and the bodies inside it (node inputs and graph
    outputs): the readers a value of ``graph`` can have.  A sibling graph's names are its own."""
    count: dict[str, int] = {}
    for g in io.iter_graphs(graph):
        for n in g.node:
            for name in n.input:
                if name:
                    count[name] = count.get(name, 0) + 1
        for o in g.output:
            count[o.name] = count.get(o.name, 0) + 1
    return count


_SIZES = {t: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)).itemsize for t in _FLOATS}


def _cast_problem(node: onnx.NodeProto, source_type: int) -> str | None:
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    if to not in _FLOATS or source_type not in _FLOATS:
        return "a Cast to or from a type other than floating point"
    if _SIZES[to] > _SIZES[source_type]:
        return "a Cast to a wider type (folding would store the weight in more bytes)" + FOLD_ELSEWHERE_HINT
    if source_type == onnx.TensorProto.DOUBLE and to != onnx.TensorProto.FLOAT:
        return "a Cast from float64 to a 16-bit type, which onnxruntime rounds twice (through float32)"
    return None


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
    version = next(o.version for o in opsets if o.domain in ("", "ai.onnx"))  # (the default domain, by either name)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", version)])
    return ReferenceEvaluator(model).run(None, {root: array})[0]


@dataclass
class _Chain:
    """Layout nodes from ``root`` (a constant of the graph) to ``end`` (what products read)."""

    end: str
    nodes: list[onnx.NodeProto]
    root: str

    @property
    def alias(self) -> bool:
        return all(n.op_type == "Identity" for n in self.nodes)

    @property
    def extras(self) -> list[str]:
        return [x for n in self.nodes for x in n.input[1:] if x]


def _walk(end: str, producer: dict[str, onnx.NodeProto], consts: dict[str, onnx.TensorProto | onnx.NodeProto],
          inputs: set[str]) -> tuple[_Chain | None, str | None]:
    """The chain that ends in ``end``, or why there is none (``None``, ``None``: no layout node)."""
    nodes: list[onnx.NodeProto] = []
    value, seen = end, set()
    while value not in consts:
        node = producer.get(value)
        if node is None or node.op_type not in LAYOUT_OPS or len(node.output) != 1 or not node.input or value in seen:
            if nodes and node is None:
                if value in inputs:
                    return None, f"'{value}' is a graph input (an initializer listed as an input can be overridden at run time)"
                return None, f"'{value}' is defined in an enclosing graph; only a graph's own constants are folded"
            return None, None
        seen.add(value)
        if any(name and name not in consts for name in node.input[1:]):
            return None, f"the shape or axes of {node.op_type} '{node.name or node.output[0]}' are computed at run time"
        nodes.insert(0, node)
        value = node.input[0]
    return (_Chain(end, nodes, value), None) if nodes else (None, None)


def fold_layout(model: onnx.ModelProto, data: io.DataFiles | None = None, op_types=("MatMul", "Gemm", "Conv"), *,
                only: set[str] | None = None, left_alone=None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Fold, in place, the chains of :data:`LAYOUT_OPS` from constants to weight slots of
    ``op_types`` nodes, where nothing is stored twice (see the module's text).

    Args:
        only: Fold only the chains from these sources (names of constants).
        left_alone: ``(constant, [names of the products that read it], size) -> bool``: a Loop's
            carried constant the selection filters leave alone stays carried.

    Returns:
        The folded constants and the declined chains (:class:`Folded`'s ``chains`` and ``declined``).
    """
    data = data or io.DataFiles()
    slots = {op: _WEIGHT_SLOTS[op] for op in op_types if op in _WEIGHT_SLOTS}
    done: list[dict[str, Any]] = []
    declined: dict[str, str] = {}

    def visit(graph: onnx.GraphProto, where: str) -> None:
        _uncarry(graph, where, slots, done, left_alone)  # (first: a weight it frees may then fold in the body)
        for node in graph.node:  # the bodies first: a graph's rebuild copies its nodes, bodies included
            for body in io.node_bodies(node):
                visit(body, f"{where} / {node.op_type} '{node.name or node.output[0]}'")
        _fold_graph(model, graph, where, slots, data, only, done, declined)

    visit(model.graph, "main")
    return done, declined


def _uncarry(graph: onnx.GraphProto, where: str, slots: dict[str, tuple[int, ...]], done: list[dict[str, Any]],
             left_alone=None) -> None:
    """A constant of ``graph`` that a Loop carries through its iterations unchanged (tf2onnx's
    RNN kernels) reaches the body's products as a loop-carried value, which is no constant to
    discovery.  The body reads it directly instead (ONNX's lexical scoping), and the carried value
    leaves the Loop: its initial value, the body's input and output, and the Loop's final value
    (whose readers read the constant).  The same computation, nothing stored twice.  A weight
    the selection filters leave alone (``left_alone``) stays carried."""
    consts = _constants(graph)
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        if node.op_type != "Loop" or node.domain not in ("", "ai.onnx"):
            continue
        body = next((a.g for a in node.attribute if a.name == "body"), None)
        if body is None:
            continue
        carried = len(node.input) - 2
        defined = {n for g in io.iter_graphs(body) for n in [*(i.name for i in g.input), *(t.name for t in g.initializer),
                                                               *(o for x in g.node for o in x.output)]}
        identity_of = {x.output[0]: x.input[0] for x in body.node if x.op_type == "Identity" and x.input and x.output}
        drop: list[int] = []
        for k in range(carried):
            init = node.input[2 + k]
            if not init or init not in consts or init in defined or 2 + k >= len(body.input) or 1 + k >= len(body.output):
                continue
            inside, out = body.input[2 + k].name, body.output[1 + k].name
            final = node.output[k] if k < len(node.output) else ""
            if (out != inside and identity_of.get(out) != inside) or final in outputs:
                continue
            if any(o.name in (inside, out) for j, o in enumerate(body.output) if j != 1 + k):
                continue  # (the body also hands it out as something else)
            products = _products_reading(body, inside, slots)
            if not products:
                continue  # (only for a weight: other carried constants stay as they are)
            loop_name = node.name or node.output[0]
            if left_alone is not None and left_alone(init, [f"{loop_name}/body/{p}" for p in products],
                                                     int(np.prod(_tensor(consts[init]).dims))):
                continue
            drop.append(k)
            renames = {inside: init}
            if out != inside:
                renames[out] = init
            _rename_reads(body, renames)
            if final:
                _rename_reads(graph, {final: init})
            done.append({"name": init, "source": init, "ops": ["Loop (carried unchanged)"], "chains": 1,
                         "graph": f"{where} / Loop '{loop_name}'", "readers": sorted(set(products))})
        if drop:
            _drop_carried(node, body, drop)


def _products_reading(body: onnx.GraphProto, name: str, slots: dict[str, tuple[int, ...]]) -> list[str]:
    """The products (their names) that read ``name`` as a weight, in ``body`` and the bodies inside."""
    return [x.name or x.output[0] for g in io.iter_graphs(body) for x in g.node
            if any(slot < len(x.input) and x.input[slot] == name for slot in slots.get(x.op_type, ()))]


def _drop_carried(node: onnx.NodeProto, body: onnx.GraphProto, drop: list[int]) -> None:
    """Remove the carried values ``drop`` from a Loop and its body."""
    gone = set(drop)
    inputs = [x for i, x in enumerate(node.input) if i - 2 not in gone]
    outputs = [x for i, x in enumerate(node.output) if i not in gone]
    body_in = [x for i, x in enumerate(body.input) if i - 2 not in gone]
    body_out = [x for i, x in enumerate(body.output) if i - 1 not in gone]
    del node.input[:]
    node.input.extend(inputs)
    del node.output[:]
    node.output.extend(outputs)
    del body.input[:]
    body.input.extend(body_in)
    del body.output[:]
    body.output.extend(body_out)
    reads = _reads(body)  # an Identity that only passed the value out is read by nothing now
    keep = [x for x in body.node if not (x.op_type == "Identity" and x.output and not reads.get(x.output[0]))]
    if len(keep) < len(body.node):
        del body.node[:]
        body.node.extend(keep)


def _fold_graph(model, graph, where, slots, data, only, done, declined) -> None:
    consts = _constants(graph)
    producer = {o: n for n in graph.node for o in n.output}
    reads = _reads(graph)
    outputs = {o.name for o in graph.output}
    inputs = {i.name for i in graph.input}
    product_reads: dict[str, list[str]] = {}  # value -> the products reading it in a weight slot (bodies too)
    for g in io.iter_graphs(graph):
        for node in g.node:
            for slot in slots.get(node.op_type, ()):
                if slot < len(node.input) and node.input[slot]:
                    product_reads.setdefault(node.input[slot], []).append(node.name or node.output[0])
    by_root: dict[str, list[_Chain]] = {}
    for end, products in product_reads.items():
        chain, why = _walk(end, producer, consts, inputs)
        if chain is None:
            if why:
                declined[end] = why
            continue
        why = _chain_problem(chain, products, consts, reads, outputs, model.ir_version)
        if why:
            declined[end] = why
        elif only is None or chain.root in only:
            by_root.setdefault(chain.root, []).append(chain)

    new: dict[str, onnx.TensorProto] = {}  # root -> the folded tensor (held as the root was)
    renames: dict[str, str] = {}
    gone_nodes: set[str] = set()  # by first output
    for root, chains in by_root.items():
        aliases = [c for c in chains if c.alias]
        folds = [c for c in chains if not c.alias]
        for c in aliases:  # an alias stores nothing
            renames[c.end] = root
            gone_nodes.update(n.output[0] for n in c.nodes)
        if not folds:
            continue
        if reads.get(root, 0) != len(folds):
            reason = "its constant '" + root + "' is also read elsewhere: folding would store it twice"
            declined.update({c.end: reason for c in folds})
            continue
        source = io.read_tensor(_tensor(consts[root]), data)
        values = []
        for c in folds:
            extra = {x: io.read_tensor(_tensor(consts[x]), data) for x in c.extras}
            values.append(_evaluate(c.nodes, root, source, extra, list(model.opset_import)))
        if any(v.dtype != values[0].dtype or not np.array_equal(v, values[0], equal_nan=True) for v in values[1:]):
            reason = f"its constant '{root}' is read through chains that compute different values: folding would store it twice"
            declined.update({c.end: reason for c in folds})
            continue
        value = np.ascontiguousarray(values[0])
        stored = _tensor(consts[root])
        if isinstance(consts[root], onnx.TensorProto) and data.spill is not None and io.is_external(stored):
            # (an external weight stays outside memory, as the rewrite's factors do)
            new[root] = data.spill.add(root, value, onnx.helper.np_dtype_to_tensor_dtype(value.dtype))
        else:
            new[root] = numpy_helper.from_array(value, root)
        for c in folds:
            renames[c.end] = root
            gone_nodes.update(n.output[0] for n in c.nodes)
    for root, chains in by_root.items():
        kept = [c for c in chains if c.end in renames]
        if kept:
            done.append({"name": root, "source": root, "ops": [n.op_type for n in kept[0].nodes], "chains": len(kept),
                         "graph": where, "readers": sorted({p for c in kept for p in product_reads[c.end]})})
    if renames:
        _rebuild(graph, consts, reads, new, renames, gone_nodes)


def _chain_problem(chain: _Chain, products: list[str], consts, reads: dict[str, int], outputs: set[str],
                   ir_version: int) -> str | None:
    """Why ``chain`` is not folded, or ``None``."""
    if chain.end in outputs:
        return f"its value '{chain.end}' is also an output of the graph"
    if reads.get(chain.end, 0) != len(products):
        return f"its value '{chain.end}' is also read by a node that cannot take factors"
    inner = [n.output[0] for n in chain.nodes[:-1]]
    shared = next((v for v in inner if reads.get(v, 0) != 1), None)
    if shared is not None:
        return f"the chain's value '{shared}' is also read by another node"
    if chain.alias:
        return None
    source_type = _tensor(consts[chain.root]).data_type
    for n in chain.nodes:
        if n.op_type == "Cast":
            why = _cast_problem(n, source_type)
            if why:
                return why
    if isinstance(consts[chain.root], onnx.TensorProto) and ir_version < 4:
        return f"below IR version 4 an initializer is also a graph input, which a folded constant would have to be"
    return None


def _rebuild(graph: onnx.GraphProto, consts: dict[str, onnx.TensorProto | onnx.NodeProto], reads: dict[str, int],
             new: dict[str, onnx.TensorProto], renames: dict[str, str], gone_nodes: set[str]) -> None:
    """One pass over the graph: chains out, folded constants in (an initializer in place of its
    source, a Constant node where the source's was), reads renamed, unread shape constants out."""
    removed = [n for n in graph.node if n.output and n.output[0] in gone_nodes]
    extra_reads: dict[str, int] = {}
    for n in removed:
        for x in n.input[1:]:
            if x:
                extra_reads[x] = extra_reads.get(x, 0) + 1
    unread = {x for x, k in extra_reads.items() if x in consts and reads.get(x, 0) == k and x not in new}
    nodes = []
    for n in graph.node:
        if n.output and (n.output[0] in gone_nodes or n.op_type == "Constant" and n.output[0] in unread):
            continue
        if n.op_type == "Constant" and n.output and n.output[0] in new:
            n = onnx.helper.make_node("Constant", [], [n.output[0]], value=new[n.output[0]], name=n.name)
        nodes.append(n)
    inits = [new.get(t.name, t) for t in graph.initializer if t.name not in unread]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    changed = set(renames) | set(new) | unread | gone_nodes
    infos = [v for v in graph.value_info if v.name not in changed]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    _rename_reads(graph, renames)


def _rename_reads(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Every read of a key of ``renames`` in ``graph`` and the bodies inside it reads its value
    (node inputs; and the outputs of the bodies inside, which read their scope)."""
    for depth, g in enumerate(io.iter_graphs(graph)):
        for node in g.node:
            for i, x in enumerate(node.input):
                if x in renames:
                    node.input[i] = renames[x]
        if depth:  # (the first is ``graph`` itself)
            for o in g.output:
                if o.name in renames:
                    o.name = renames[o.name]


def _filters(cfg):
    """Whether --min-params, --exclude or --include leaves alone a weight of that name and size
    read by products of those names (a Loop's carried constant, which discovery cannot see)."""
    inc = re.compile(cfg.include) if cfg.include else None
    exc = re.compile(cfg.exclude) if cfg.exclude else None

    def left_alone(name: str, products: list[str], size: int) -> bool:
        names = [name, *products]
        return (size < cfg.min_params or (exc is not None and any(exc.search(n) for n in names))
                or (inc is not None and not any(inc.search(n) for n in names)))

    return left_alone


class Fold(Step):
    """Fold layout operators between a constant and a product (:func:`fold_layout`)."""

    name = "fold"
    changes_model = True

    def run(self, ctx: Context) -> Folded:
        cfg = ctx.config
        ops = tuple(t for t in cfg.op_types if t in _WEIGHT_SLOTS)
        # A layer that --include, --exclude or --min-params leaves alone keeps its graph as it was:
        # discovery, on the model as loaded, says which layers read a weight through layout nodes
        # and which of them those filters leave out; a source is folded when none of its layers is.
        found = discover(ctx.model, op_types=cfg.op_types, include=cfg.include, exclude=cfg.exclude, min_params=cfg.min_params,
                         allow_input_weights=cfg.allow_input_weights)
        filtered = {SkipCode.EXCLUDED, SkipCode.NOT_INCLUDED, SkipCode.TOO_SMALL}
        behind = [layer for layer in found.layers if layer.behind is not None]
        left = {layer.behind.name for layer in behind if layer.skip.code in filtered}
        wanted = {layer.behind.name for layer in behind} - left
        data = ctx.data
        if data.spill is None and data.base_dir is not None and io.uses_external_data(ctx.model):
            data = io.DataFiles(data.base_dir, data.label, io.Spill())  # (folded external weights go there)
        chains, declined = fold_layout(ctx.model, data, ops, only=wanted, left_alone=_filters(cfg))
        same_bytes = chains and not any("Cast" in c["ops"] for c in chains)
        return Folded(ctx.model, data, chains, declined, tensor_bytes(ctx.model) if same_bytes else None)
