"""Running a model over calibration feeds: one loop for every stage that needs activations.

:func:`capture` makes the requested values extra outputs of a copy of the model, optionally
lets named weights be replaced at run time (they become graph inputs with their stored value as
default), and hands each feed's values to a callback, so that statistics are accumulated batch
by batch and no activation is held beyond one batch.  :func:`run_all` runs a session's outputs
over every feed and joins them along the sample axis.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from .. import io
from ..errors import CalibrationError, option
from .session import session

__all__ = ["Feeds", "Progress", "expose", "overridable", "run_all", "capture"]

#: Calibration feeds: a re-iterable of ``{input name: array}``.
Feeds = Iterable[Mapping[str, np.ndarray]]
#: ``progress(done, total, label)``; ``total`` is 0 when unknown.
Progress = Callable[[int, int, str], None]


def expose(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, str]:
    """Make the values ``names`` graph outputs of ``model`` (in place); per name, the output to
    fetch it by.

    Graph inputs are left out: their values are the feed's own.  A value computed inside an If
    branch (at any depth of Ifs) is threaded out: it becomes an output of its branch, the other
    branch gives an empty tensor of the same type and rank in its place (a run that takes that
    branch fetches it empty), and the If node gets an output for it, up to the main graph.  Values
    inside Loop and Scan bodies, whose outputs are stacked or carried, are left out.
    """
    graph = model.graph
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    wanted = set(names) - inputs
    owners = io.body_owners(graph)
    made: dict[str, list] = {}  # a value computed in a body -> the nodes holding that body
    for body, chain in owners.values():
        for node in body.node:
            for o in node.output:
                if o in wanted:
                    made[o] = chain
    main = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer}
    fetch: dict[str, str] = {}
    used = _names(model) if made else set()
    types = _value_types(model) if made else {}
    for name in sorted(wanted):
        if name not in made:
            if name not in main:
                continue  # (a body's input or initializer: not fetchable)
            if name not in outputs:
                graph.output.append(onnx.ValueInfoProto(name=name))
            fetch[name] = name
            continue
        chain = made[name]
        if any(node.op_type != "If" or node.domain not in ("", "ai.onnx") for _, node, _ in chain):
            continue
        elem, rank = types.get(name, (onnx.TensorProto.FLOAT, None))
        current = name
        for _, node, attr in reversed(chain):
            branches = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
            for branch_name, branch in branches.items():
                if branch_name == attr:
                    branch.output.append(helper.make_tensor_value_info(current, elem, None if rank is None else [None] * rank))
                else:  # the other branch: an empty tensor of the same type and rank
                    empty = _fresh(used, f"{current}__empty")
                    dims = [0] * (rank or 1)
                    branch.node.append(helper.make_node("Constant", [], [empty], value=helper.make_tensor(empty, elem, dims, [])))
                    branch.output.append(helper.make_tensor_value_info(empty, elem, dims))
            out = _fresh(used, f"{name}__exposed")
            node.output.append(out)
            current = out
        graph.output.append(helper.make_tensor_value_info(current, elem, None if rank is None else [None] * rank))
        fetch[name] = current
    return fetch


def _names(model: onnx.ModelProto) -> set[str]:
    used: set[str] = set()
    for g in io.iter_graphs(model.graph):
        used |= {t.name for t in g.initializer} | {v.name for v in (*g.input, *g.output, *g.value_info)}
        for n in g.node:
            used |= set(n.input) | set(n.output)
    return used


def _fresh(used: set[str], base: str) -> str:
    name, k = base, 1
    while name in used:
        name, k = f"{base}_{k}", k + 1
    used.add(name)
    return name


def _value_types(model: onnx.ModelProto) -> dict[str, tuple[int, int | None]]:
    """Element type and rank of the values shape inference (and the model's annotations) know."""
    out: dict[str, tuple[int, int | None]] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # (a model onnxruntime runs may still trip inference; what the annotations say stands)
        inferred = model
    for m in (model, inferred):
        for g in io.iter_graphs(m.graph):
            for v in (*g.input, *g.output, *g.value_info):
                t = v.type.tensor_type
                if v.type.HasField("tensor_type") and t.elem_type:
                    out[v.name] = (t.elem_type, len(t.shape.dim) if t.HasField("shape") else out.get(v.name, (0, None))[1])
    return out


def overridable(model: onnx.ModelProto, weights: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` in which the named main-graph weights are also graph inputs.

    A run that feeds such an input uses the fed array instead of the stored weight; a run that
    does not uses the stored one.  Constant-node weights become initializers first.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    g = probe.graph
    inputs = {i.name for i in g.input}
    wanted = set(weights)
    for k in range(len(g.node) - 1, -1, -1):
        node = g.node[k]
        if node.op_type == "Constant" and node.output[0] in wanted:
            t = onnx.TensorProto()
            t.CopyFrom(next(a.t for a in node.attribute if a.name == "value"))
            t.name = node.output[0]
            g.initializer.append(t)
            del g.node[k]
    if probe.ir_version < 4:
        probe.ir_version = 4
    for t in g.initializer:
        if t.name in wanted and t.name not in inputs:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return probe


def _run(sess: Any, names: Sequence[str], feed: Mapping[str, np.ndarray], index: int, *, original: bool) -> list:
    """``sess.run``; a failure of the model as given, on calibration data that passed the input
    checks, is the data's: a CalibrationError with the runtime's first line."""
    try:
        return sess.run(list(names), dict(feed))
    except Exception as exc:  # onnxruntime raises its own exception types
        if not original:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CalibrationError(f"onnxruntime could not run the model on calibration feed {index}: {first}; the data fits the "
                               "declared inputs but not what the model does with them (token ids past the vocabulary? "
                               f"inputs of different lengths?); fix the {option('calib')} data.") from None


def run_all(sess: Any, feeds: Feeds, *, overrides: Mapping[str, np.ndarray] | None = None,
            names: Sequence[str] | None = None) -> list[np.ndarray]:
    """Run every feed (with ``overrides`` fed too) and join each output along the first axis."""
    names = list(names) if names else [o.name for o in sess.get_outputs()]
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for index, feed in enumerate(feeds, start=1):
        outs = _run(sess, names, {**dict(feed), **(overrides or {})}, index, original=not overrides)
        for i, o in enumerate(outs):
            parts[i].append(np.asarray(o))
    return [np.concatenate(p, axis=0) if p and p[0].ndim > 0 else np.stack(p) for p in parts]


def capture(
    model: onnx.ModelProto,
    values: Iterable[str],
    feeds: Feeds,
    each: Callable[[dict[str, np.ndarray], list[dict[str, np.ndarray]]], None],
    *,
    data: io.DataFiles | None = None,
    threads: int | None = None,
    overrides: Sequence[Mapping[str, np.ndarray]] = ({},),
    progress: Progress | None = None,
    label: str = "capturing activations",
) -> int:
    """Run ``model`` over ``feeds`` and hand the named ``values`` of each feed to ``each``.

    Args:
        model: The model (not modified: a copy gets the extra outputs).
        values: Names of the values to fetch (graph inputs are taken from the feed).
        feeds: Calibration feeds.
        each: Called as ``each(feed, [values under overrides[0], values under overrides[1], ...])``.
        data: Where the model's external data lives.
        threads: onnxruntime intra-op threads.
        overrides: Weight replacements, one run per entry and feed (``{}``: the stored weights).
        progress: Called after each feed.

    Returns:
        The onnxruntime runs made.

    Raises:
        CalibrationError: there were no feeds.
    """
    replaced = sorted({name for ov in overrides for name in ov})
    probe = overridable(model, replaced) if replaced else _copy(model)
    wanted = set(values)
    exposed = expose(probe, wanted)
    fetch = list(exposed.values())
    sess = session(probe, threads=threads, data=data)
    total = len(feeds) if hasattr(feeds, "__len__") else 0  # type: ignore[arg-type]
    runs = batches = 0
    for feed in feeds:
        feed = dict(feed)
        got = []
        for ov in overrides:
            fetched = dict(zip(exposed, _run(sess, fetch, {**feed, **ov}, batches + 1, original=not ov))) if fetch else {}
            got.append({**{k: np.asarray(v) for k, v in feed.items() if k in wanted}, **fetched})
            runs += 1
        each(feed, got)
        batches += 1
        if progress is not None:
            progress(batches, total, label)
    if batches == 0:
        raise CalibrationError(f"the calibration data holds no feeds; pass a non-empty {option('calib')}.")
    return runs


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
