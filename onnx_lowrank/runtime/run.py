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

__all__ = ["Feeds", "Progress", "expose", "overridable", "main_constants", "run_all", "capture"]

#: Calibration feeds: a re-iterable of ``{input name: array}``.
Feeds = Iterable[Mapping[str, np.ndarray]]
#: ``progress(done, total, label)``; ``total`` is 0 when unknown.
Progress = Callable[[int, int, str], None]


def expose(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, list[str]]:
    """Make the values ``names`` graph outputs of ``model`` (in place); per name, the outputs to
    fetch it by (:func:`fetched` joins what they give).

    Graph inputs are left out: their values are the feed's own.  A value computed inside If
    branches (at any depth of Ifs) is threaded out from every branch that computes a value of
    that name (sibling branches may reuse names, as an optimum merged decoder's do): it becomes
    an output of its branch, the other branch gives an empty tensor of the same type and rank in
    its place (a run that takes that branch fetches it empty), and the If node gets an output for
    it, up to the main graph.  Values inside Loop and Scan bodies, whose outputs are stacked or
    carried, and values whose element type cannot be told, are left out.
    """
    from ..shapes import value_shapes

    graph = model.graph
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    wanted = set(names) - inputs
    made: dict[str, list[tuple[onnx.GraphProto, list]]] = {}  # a value computed in bodies -> (body, nodes holding it)
    for body, chain in io.body_owners(graph):
        for node in body.node:
            for o in node.output:
                if o in wanted:
                    made.setdefault(o, []).append((body, chain))
    main = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer}
    fetch: dict[str, list[str]] = {}
    fresh = io.NameScope(model).fresh if made else None
    info = value_shapes(model) if made else None
    for name in sorted(wanted):
        if name in main:
            if name not in outputs:
                graph.output.append(onnx.ValueInfoProto(name=name))
            fetch[name] = [name]
            continue
        for body, chain in made.get(name, []):
            if any(node.op_type != "If" or node.domain not in ("", "ai.onnx") for _, node, _ in chain):
                continue
            shape = info.get(name)
            rank = len(shape) if shape is not None else None
            elem = info.types.get(name) or _reader_type(body, name, info.types)
            if elem is None:
                continue  # (a dummy of a guessed type would break the model)
            current = name
            for _, node, attr in reversed(chain):
                for a in node.attribute:
                    if a.type != onnx.AttributeProto.GRAPH:
                        continue
                    branch = a.g
                    if a.name == attr:
                        if current in {o.name for o in branch.output}:  # (already returned: return a copy too)
                            copy = fresh(f"{current}__copy")
                            branch.node.append(helper.make_node("Identity", [current], [copy]))
                            current = copy
                        branch.output.append(helper.make_tensor_value_info(current, elem, None if rank is None else [None] * rank))
                    else:  # the other branch: an empty tensor of the same type and rank
                        empty = fresh(f"{name}__empty")
                        dims = [0] * (rank or 1)
                        branch.node.append(helper.make_node("Constant", [], [empty], value=helper.make_tensor(empty, elem, dims, [])))
                        branch.output.append(helper.make_tensor_value_info(empty, elem, dims))
                out = fresh(f"{name}__exposed")
                node.output.append(out)
                current = out
            graph.output.append(helper.make_tensor_value_info(current, elem, None if rank is None else [None] * rank))
            fetch.setdefault(name, []).append(current)
    return fetch


def fetched(values: Sequence[np.ndarray]) -> np.ndarray:
    """One value from what its outputs gave (:func:`expose`): the non-empty ones, joined along the
    first axis when a value of that name was computed on several paths of a run."""
    full = [np.asarray(v) for v in values if v is not None and np.size(v)]
    if not full:
        return np.asarray(values[0]) if values and values[0] is not None else np.zeros((0,), np.float32)
    if len(full) == 1:
        return full[0]
    return np.concatenate([v.reshape(-1, *v.shape[1:]) for v in full], axis=0)


def _reader_type(body: onnx.GraphProto, name: str, types: Mapping[str, int]) -> int | None:
    """The element type of ``name`` from a MatMul/Gemm that reads it with a typed operand (the
    two share their type), where inference could not tell it."""
    for node in body.node:
        if name in node.input and node.op_type in ("MatMul", "Gemm"):
            for other in node.input[:2]:
                if other != name and types.get(other):
                    return types[other]
    return None


def main_constants(model: onnx.ModelProto) -> set[str]:
    """Names of the main graph's constants (initializers and Constant nodes): what one session
    can take in place of the stored values (:func:`overridable`)."""
    return {t.name for t in model.graph.initializer} | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}


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
    fetch = [f for outs in exposed.values() for f in outs]
    sess = session(probe, threads=threads, data=data)
    total = len(feeds) if hasattr(feeds, "__len__") else 0  # type: ignore[arg-type]
    runs = batches = 0
    for feed in feeds:
        feed = dict(feed)
        got = []
        for ov in overrides:
            got_all = dict(zip(fetch, _run(sess, fetch, {**feed, **ov}, batches + 1, original=not ov))) if fetch else {}
            values = {name: fetched([got_all[f] for f in outs]) for name, outs in exposed.items()}
            got.append({**{k: np.asarray(v) for k, v in feed.items() if k in wanted}, **values})
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
