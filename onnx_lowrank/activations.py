"""Input statistics of the candidate layers, captured with onnxruntime on calibration data.

For data-aware truncation (see :mod:`onnx_lowrank.decompose`) each weight needs
``G = sum X^T X`` over the rows of real input activations that meet it.  On a copy of the model
every needed activation tensor becomes an extra graph output; the calibration feeds run one at a
time and each batch's contribution is added to ``G`` in float64, so activations are never stored
beyond one batch.

Which rows, and which side of the stored matrix ``W`` (m, n) they meet, depends on the form:

==============================  ==================  =======================================
node                            feature axis of x   side of ``W`` (``G`` is k x k)
==============================  ==================  =======================================
``MatMul(x, W)``                last                left  (``x @ W``, k = m)
``MatMul(W, x)``                second to last      right (``W @ x``, k = n)
``Gemm(x, W)`` transA=0/1       last / first        left; right with transB=1 (``x @ W^T``)
``Gemm(W, x)`` transB=0/1       first / last        right; left with transA=1 (``W^T @ x``)
==============================  ==================  =======================================

Leading dimensions of N-D activations are flattened into rows.  With a padding mask input (e.g.
``attention_mask`` of shape ``[batch, seq]``), rows whose mask is 0 are left out of ``G`` for
every activation whose leading shape matches the mask.  A weight shared by several nodes sums
the statistics of all of them (they must meet it from the same side).  Layers inside If/Loop/Scan
bodies are not captured; they keep the plain SVD and say why.

Attention scores (``attention=True``): a projection whose output reaches one operand of a
``MatMul`` of two activations (the ``q k^T`` of attention) only through a bias ``Add``, scaling,
one ``Reshape`` that splits heads and ``Transpose``s, with no other consumer on the way, and whose
contracted axis there is the head dimension, is weighted on its output side by the other
operand's Gram per head (:mod:`onnx_lowrank.decompose`, "Output-side weighting").  The head
layout is not inferred from the graph but checked on the first batch: the operand, heads moved
back beside the channel axis, must equal the projection's output times a constant.  Anything
else (fused attention ops, Einsum, a layout that fails the check) keeps input-only whitening.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper

from . import io
from .discovery import Layer, WeightGroup
from .errors import CalibrationError, option
from .runtime import Feeds, Progress, capture, overridable  # overridable: re-exported for one release

__all__ = ["layer_side", "Capture", "capture_grams", "overridable", "RefitStats", "capture_refit_stats", "refit_factors", "refit_levels", "Feeds"]

log = logging.getLogger(__name__)



def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(helper.get_attribute_value(a))
    return default


def layer_side(layer: Layer) -> tuple[str, int]:
    """``(side, axis)``: the side of the stored weight the activation meets, and the axis of
    the activation input that holds the features (``-1`` or ``-2``)."""
    node = layer.node
    if node.op_type == "MatMul":
        return ("left", -1) if layer.weight_index == 1 else ("right", -2)
    ta, tb = _attr(node, "transA"), _attr(node, "transB")
    if layer.weight_index == 1:
        return ("right" if tb else "left"), (-2 if ta else -1)
    return ("left" if ta else "right"), (-1 if tb else -2)


def _rows(x: np.ndarray, axis: int, mask: np.ndarray | None) -> np.ndarray:
    """The activation rows of ``x`` (features on ``axis``) as a 2-D array, padded rows removed."""
    if x.ndim == 1:
        return x[None, :]
    if axis == -1 and mask is not None:
        keep = mask != 0
        if x.shape[:-1] == keep.shape:
            return x[keep]
        if x.ndim == 2 and x.shape[0] == keep.size:
            return x[keep.reshape(-1)]
    return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


@dataclass
class Capture:
    """What :func:`capture_grams` collected.

    Attributes:
        grams: Per weight group (by ``id``): ``(G, side)``.
        rows: Per weight group: activation rows accumulated.
        skipped: Per weight group: why no statistics were taken (the plain SVD is used).
        runs: onnxruntime ``run`` calls made.
        masked: Activation tensors the padding mask was applied to.
        out_grams: Per weight group: the output-side weight of an attention-score projection
            (``attention=True``; module docstring).
    """

    grams: dict[int, tuple[np.ndarray, str]] = field(default_factory=dict)
    rows: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    runs: int = 0
    masked: set[str] = field(default_factory=set)
    out_grams: dict[int, np.ndarray] = field(default_factory=dict)


def _mask_of(feed: Mapping[str, np.ndarray], mask_input: str | None) -> np.ndarray | None:
    """The padding mask of a feed (``--calib-mask``), or ``None`` when none was asked for."""
    if mask_input is None:
        return None
    if mask_input not in feed:
        raise CalibrationError(f"{option('calib_mask')} {mask_input}: not among the fed inputs {', '.join(sorted(feed))}.")
    return np.asarray(feed[mask_input])


def capture_grams(
    model: onnx.ModelProto,
    groups: list[WeightGroup],
    feeds: Feeds,
    source_dir: Path | None,
    *,
    mask_input: str | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    attention: bool = False,
) -> Capture:
    """Accumulate ``G`` for every group's weight over the calibration feeds (one pass).

    Args:
        model: The model (not modified; a copy gets the extra outputs).
        groups: The weight groups to capture.
        feeds: Calibration feeds.
        source_dir: Where the model's external data lives.
        mask_input: Name of an input whose zeros mark padded rows.
        threads: onnxruntime intra-op threads.
        progress: Called as ``progress(batches_done, total_or_0, "capturing activations")``.
        attention: Also take the output-side weight of attention-score projections, in the same
            pass (module docstring).

    Raises:
        CalibrationError: no feeds, or the mask input is not fed.
    """
    cap = Capture()
    plan, cap.skipped = _layer_inputs(groups, model.graph)
    wanted: dict[tuple[str, int], list[int]] = {}  # (activation, axis) -> groups using it
    for gid, (_, acts) in plan.items():
        for key in acts:
            wanted.setdefault(key, []).append(gid)
    if not plan:
        return cap

    scores = _score_operands(model.graph, [g for g in groups if id(g) in plan]) if attention else []
    extra = {name for op in scores for name in (op.operand, op.other, op.source)}
    heads = _HeadGrams(scores)
    sums: dict[tuple[str, int], np.ndarray] = {}
    counts: dict[tuple[str, int], int] = {}

    def add(feed: dict[str, np.ndarray], got: list[dict[str, np.ndarray]]) -> None:
        values = got[0]
        mask = _mask_of(feed, mask_input)
        for key in wanted:
            name, axis = key
            x = values[name]
            rows = _rows(x, axis, mask)
            if mask is not None and rows.shape[0] != int(np.prod(x.shape[:-1] if x.ndim > 1 else (1,))):
                cap.masked.add(name)
            r64 = rows.astype(np.float64, copy=False)
            g = r64.T @ r64
            sums[key] = sums[key] + g if key in sums else g
            counts[key] = counts.get(key, 0) + rows.shape[0]
        if scores:
            heads.add(values, mask)

    cap.runs = capture(model, {name for name, _ in wanted} | extra, feeds, add, data=io.DataFiles(source_dir),
                       threads=threads, progress=progress)
    for gid, (side, acts) in plan.items():
        g = None
        for key in acts:
            g = sums[key] if g is None else g + sums[key]
        if g is None or not np.any(np.diag(g) > 0):
            cap.skipped[gid] = "data-aware: the calibration data never reaches this layer's input; plain SVD used"
            continue
        cap.grams[gid] = (g, side)
        cap.rows[gid] = sum(counts[k] for k in acts)
    users = {id(g): len(g.layers) for g in groups}
    cap.out_grams = {gid: h for gid, h in heads.result(users).items() if gid in cap.grams}
    log.info("captured input statistics of %d weight(s) in %d run(s)", len(cap.grams), cap.runs)
    if attention:
        log.info("attention scores: %d projection(s) weighted on their output side", len(cap.out_grams))
    return cap


@dataclass(frozen=True)
class ScoreOperand:
    """One operand of a ``MatMul`` of two activations that a projection's output reaches.

    Attributes:
        group: ``id`` of the projection's weight group.
        layer: The projection node's output.
        operand: The operand's value name; ``other`` the other operand's.
        index: 0 when ``operand`` is the first input (contracted on its last axis), 1 when it
            is the second (contracted on its second to last).
        source: The value the head split starts from (the projection's output after its bias):
            the operand must equal it, heads moved back, times a constant.
    """

    group: int
    layer: str
    operand: str
    other: str
    index: int
    source: str


_SCORE_PASS = {"Identity", "Cast", "Transpose"}


def _score_operands(graph: onnx.GraphProto, groups: list[WeightGroup]) -> list[ScoreOperand]:
    """Every operand of a two-activation ``MatMul`` that a MatMul/Gemm group's output reaches
    through a bias ``Add``, scaling (``Mul``/``Div`` by another value: the layout check on the
    data tells a scalar from anything else), at most one ``Reshape`` that splits the channel axis,
    and ``Transpose``s that leave the head dimension on the contracted axis.  Every value on the
    way has no other consumer (``Shape`` aside): a projection whose output also goes elsewhere is
    not weighed by the scores alone."""
    producer = {o: n for n in graph.node for o in n.output}
    consts = {t.name: tuple(t.dims) for t in graph.initializer}
    consts.update({n.output[0]: tuple(a.t.dims) for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"})
    layer_out = {layer.node.output[0]: id(g) for g in groups for layer in g.layers
                 if layer.graph is graph and not layer.is_conv and layer.node.output}
    consumers: dict[str, int] = {o.name: 1 for o in graph.output}
    for n in graph.node:
        if n.op_type != "Shape":
            for i in set(n.input):
                consumers[i] = consumers.get(i, 0) + 1

    def trace(name: str, path: list[onnx.NodeProto], depth: int = 0) -> tuple[int, str, list[onnx.NodeProto]] | None:
        """Walk back from ``name`` to a projection's output; ``path`` collects the nodes (last first)."""
        if depth > 16 or consumers.get(name, 0) != 1:
            return None
        if name in layer_out:
            return layer_out[name], name, path
        node = producer.get(name)
        if node is None or not node.input:
            return None
        op = node.op_type
        if op in _SCORE_PASS or (op == "Reshape" and not any(n.op_type == "Reshape" for n in path)):
            return trace(node.input[0], path + [node], depth + 1)
        if op in ("Mul", "Div", "Add") and len(node.input) == 2:
            # follow the operand that is not a constant; with two activations try each in turn
            # (the numeric layout check rejects a factor that is not a scalar)
            order = [0, 1] if op != "Div" else [0]
            for k in order:
                if node.input[k] in consts and op != "Add":
                    continue
                if op == "Add" and (node.input[1 - k] not in consts):
                    continue  # a bias is a constant; the sum of two activations is not a scaling
                hit = trace(node.input[k], path + [node], depth + 1)
                if hit is not None:
                    return hit
        return None

    def head_axis_ok(path: list[onnx.NodeProto], index: int) -> tuple[bool, str | None]:
        """Replay the path forward: where the head dimension ends up, and the layout-check source."""
        pos, source = -1, None  # the head dimension's axis, counted from the end
        for node in reversed(path):  # forward order
            if node.op_type == "Reshape":
                pos, source = -1, node.input[0]  # the channel axis splits into (heads, dim): dim last
            elif node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                if perm is None or not -len(perm) <= pos < 0:
                    return False, None
                pos = perm.index(len(perm) + pos) - len(perm)
            elif node.op_type == "Add" and source is None:
                source = node.output[0]
        return pos == (-1 if index == 0 else -2), source

    found = []
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.output[0] in layer_out:
            continue
        if any(i in consts or not i for i in node.input):
            continue
        for index in (0, 1):
            hit = trace(node.input[index], [])
            if hit is None:
                continue
            gid, layer, path = hit
            ok, source = head_axis_ok(path, index)
            if ok:
                found.append(ScoreOperand(gid, layer, node.input[index], node.input[1 - index], index, source or layer))
    return found


def _as_heads(x: np.ndarray, contracted: int) -> np.ndarray | None:
    """``x`` with its contracted axis last, as ``(batch, heads, rows, dim)``; ``None`` otherwise."""
    x = np.moveaxis(x, contracted, -1)
    if x.ndim == 3:
        return x[:, None]
    return x if x.ndim == 4 else None


def _layout_matches(op4: np.ndarray, source: np.ndarray) -> bool:
    """Whether ``op4`` (batch, heads, rows, dim), heads moved back beside ``dim``, is ``c * source``."""
    b, h, t, d = op4.shape
    if source.size != op4.size or source.shape[-1] != h * d:
        return False
    y = op4.transpose(0, 2, 1, 3).reshape(-1, h * d).astype(np.float64)
    z = source.reshape(-1, h * d).astype(np.float64)
    zz = float(np.vdot(z, z))
    if zz == 0.0:
        return False
    c = float(np.vdot(y, z)) / zz
    return c != 0.0 and float(np.linalg.norm(y - c * z)) <= 1e-3 * float(np.linalg.norm(y))


class _HeadGrams:
    """Accumulates, per score operand, the other operand's Gram per head (``attention=True``)."""

    def __init__(self, scores: list[ScoreOperand]):
        self.scores = scores
        self.sums: dict[int, np.ndarray] = {}
        self.bad: set[int] = set()

    def add(self, values: Mapping[str, np.ndarray], mask: np.ndarray | None) -> None:
        for k, op in enumerate(self.scores):
            if k in self.bad:
                continue
            raw_x, raw_o = np.asarray(values[op.operand]), np.asarray(values[op.other])
            x = _as_heads(raw_x, -1 if op.index == 0 else -2)
            o = _as_heads(raw_o, -2 if op.index == 0 else -1)
            # same rank (a 3-D operand against a 4-D one broadcasts over heads, not batch); the other
            # side has as many heads, or one (multi-query keys), or this side has one (its keys serve all)
            if (x is None or o is None or raw_x.ndim != raw_o.ndim or o.shape[-1] != x.shape[-1]
                    or not (o.shape[1] == x.shape[1] or 1 in (o.shape[1], x.shape[1]))
                    or (k not in self.sums and not _layout_matches(x, np.asarray(values[op.source])))):
                self.bad.add(k)
                self.sums.pop(k, None)
                continue
            g = np.zeros((x.shape[1], x.shape[-1], x.shape[-1]))
            for h in range(x.shape[1]):
                rows = o[:, h] if o.shape[1] == x.shape[1] else o[:, 0] if o.shape[1] == 1 else o  # (b, [heads,] rows, dim)
                if mask is not None and mask.shape == (rows.shape[0], rows.shape[-2]):
                    keep = mask != 0
                    rows = rows[keep] if rows.ndim == 3 else np.moveaxis(rows, 1, 0)[:, keep]
                r64 = rows.reshape(-1, rows.shape[-1]).astype(np.float64)
                g[h] = r64.T @ r64
            self.sums[k] = self.sums[k] + g if k in self.sums else g

    def result(self, users: Mapping[int, int]) -> dict[int, np.ndarray]:
        """Per group: the block-diagonal output Gram, for groups whose every user was matched and
        every score operand passed the checks."""
        failed = {op.group for k, op in enumerate(self.scores) if k not in self.sums}
        matched: dict[int, set[str]] = {}
        out: dict[int, np.ndarray] = {}
        for k, op in enumerate(self.scores):
            matched.setdefault(op.group, set()).add(op.layer)
            if op.group in failed:
                continue
            blocks = self.sums[k]
            h, d, _ = blocks.shape
            full = np.zeros((h * d, h * d))
            for i in range(h):
                full[i * d:(i + 1) * d, i * d:(i + 1) * d] = blocks[i]
            out[op.group] = out[op.group] + full if op.group in out else full
        return {gid: g for gid, g in out.items() if len(matched[gid]) == users.get(gid, 0)}


@dataclass
class RefitStats:
    """Statistics for the least-squares refit (see :func:`onnx_lowrank.linalg.refit_factor`).

    Attributes:
        grams: Per weight group (by ``id``): ``(G~, side)``, the Gram matrix of the inputs the
            layer receives in the compressed model.
        cross: Per weight group: ``C``, their cross product with the original model's inputs.
        runs: onnxruntime ``run`` calls made (two per feed: original and compressed).
    """

    grams: dict[int, tuple[np.ndarray, str]] = field(default_factory=dict)
    cross: dict[int, np.ndarray] = field(default_factory=dict)
    runs: int = 0


def _layer_inputs(groups: list[WeightGroup], graph: onnx.GraphProto
                  ) -> tuple[dict[int, tuple[str, list[tuple[str, int]]]], dict[int, str]]:
    """Per group ``id``: the side its users meet the weight from and their ``(activation, axis)``
    inputs; and, for the groups left out, why (the plain SVD is used for them)."""
    plan: dict[int, tuple[str, list[tuple[str, int]]]] = {}
    skipped: dict[int, str] = {}
    for group in groups:
        if any(layer.graph is not graph for layer in group.layers):
            skipped[id(group)] = "data-aware: the layer is inside a subgraph, whose activations are not captured; plain SVD used"
            continue
        sides = {layer_side(layer)[0] for layer in group.layers}
        if len(sides) != 1:
            skipped[id(group)] = "data-aware: the weight's users meet it from different sides; plain SVD used"
            continue
        plan[id(group)] = (sides.pop(), [(l.node.input[1 - l.weight_index], layer_side(l)[1]) for l in group.layers])
    return plan, skipped


def capture_refit_stats(
    model: onnx.ModelProto,
    groups: list[WeightGroup],
    replaced: Mapping[str, np.ndarray],
    feeds: Feeds,
    source_dir: Path | None,
    *,
    mask_input: str | None = None,
    threads: int | None = None,
) -> RefitStats:
    """Accumulate ``G~ = X~^T X~`` and ``C = X~^T X`` for every group, streaming in float64.

    Every feed runs twice through one session: once with the stored weights (``X``, the
    original inputs) and once with the weights in ``replaced`` fed instead (``X~``, the inputs
    of the compressed model).  The rows of both come from the same tokens, so padded rows are
    dropped from both alike.

    Args:
        model: The original model (not modified).
        groups: The weight groups to collect statistics for (main graph only; a group whose
            users meet it from different sides is left out).
        replaced: Weight name -> the dense product of its factors, for every compressed weight.
        feeds: Calibration feeds.
        source_dir: Where the model's external data lives.
        mask_input: Name of an input whose zeros mark padded rows.
        threads: onnxruntime intra-op threads.

    Raises:
        CalibrationError: no feeds, or the mask input is not fed.
    """
    stats = RefitStats()
    plan, _ = _layer_inputs(groups, model.graph)
    if not plan:
        return stats
    keys = sorted({key for _, acts in plan.values() for key in acts})
    gsum: dict[tuple[str, int], np.ndarray] = {}
    csum: dict[tuple[str, int], np.ndarray] = {}
    overrides = {k: np.asarray(v) for k, v in replaced.items()}

    def add(feed: dict[str, np.ndarray], got: list[dict[str, np.ndarray]]) -> None:
        orig, comp = got
        mask = _mask_of(feed, mask_input)
        for key in keys:
            name, axis = key
            x = _rows(orig[name], axis, mask).astype(np.float64)
            xt = _rows(comp[name], axis, mask).astype(np.float64)
            g, c = xt.T @ xt, xt.T @ x
            gsum[key] = gsum[key] + g if key in gsum else g
            csum[key] = csum[key] + c if key in csum else c

    stats.runs = capture(model, {name for name, _ in keys}, feeds, add,
                         data=io.DataFiles(source_dir), threads=threads, overrides=({}, overrides))
    for gid, (side, acts) in plan.items():
        stats.grams[gid] = (sum(gsum[k] for k in acts), side)
        stats.cross[gid] = sum(csum[k] for k in acts)
    return stats


def refit_levels(graph: onnx.GraphProto, groups: list[WeightGroup]) -> dict[int, int]:
    """Per group ``id``: 0 when no other group's layer lies upstream of its inputs, else one more
    than the deepest such group.  Layers of one level do not feed each other."""
    node_of = {id(layer.node): (id(g), layer) for g in groups for layer in g.layers}
    upstream: dict[str, frozenset[int]] = {}
    level: dict[int, int] = {}
    for node in graph.node:  # ONNX nodes are stored in topological order
        up = frozenset().union(*(upstream.get(name, frozenset()) for name in node.input if name))
        hit = node_of.get(id(node))
        if hit is not None:
            gid, layer = hit
            act = node.input[1 - layer.weight_index]
            before = upstream.get(act, frozenset()) - {gid}
            level[gid] = max(level.get(gid, 0), 1 + max((level.get(u, 0) for u in before), default=-1))
            up = up | {gid}
        for name in node.output:
            upstream[name] = up
    return {id(g): level.get(id(g), 0) for g in groups}


def refit_factors(
    model: onnx.ModelProto,
    groups: list[WeightGroup],
    factors: Mapping[int, tuple[np.ndarray, np.ndarray]],
    weights: Mapping[int, np.ndarray],
    feeds: Feeds,
    source_dir: Path | None,
    *,
    passes: int = 1,
    both: bool = False,
    sequential: bool = False,
    damping: float = 0.01,
    mask_input: str | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    output_only: Iterable[int] = (),
) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], int]:
    """Refit the output-side factor of every compressed layer on propagated activations.

    Each pass collects :class:`RefitStats` with every layer at its current factors, then
    refits all layers at once (:func:`onnx_lowrank.linalg.refit_factor`).  After ``p``
    passes a layer with at most ``p - 1`` compressed layers upstream of it has seen inputs
    from the refitted ones; the rest approach that as the passes repeat.

    Args:
        model: The original model (not modified).
        groups: The weight groups that ``factors`` belong to.
        factors: Per group ``id``: ``(A, B)`` from truncation.
        weights: Per group ``id``: the original matrix ``W`` (m, n).
        feeds: Calibration feeds (re-iterable).
        source_dir: Where the model's external data lives.
        passes: Statistics passes (each two onnxruntime runs per feed); ignored when
            ``sequential``.
        sequential: Refit level by level in graph order (:func:`refit_levels`), so every
            layer sees the inputs of the already refitted layers before it: one statistics
            pass per level instead of per ``passes``.
        both: Refit both factors (:func:`~onnx_lowrank.linalg.refit_lowrank`) instead of
            the output-side one only.
        output_only: Groups (by ``id``) that refit only the output-side factor even with
            ``both``: those truncated with an output-side weight (attention-aware), whose
            input-side factor the unweighted refit of both would undo.  The output-side refit
            does not depend on that weight.
        damping: Relative damping of ``G~``.
        mask_input: Name of an input whose zeros mark padded rows.
        threads: onnxruntime intra-op threads.
        progress: Called as ``progress(pass_done, passes, "refitting factors")``.

    Returns:
        ``(factors, runs)``: the refitted factors (cast to each weight's dtype) for every group
        that could be refitted, the others unchanged; and the onnxruntime runs made.
    """
    from .linalg import refit_factor, refit_lowrank

    by_id = {id(g): g for g in groups if id(g) in factors}
    keep_input = set(output_only)
    current = {gid: (np.asarray(a), np.asarray(b)) for gid, (a, b) in factors.items()}
    runs = 0
    if sequential:
        levels = refit_levels(model.graph, list(by_id.values()))
        steps = [[by_id[g] for g in by_id if levels[g] == k] for k in sorted(set(levels.values()))]
    else:
        steps = [list(by_id.values())] * max(1, int(passes))
    for k, todo in enumerate(steps):
        replaced = {}
        for gid, (a, b) in current.items():
            w = weights[gid]
            replaced[by_id[gid].weight.name] = (a.astype(np.float64) @ b.astype(np.float64)).astype(w.dtype)
        stats = capture_refit_stats(model, todo, replaced, feeds, source_dir, mask_input=mask_input, threads=threads)
        runs += stats.runs
        for gid, (g, side) in stats.grams.items():
            w = weights[gid]
            pair = both and gid not in keep_input
            try:
                if pair:
                    a, b = refit_lowrank(w, g, stats.cross[gid], factors[gid][0].shape[1], side, damping)
                else:
                    a, b = refit_factor(*factors[gid], w, g, stats.cross[gid], side, damping)
            except ValueError as exc:
                log.warning("refit of %s skipped: %s", by_id[gid].weight.name, exc)
                continue
            if pair:
                current[gid] = (a.astype(w.dtype), b.astype(w.dtype))
            elif side == "left":
                current[gid] = (np.asarray(factors[gid][0]), b.astype(w.dtype))
            else:
                current[gid] = (a.astype(w.dtype), np.asarray(factors[gid][1]))
        if progress is not None:
            progress(k + 1, len(steps), "refitting factors")
    log.info("refitted %d layer(s) in %d pass(es), %d run(s)", len(current), len(steps), runs)
    return current, runs
