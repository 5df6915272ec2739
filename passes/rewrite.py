"""Graph surgery: replace a weight ``W`` by its factors ``A @ B`` in every node that uses it.

The rewrite works on the ``ModelProto`` in place and touches nothing but the nodes and tensors
involved, so metadata, value_info, functions, opsets, the IR version, initializer graph inputs of
old IR versions, and tensors in other scopes all stay exactly as they were.

With ``W = A @ B`` (``A``: (m, r), ``B``: (r, n)), each user becomes two chained products:

=====================  ==========================================================
``MatMul(x, W)``       ``MatMul(MatMul(x, A), B)``
``MatMul(W, x)``       ``MatMul(A, MatMul(B, x))``
``Gemm(x, W)``         ``Gemm(Gemm(x, A, transA), B, C, alpha, beta)``
``Gemm(x, W^T)``       ``Gemm(Gemm(x, B^T, transA), A^T, C, alpha, beta)``
``Gemm(W, x)``         ``Gemm(A, Gemm(B, x, transB), C, alpha, beta)``
``Gemm(W^T, x)``       ``Gemm(B^T, Gemm(A^T, x, transB), C, alpha, beta)``
=====================  ==========================================================

The bias, alpha and beta stay on the second product, so Gemm's semantics are kept exactly; the
transposes are Gemm's own ``transA``/``transB`` flags, so every user shares the same two
tensors.  The factors are stored as two constants and never as a constant product: a
constant-folding optimizer would multiply them back into ``W``.

A Conv ``Conv(x, W, bias)`` becomes two chained convs with the kernels of
:func:`~onnx_lowrank.decompose.conv_kernels` (shared by every user of ``W``; each user keeps its
own attributes):

===========  =======================================================  ================================
mode         first conv (no bias)                                     second conv (with the bias)
===========  =======================================================  ================================
channel      ``k_1 x .. x k_d``, ``C_in -> r``: strides, pads,        ``1 x .. x 1``, ``r -> C_out``
             dilations, auto_pad of the original
spatial      ``kh x 1``, ``C_in -> r``: vertical stride, dilation,     ``1 x kw``, ``r -> C_out``:
             pads (top, bottom)                                       horizontal ones (left, right)
===========  =======================================================  ================================

The split is exact for every padding: the first spatial conv leaves the columns alone, and
its output is zero wherever the input was horizontal padding (it has no bias), so padding the
intermediate instead of the input changes nothing.  ``SAME_UPPER``/``SAME_LOWER`` pad each axis
on its own from that axis's size, stride, kernel and dilation; a ``kh x 1`` conv with stride
``(sh, 1)`` pads the rows as the original did and the columns not at all, so ``auto_pad`` carries
over to both halves unchanged and no input size is needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_lowrank import io, linalg
from onnx_lowrank.io import NameScope, iter_graphs
from onnx_lowrank.pipeline import Context, StageResult, Step

from .decide import Decided
from .discover import ConvSpec, Layer, Weight, WeightGroup
from .refit import Refits
from .width import current_widths
from .spectra import Spectra

__all__ = ["NameScope", "factorize_group", "factorize_conv_group", "opset_version", "Rewrite", "Rewritten"]

log = logging.getLogger(__name__)


def opset_version(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 1


def _index_of(container, item) -> int:
    for i, x in enumerate(container):
        if x is item:
            return i
    for i, x in enumerate(container):
        if x == item:
            return i
    raise ValueError("element not found")


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def factorize_group(
    model: onnx.ModelProto,
    group: WeightGroup,
    a: np.ndarray,
    b: np.ndarray,
    names: NameScope,
    spill: io.Spill | None = None,
) -> tuple[str, str]:
    """Replace ``group.weight`` by factors ``a`` (m, r) and ``b`` (r, n) in all of its users.

    Args:
        spill: Write initializer factors there (external data) instead of into the model.

    Returns:
        The names given to the two factors.
    """
    w = group.weight
    a_name = names.fresh(f"{w.name}__lowrank_A")
    b_name = names.fresh(f"{w.name}__lowrank_B")
    opset = opset_version(model)
    zero_name = None
    if needs_zero_bias(opset, group):
        # Gemm before opset 11 needs C; the first product gets an explicit zero.
        zero_name = names.fresh(f"{w.name}__lowrank_zero")
    _add_factors(model, w, [(a_name, a), (b_name, b)] + ([(zero_name, np.zeros((1,), a.dtype))] if zero_name else []), spill)
    for layer in group.layers:
        _rewrite_user(layer, a_name, b_name, zero_name, opset, names)
    _remove_weight(model, w)
    log.info("factorized %s %s -> %s %s + %s %s", w.name, list(w.shape), a_name, list(a.shape), b_name, list(b.shape))
    return a_name, b_name


def needs_zero_bias(opset: int, group: WeightGroup) -> bool:
    """Whether the factors of ``group`` come with a one-element zero ``C`` (Gemm before opset 11)."""
    return opset < 11 and any(layer.op_type == "Gemm" for layer in group.layers)


def _add_factors(model: onnx.ModelProto, w: Weight, tensors: list[tuple[str, np.ndarray]], spill: io.Spill | None = None) -> None:
    if spill is not None and w.constant_node is None:
        protos = [spill.add(name, arr, w.tensor.data_type) for name, arr in tensors]
    else:
        protos = [numpy_helper.from_array(arr, name) for name, arr in tensors]
    for p in protos:
        p.data_type = w.tensor.data_type  # keep bfloat16/float16 exactly as the weight had it
    if w.constant_node is not None:
        idx = _index_of(w.graph.node, w.constant_node)
        for k, p in enumerate(protos):
            node = helper.make_node("Constant", [], [p.name], name=p.name, value=p)
            w.graph.node.insert(idx + k, node)
        return
    w.graph.initializer.extend(protos)
    if model.ir_version < 4 or w.is_graph_input:
        # IR < 4 requires every initializer to be listed as a graph input.
        for p in protos:
            w.graph.input.append(helper.make_tensor_value_info(p.name, p.data_type, list(p.dims)))


def _remove_weight(model: onnx.ModelProto, w: Weight) -> None:
    remove_constant(w.graph, w.name, constant=w.constant_node is not None)


def remove_constant(graph: onnx.GraphProto, name: str, *, constant: bool = False) -> None:
    """Remove the constant value ``name`` from ``graph``: its ``Constant`` node (``constant``), or
    its initializer and the graph input of the same name; and its value_info either way."""
    if constant:
        for i, n in enumerate(graph.node):
            if n.op_type == "Constant" and list(n.output) == [name]:
                del graph.node[i]
                break
    else:
        for i, t in enumerate(graph.initializer):
            if t.name == name:
                del graph.initializer[i]
                break
        for i, v in enumerate(graph.input):
            if v.name == name:
                del graph.input[i]
                break
    for i, v in enumerate(graph.value_info):
        if v.name == name:
            del graph.value_info[i]
            break


def _rewrite_user(layer: Layer, a: str, b: str, zero: str | None, opset: int, names: NameScope) -> None:
    node, graph = layer.node, layer.graph
    x = node.input[1 - layer.weight_index]
    out = node.output[0]
    mid = names.fresh(f"{out}__lowrank")
    base = node.name or out
    n1, n2 = names.fresh(f"{base}__lowrank_1"), names.fresh(f"{base}__lowrank_2")

    if node.op_type == "MatMul":
        if layer.weight_index == 1:
            first = helper.make_node("MatMul", [x, a], [mid], name=n1)
            second = helper.make_node("MatMul", [mid, b], [out], name=n2)
        else:
            first = helper.make_node("MatMul", [b, x], [mid], name=n1)
            second = helper.make_node("MatMul", [a, mid], [out], name=n2)
    else:
        at = _attrs(node)
        ta, tb = int(at.get("transA", 0)), int(at.get("transB", 0))
        second_kw = {k: at[k] for k in ("alpha", "beta", "broadcast") if k in at}
        c = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
        first_c = [zero] if zero is not None else []
        first_kw = {"broadcast": 1} if opset < 7 else {}
        if layer.weight_index == 1:
            if tb == 0:  # y = op(x) @ W = (op(x) @ A) @ B
                first = _gemm([x, a, *first_c], mid, n1, transA=ta, **first_kw)
                second = _gemm([mid, b, *c], out, n2, **second_kw)
            else:  # y = op(x) @ W^T = (op(x) @ B^T) @ A^T
                first = _gemm([x, b, *first_c], mid, n1, transA=ta, transB=1, **first_kw)
                second = _gemm([mid, a, *c], out, n2, transB=1, **second_kw)
        else:
            if ta == 0:  # y = W @ op(x) = A @ (B @ op(x))
                first = _gemm([b, x, *first_c], mid, n1, transB=tb, **first_kw)
                second = _gemm([a, mid, *c], out, n2, **second_kw)
            else:  # y = W^T @ op(x) = B^T @ (A^T @ op(x))
                first = _gemm([a, x, *first_c], mid, n1, transA=1, transB=tb, **first_kw)
                second = _gemm([b, mid, *c], out, n2, transA=1, **second_kw)
    for n in (first, second):
        n.domain = node.domain
    idx = _index_of(graph.node, node)
    graph.node.insert(idx, first)
    node.CopyFrom(second)


def _gemm(inputs: Iterable[str], out: str, name: str, **attrs) -> onnx.NodeProto:
    kept = {k: v for k, v in attrs.items() if not (k in ("transA", "transB") and v == 0)}
    return helper.make_node("Gemm", list(inputs), [out], name=name, **kept)


def factorize_conv_group(
    model: onnx.ModelProto,
    group: WeightGroup,
    first: np.ndarray,
    second: np.ndarray,
    mode: str,
    names: NameScope,
    spill: io.Spill | None = None,
) -> tuple[str, str]:
    """Replace the Conv weight ``group.weight`` by two chained convs in all of its users.

    Args:
        first: Kernel of the first conv, ``(r, C_in, ...)``.
        second: Kernel of the second conv, ``(C_out, r, ...)``.
        mode: ``"channel"`` or ``"spatial"``, as the kernels were built.

    Returns:
        The names given to the two kernels, first conv's first.
    """
    w = group.weight
    k1 = names.fresh(f"{w.name}__lowrank_K1")
    k2 = names.fresh(f"{w.name}__lowrank_K2")
    _add_factors(model, w, [(k1, first), (k2, second)], spill)
    for layer in group.layers:
        _rewrite_conv_user(layer, k1, k2, mode, names)
    _remove_weight(model, w)
    log.info("factorized %s %s (%s-wise) -> %s %s + %s %s", w.name, list(w.shape), mode, k1, list(first.shape),
             k2, list(second.shape))
    return k1, k2


def _conv_attrs(spec: ConvSpec, mode: str) -> tuple[dict, dict]:
    nd = spec.ndim
    if mode == "channel":
        a1 = {"kernel_shape": list(spec.kernel), "strides": list(spec.strides), "dilations": list(spec.dilations)}
        a2 = {"kernel_shape": [1] * nd}
        if spec.auto_pad == "NOTSET":
            a1["pads"] = list(spec.pads)
        else:
            a1["auto_pad"] = spec.auto_pad
        return a1, a2
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel, spec.strides, spec.dilations
    top, left, bottom, right = spec.pads
    a1 = {"kernel_shape": [kh, 1], "strides": [sh, 1], "dilations": [dh, 1]}
    a2 = {"kernel_shape": [1, kw], "strides": [1, sw], "dilations": [1, dw]}
    if spec.auto_pad == "NOTSET":
        a1["pads"] = [top, 0, bottom, 0]
        a2["pads"] = [0, left, 0, right]
    else:
        a1["auto_pad"] = a2["auto_pad"] = spec.auto_pad
    return a1, a2


def _rewrite_conv_user(layer: Layer, k1: str, k2: str, mode: str, names: NameScope) -> None:
    node, graph = layer.node, layer.graph
    x = node.input[0]
    bias = [node.input[2]] if len(node.input) > 2 and node.input[2] else []
    out = node.output[0]
    mid = names.fresh(f"{out}__lowrank")
    base = node.name or out
    n1, n2 = names.fresh(f"{base}__lowrank_1"), names.fresh(f"{base}__lowrank_2")
    a1, a2 = _conv_attrs(layer.conv, mode)
    first = helper.make_node("Conv", [x, k1], [mid], name=n1, **a1)
    second = helper.make_node("Conv", [mid, k2, *bias], [out], name=n2, **a2)
    for n in (first, second):
        n.domain = node.domain
    graph.node.insert(_index_of(graph.node, node), first)
    node.CopyFrom(second)


def narrow_block(model: onnx.ModelProto, plan, data: io.DataFiles, names: NameScope) -> None:
    """Apply a width reduction (:mod:`.width`): slice ``W1`` and ``b1``, write the refitted
    ``W2``, shift ``b2``, in place (each tensor keeps its name, type and storage: an external
    one goes to the spill file).  A Reshape inside the block whose target holds the width as a
    constant gets a target of its own with the new width (another Reshape may share the old
    one).  The tensors between the projections lose their recorded shapes, which no longer hold."""
    from .width import narrowed_arrays

    block = plan.block
    holders = {g.weight.name: g.weight.tensor for g, _, _ in block.firsts}
    holders[block.down.weight.name] = block.down.weight.tensor
    for bias in (*(b for _, b, _ in block.firsts), block.down_bias):
        if bias is not None:
            holders[bias.name] = bias.holder if isinstance(bias.holder, onnx.TensorProto) else next(
                a.t for a in bias.holder.attribute if a.name == "value")
    for name, arr in narrowed_arrays(plan, data).items():
        tensor = holders[name]
        external = tensor.data_location == onnx.TensorProto.EXTERNAL
        if external and data.spill is not None:
            proto = data.spill.add(name, arr, tensor.data_type)
        else:
            proto = numpy_helper.from_array(arr, name)
        proto.data_type = tensor.data_type
        tensor.CopyFrom(proto)
    main = model.graph
    for inst in block.instances:  # (a merged decoder's block: one instance per If branch, on the same weights)
        graph = inst.graph if inst.graph is not None else main
        if inst.fused is not None:
            _cut_at(inst.fused, plan.kept, inst.hidden, graph, names)
        for edit in inst.reshapes:
            value = edit.value.copy()
            value[-1] = plan.kept
            name = names.fresh(f"{edit.name}__width{plan.kept}")
            graph.initializer.append(numpy_helper.from_array(value, name))
            if edit.concat is None:
                edit.reshape.input[1] = name
            elif _reads(model, edit.concat.output[0]) == 1 and edit.concat.output[0] not in {o.name for o in graph.output}:
                edit.concat.input[-1] = name
            else:  # the Concat builds other targets too: this Reshape gets a copy of its own
                piece = helper.make_node("Concat", [*edit.concat.input[:-1], name],
                                         [names.fresh(f"{edit.concat.output[0]}__width")],
                                         name=names.fresh(f"{edit.concat.name or 'Concat'}__width"), axis=0)
                graph.node.insert(_index_of(graph.node, edit.reshape), piece)
                edit.reshape.input[1] = piece.output[0]
        _drop_value_info(graph, set(inst.between) | set(holders))
    targets = {e.name for inst in block.instances for e in inst.reshapes}
    if targets:
        read = {i for g in iter_graphs(main) for n in g.node for i in n.input}
        for g in iter_graphs(main):
            for gone in targets - read:
                _drop_constant(g, gone)  # a target no Reshape reads any more
    _drop_value_info(main, set(holders))  # (exporters such as torch's dynamo give initializers value_info too)
    for v in main.input:  # initializers listed as graph inputs (IR < 4) carry their shapes
        if v.name in holders:
            dims = list(holders[v.name].dims)
            v.type.tensor_type.shape.ClearField("dim")
            for d in dims:
                v.type.tensor_type.shape.dim.add().dim_value = d
    log.info("narrowed %s to %d of %d neurons", block.name, plan.kept, block.hidden)


def _drop_value_info(graph: onnx.GraphProto, stale: set[str]) -> None:
    """Forget the recorded shapes of ``stale`` values (they changed with the width)."""
    keep = [v for v in graph.value_info if v.name not in stale]
    if len(keep) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(keep)


def _cut_at(cut, k: int, f: int, graph: onnx.GraphProto, names: NameScope) -> None:
    """A fused gate and up projection narrowed to ``k`` neurons: its cut makes two halves of ``k``."""
    def const(values: list[int], base: str) -> str:
        name = names.fresh(f"{base}__width{k}")
        graph.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    if cut.nodes[0].op_type == "Split":
        node = cut.nodes[0]
        if cut.sizes is not None:
            node.input[1] = const([k, k], cut.sizes)
        for a in node.attribute:
            if a.name == "split":  # (opsets before 13)
                del a.ints[:]
                a.ints.extend([k, k])
        return
    if cut.follows:  # (bounds computed from the projection's width: they follow it)
        return
    first, second = cut.nodes
    first.input[2] = const([k], first.input[2])
    second.input[1] = const([k], second.input[1])
    ends = next((numpy_helper.to_array(t) for t in graph.initializer if t.name == second.input[2]), None)
    if ends is None or int(ends.reshape(-1)[0]) < 2 * f:  # (an end past the data stays where it is)
        second.input[2] = const([2 * k], second.input[2])


def _reads(model: onnx.ModelProto, name: str) -> int:
    return sum(1 for g in iter_graphs(model.graph) for n in g.node for i in n.input if i == name)


def _drop_constant(graph: onnx.GraphProto, name: str) -> None:
    """Remove the initializer or Constant node ``name`` (nothing reads it)."""
    if name in {o.name for o in graph.output}:
        return
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name == name:
            del graph.initializer[i]
    for i in reversed(range(len(graph.node))):
        if graph.node[i].op_type == "Constant" and list(graph.node[i].output) == [name]:
            del graph.node[i]


@dataclass
class Rewritten(StageResult):
    """The rewritten model, and the names of each factorized group's two factors.

    Attributes:
        model: The model with every chosen weight replaced (the pipeline's working copy, edited
            in place: a large model is not copied).
        data: Where its external data resolves (the input's folder, and the spill file the
            factors went to when the input kept its data outside).
        factors: Per weight-group key, the names of its two factors (or Conv kernels).
        before, before_data: A copy of the model as it was, kept only for the latency check.
    """

    model: onnx.ModelProto
    data: io.DataFiles
    factors: dict[int, tuple[str, str]] = field(default_factory=dict)
    before: onnx.ModelProto | None = None
    before_data: io.DataFiles | None = None


class Rewrite(Step):
    """Replace every weight with a chosen rank by its factors (not in a dry run)."""

    name = "rewrite"
    changes_model = True

    def applies(self, ctx: Context) -> bool:
        return not ctx.request.dry_run

    def run(self, ctx: Context) -> Rewritten:
        model, data = ctx.model, ctx.data
        before = None
        if ctx.config.latency_aware:
            before = onnx.ModelProto()
            before.CopyFrom(model)
        if data.spill is None and data.base_dir is not None and io.uses_external_data(model):
            # the input keeps its weights outside: so do the factors, written as they are made
            data = io.DataFiles(data.base_dir, data.label, io.Spill())
        names = NameScope(model)
        for plan in {p.block.up.key: p for p in current_widths(ctx).values()}.values():
            narrow_block(model, plan, data, names)
        plans = ctx.need(Spectra).plans
        refits = ctx.get(Refits)
        factors = {}
        for key, d in ctx.latest(Decided).decisions.items():
            if not d.factorize:
                continue
            plan = plans[key]
            refit = refits.factors.get(key) if refits is not None else None
            if refit is not None and refit[0].shape[1] == d.rank:
                a, b = (np.ascontiguousarray(f, dtype=plan.dtype) for f in refit)
            else:
                a, b = linalg.factors(plan.view(d.mode).spectrum, d.rank, dtype=plan.dtype)
            if plan.is_conv:
                first, second = linalg.conv_kernels(a, b, plan.weight_shape, d.mode)
                factors[key] = factorize_conv_group(model, plan.group, first, second, d.mode, names, data.spill)
            else:
                factors[key] = factorize_group(model, plan.group, a, b, names, data.spill)
        return Rewritten(model, data, factors, before, ctx.data if before is not None else None)
