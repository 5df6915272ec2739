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
the statistics of all of them (they must meet it from the same side).  Layers inside If branches
are captured too (their activations are threaded out as outputs of the branches and the If; a
run that takes the other branch adds no rows); those inside Loop/Scan bodies or functions are
not, and keep the plain SVD and say why.

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

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
from onnx import helper

from onnx_lowrank import io
from onnx_lowrank.pipeline import Context, StageResult, Step

from .calibrate import Calibration
from .discover import Discovery, Layer, WeightGroup
from onnx_lowrank.errors import CalibrationError, option
from onnx_lowrank.runtime import Feeds, Progress, capture
from onnx_lowrank.runtime.executor import Executor

__all__ = ["layer_side", "Capture", "capture_grams", "Statistics", "CaptureStatistics", "layer_inputs"]

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
        grams: Per weight group (by its ``key``): ``(G, side)``.
        rows: Per weight group: activation rows accumulated.
        skipped: Per weight group: why no statistics were taken (the plain SVD is used).
        runs: onnxruntime ``run`` calls made.
        masked: Activation tensors the padding mask was applied to.
        out_grams: Per weight group: the output-side weight of an attention-score projection
            (``attention=True``; module docstring).
        row_sums: Per weight group: the sum of its activation rows (``X^T 1``, the same rows
            as ``G``), for fits with an intercept.
    """

    grams: dict[int, tuple[np.ndarray, str]] = field(default_factory=dict)
    rows: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    runs: int = 0
    masked: set[str] = field(default_factory=set)
    out_grams: dict[int, np.ndarray] = field(default_factory=dict)
    row_sums: dict[int, np.ndarray] = field(default_factory=dict)


def _mask_of(feed: Mapping[str, np.ndarray], mask_input: str | None) -> np.ndarray | None:
    """The padding mask of a feed (``--calib-mask``), or ``None`` when none was asked for."""
    if mask_input is None:
        return None
    if mask_input not in feed:
        raise CalibrationError(f"{option('calib_mask')} {mask_input}: not among the fed inputs {', '.join(sorted(feed))}; "
                               f"name the input that holds the padding mask, or drop {option('calib_mask')}.")
    return np.asarray(feed[mask_input])


def capture_grams(
    model: onnx.ModelProto,
    groups: list[WeightGroup],
    feeds: Feeds,
    data: io.DataFiles | Path | None,
    *,
    mask_input: str | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    attention: bool = False,
    executor: Executor | None = None,
) -> Capture:
    """Accumulate ``G`` for every group's weight over the calibration feeds (one pass).

    The sums add up over shards of the feeds: an ``executor`` with several workers gives each a
    shard and adds their sums.

    Args:
        model: The model (not modified; a copy gets the extra outputs).
        groups: The weight groups to capture.
        feeds: Calibration feeds.
        data: Where the model's external data lives (its :class:`~onnx_lowrank.io.DataFiles` or folder).
        mask_input: Name of an input whose zeros mark padded rows.
        threads: onnxruntime intra-op threads.
        progress: Called as ``progress(batches_done, total_or_0, "capturing activations")``.
        attention: Also take the output-side weight of attention-score projections, in the same
            pass (module docstring).
        executor: Where the shards run (:mod:`onnx_lowrank.runtime.executor`; default: here).

    Raises:
        CalibrationError: no feeds, or the mask input is not fed.
    """
    cap = Capture()
    plan, cap.skipped = layer_inputs(groups, model.graph, if_branches=True)
    wanted: dict[tuple[str, int], list[int]] = {}  # (activation, axis) -> groups using it
    for gid, (_, acts) in plan.items():
        for key in acts:
            wanted.setdefault(key, []).append(gid)
    if not plan:
        return cap

    scores = _score_operands(model.graph, [g for g in groups if g.key in plan]) if attention else []
    folder = io.as_data(data)
    spec = _ShardSpec(None, folder, sorted(wanted), scores, mask_input, threads)
    if executor is None or executor.workers == 1:
        part = _accumulate(spec, feeds, model=model, progress=progress)  # streaming, here
    else:
        shards = _shards([dict(f) for f in feeds], executor.workers)
        spec = dataclasses.replace(spec, model=model.SerializeToString())
        part = _Sums.total(executor.run(_shard_setup, _shard_task, spec, shards,
                                        lambda done, total: progress(done, total, "capturing activations") if progress else None))
    if part.runs == 0:
        raise CalibrationError(f"the calibration data holds no feeds; pass a non-empty {option('calib')}.")
    if mask_input is not None:
        if part.mask_kept == 0:
            raise CalibrationError(f"{option('calib_mask')} {mask_input}: zero everywhere, so every row would be left out; pass "
                                   "the padding mask whose nonzero entries mark the real positions (for a text model, "
                                   "attention_mask).")
        if not part.mask_fits:
            raise CalibrationError(f"{option('calib_mask')} {mask_input}: its shape {list(part.mask_shape or ())} matches the "
                                   "leading dimensions of no layer input it should mask; pass the padding mask of shape "
                                   "[batch, sequence], or drop the option.")
    for (name, _), g in part.sums.items():  # NaN or Inf in any row reaches its sum (checked once, not per batch)
        if not np.all(np.isfinite(g)):
            raise CalibrationError(f"the input of a layer ('{name}') holds NaN or Inf on the calibration data, so no "
                                   f"statistics can be taken; check the calibration values (NaN inputs, scaling) or "
                                   f"pass other {option('calib')} data.")
    sums, counts, cap.masked, cap.runs = part.sums, part.counts, part.masked, part.runs
    heads = _HeadGrams(scores, part.head_sums, part.head_bad)
    for gid, (side, acts) in plan.items():
        g = None
        seen = [key for key in acts if key in sums]  # (an If branch no feed took has no sums)
        for key in seen:
            g = sums[key] if g is None else g + sums[key]
        if g is None or not np.any(np.diag(g) > 0):
            cap.skipped[gid] = "data-aware: the calibration data never reaches this layer's input; plain SVD used"
            continue
        cap.grams[gid] = (g, side)
        cap.rows[gid] = sum(counts[k] for k in seen)
        cap.row_sums[gid] = sum(part.row_sums[k] for k in seen)
    users = {g.key: len(g.layers) for g in groups}
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
    layer_out = {layer.node.output[0]: g.key for g in groups for layer in g.layers
                 if not layer.scope and not layer.is_conv and layer.node.output}
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

    def __init__(self, scores: list[ScoreOperand], sums: dict[int, np.ndarray] | None = None, bad: set[int] | None = None):
        self.scores = scores
        self.sums: dict[int, np.ndarray] = dict(sums or {})
        self.bad: set[int] = set(bad or ())

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


def layer_inputs(groups: list[WeightGroup], graph: onnx.GraphProto, *, if_branches: bool = False
                  ) -> tuple[dict[int, tuple[str, list[tuple[str, int]]]], dict[int, str]]:
    """Per group key: the side its users meet the weight from and their ``(activation, axis)``
    inputs; and, for the groups left out, why (the plain SVD is used for them).  Layers in bodies
    are left out, except, with ``if_branches``, those in If branches (whose activations
    :func:`~onnx_lowrank.runtime.expose` threads out)."""
    plan: dict[int, tuple[str, list[tuple[str, int]]]] = {}
    skipped: dict[int, str] = {}
    for group in groups:
        if any(layer.scope and not (if_branches and layer.in_if_branches) for layer in group.layers):
            skipped[group.key] = ("data-aware: the layer is inside a Loop/Scan body or a function, whose activations are not "
                                  "captured; plain SVD used" if if_branches else
                                  "data-aware: the layer is inside a subgraph, whose activations are not captured; plain SVD "
                                  "used")
            continue
        sides = {layer_side(layer)[0] for layer in group.layers}
        if len(sides) != 1:
            skipped[group.key] = "data-aware: the weight's users meet it from different sides; plain SVD used"
            continue
        # (two users reading one activation, as both branches of an If may, count its rows once)
        plan[group.key] = (sides.pop(), list(dict.fromkeys((l.node.input[1 - l.weight_index], layer_side(l)[1])
                                                           for l in group.layers)))
    return plan, skipped


@dataclass(frozen=True)
class _ShardSpec:
    """What a worker needs to capture statistics on a shard of the feeds (picklable)."""

    model: bytes | None
    data: io.DataFiles
    wanted: list[tuple[str, int]]
    scores: list[ScoreOperand]
    mask_input: str | None
    threads: int | None


@dataclass
class _Sums:
    """Gram sums over some feeds; the sums of two shards add up (:meth:`total`)."""

    sums: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    counts: dict[tuple[str, int], int] = field(default_factory=dict)
    row_sums: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    masked: set[str] = field(default_factory=set)
    head_sums: dict[int, np.ndarray] = field(default_factory=dict)
    head_bad: set[int] = field(default_factory=set)
    runs: int = 0
    #: With a padding mask: activations whose leading shape it matched, and the positions it keeps.
    mask_fits: set[str] = field(default_factory=set)
    mask_kept: int = 0
    mask_shape: tuple[int, ...] | None = None

    @staticmethod
    def total(parts: list["_Sums"]) -> "_Sums":
        out = _Sums()
        for p in parts:
            for k, g in p.sums.items():
                out.sums[k] = out.sums[k] + g if k in out.sums else g
            for k, c in p.counts.items():
                out.counts[k] = out.counts.get(k, 0) + c
            for k, v in p.row_sums.items():
                out.row_sums[k] = out.row_sums[k] + v if k in out.row_sums else v
            for k, h in p.head_sums.items():
                out.head_sums[k] = out.head_sums[k] + h if k in out.head_sums else h
            out.masked |= p.masked
            out.head_bad |= p.head_bad
            out.runs += p.runs
            out.mask_fits |= p.mask_fits
            out.mask_kept += p.mask_kept
            out.mask_shape = out.mask_shape or p.mask_shape
        out.head_sums = {k: h for k, h in out.head_sums.items() if k not in out.head_bad}
        return out


def _accumulate(spec: _ShardSpec, feeds: Feeds, *, model: onnx.ModelProto, progress: Progress | None = None) -> _Sums:
    """One pass over ``feeds``: the Gram of every wanted activation (padded rows left out)."""
    part = _Sums()
    heads = _HeadGrams(spec.scores)
    extra = {name for op in spec.scores for name in (op.operand, op.other, op.source)}

    def add(feed: dict[str, np.ndarray], got: list[dict[str, np.ndarray]]) -> None:
        values = got[0]
        mask = _mask_of(feed, spec.mask_input)
        if mask is not None:
            part.mask_kept += int(np.count_nonzero(mask))
            part.mask_shape = part.mask_shape or tuple(mask.shape)
        for key in spec.wanted:
            name, axis = key
            x = values.get(name)
            if x is None or x.size == 0:  # (a value of an If branch this run did not take, or none that can be fetched)
                continue
            rows = _rows(x, axis, mask)
            if mask is not None and axis == -1 and x.ndim > 1 and (x.shape[:-1] == mask.shape or
                                                                   (x.ndim == 2 and x.shape[0] == mask.size)):
                part.mask_fits.add(name)
            if mask is not None and rows.shape[0] != int(np.prod(x.shape[:-1] if x.ndim > 1 else (1,))):
                part.masked.add(name)
            r64 = rows.astype(np.float64, copy=False)
            g = r64.T @ r64
            part.sums[key] = part.sums[key] + g if key in part.sums else g
            part.counts[key] = part.counts.get(key, 0) + rows.shape[0]
            v = r64.sum(axis=0)
            part.row_sums[key] = part.row_sums[key] + v if key in part.row_sums else v
        if spec.scores:
            heads.add(values, mask)

    try:
        part.runs = capture(model, {name for name, _ in spec.wanted} | extra, feeds, add, data=spec.data,
                            threads=spec.threads, progress=progress)
    except CalibrationError as exc:
        if "holds no feeds" not in str(exc):
            raise
    part.head_sums, part.head_bad = heads.sums, heads.bad
    return part


def _shards(feeds: list, n: int) -> list[list]:
    size = -(-len(feeds) // n) if feeds else 1
    return [feeds[i:i + size] for i in range(0, len(feeds), size)] or [[]]


def _shard_setup(spec: _ShardSpec) -> tuple[_ShardSpec, onnx.ModelProto]:
    model = onnx.ModelProto()
    model.ParseFromString(spec.model)
    return spec, model


def _shard_task(state: tuple[_ShardSpec, onnx.ModelProto], shard: list) -> _Sums:
    spec, model = state
    return _accumulate(spec, shard, model=model)


@dataclass
class Statistics(StageResult):
    """What data-aware truncation whitens by, per weight group (``Capture``) and as report numbers."""

    section = "data_aware"
    capture: Capture
    damping: float
    mask: str | None
    #: Whether the factorization whitens by these statistics (``data_aware``); without it they
    #: serve width reduction alone, which reports them in its own section.
    whitens: bool = True
    #: Conv weights, which keep the plain spectrum (their inputs are not captured).
    convs_plain: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = {"weights_whitened": len(self.capture.grams), "ort_runs": self.capture.runs, "damping": self.damping,
               "mask": self.mask, "attention_weighted": len(self.capture.out_grams)}
        if self.convs_plain:
            out["convs_plain_svd"] = self.convs_plain
        return out

    def report_sections(self) -> dict[str, dict[str, Any]]:
        return super().report_sections() if self.whitens else {}


class CaptureStatistics(Step):
    """Capture each MatMul/Gemm weight's input Gram (and, for attention scores, output weight)."""

    name = "statistics"

    def applies(self, ctx: Context) -> bool:
        return ctx.config.needs_statistics

    def run(self, ctx: Context) -> Statistics:
        cfg = ctx.config
        candidates = ctx.need(Discovery).candidates
        groups = [g for g in candidates if not g.layers[0].is_conv]
        if not cfg.data_aware:  # for width reduction alone: the blocks' hidden activations only
            from .width import FoundBlocks

            wanted = ctx.need(FoundBlocks).down_keys
            groups = [g for g in groups if g.key in wanted]
        cap = capture_grams(ctx.model, groups, ctx.need(Calibration).feeds, ctx.data, mask_input=cfg.calib_mask,
                            progress=ctx.progress, attention=cfg.attention_aware and cfg.data_aware, executor=ctx.executor)
        if cfg.data_aware:
            _warn_thin(cap, {g.key: g for g in groups})
        return Statistics(cap, cfg.damping, cfg.calib_mask, whitens=cfg.data_aware,
                          convs_plain=sum(g.layers[0].is_conv for g in candidates) if cfg.data_aware else 0)


def _warn_thin(cap: Capture, groups: Mapping[int, Any]) -> None:
    """Say when layers saw fewer calibration rows than their input width: their Gram is then
    rank-deficient, and what is fitted to it fits the calibration set rather than the data."""
    thin = [(key, cap.rows.get(key, 0), len(g)) for key, (g, _) in cap.grams.items() if cap.rows.get(key, 0) < len(g)]
    if thin:
        key, rows, width = min(thin, key=lambda t: t[1] / t[2])
        log.warning("%d layer(s) saw fewer calibration rows than their input width (fewest: %d rows for %d inputs, at %s): "
                    "their statistics are rank-deficient and what is fitted to them fits the calibration set; pass more %s "
                    "data", len(thin), rows, width, groups[key].layers[0].display_name if key in groups else key,
                    option("calib"))
