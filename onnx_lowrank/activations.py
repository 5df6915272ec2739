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
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import helper

from . import io
from .discovery import Layer, WeightGroup
from .errors import CalibrationError

__all__ = ["layer_side", "Capture", "capture_grams", "open_session", "Feeds"]

log = logging.getLogger(__name__)

#: Calibration feeds: a re-iterable of ``{input name: array}``.
Feeds = Iterable[Mapping[str, np.ndarray]]
Progress = Callable[[int, int, str], None]


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
    """

    grams: dict[int, tuple[np.ndarray, str]] = field(default_factory=dict)
    rows: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    runs: int = 0
    masked: set[str] = field(default_factory=set)


@contextlib.contextmanager
def open_session(model: onnx.ModelProto, source_dir: Path | None, threads: int | None = None) -> Iterator[object]:
    """An onnxruntime CPU session for ``model``, whose external data lives in ``source_dir``.

    Nothing is written beside the user's files (see :func:`onnx_lowrank.verify.make_session`).
    """
    from .verify import make_session

    if io.uses_external_data(model) and source_dir is None:
        raise CalibrationError("the model keeps its weights in external data files; pass base_dir= to find them.")
    yield make_session(model, threads=threads, base_dir=source_dir)


def capture_grams(
    model: onnx.ModelProto,
    groups: list[WeightGroup],
    feeds: Feeds,
    source_dir: Path | None,
    *,
    mask_input: str | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
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

    Raises:
        CalibrationError: no feeds, or the mask input is not fed.
    """
    cap = Capture()
    graph_inputs = {i.name for i in model.graph.input}
    wanted: dict[tuple[str, int], list[int]] = {}  # (activation, axis) -> groups using it
    plan: dict[int, tuple[str, list[tuple[str, int]]]] = {}
    for group in groups:
        sides = set()
        acts = []
        for layer in group.layers:
            if layer.graph is not model.graph:
                cap.skipped[id(group)] = "data-aware: the layer is inside a subgraph, whose activations are not captured; plain SVD used"
                break
            side, axis = layer_side(layer)
            sides.add(side)
            acts.append((layer.node.input[1 - layer.weight_index], axis))
        else:
            if len(sides) > 1:
                cap.skipped[id(group)] = "data-aware: the weight's users meet it from different sides; plain SVD used"
                continue
            plan[id(group)] = (sides.pop(), acts)
            for key in acts:
                wanted.setdefault(key, []).append(id(group))
    if not plan:
        return cap

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    fetch = sorted({name for name, _ in wanted if name not in graph_inputs})
    for name in fetch:
        if name not in outputs:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    sums: dict[tuple[str, int], np.ndarray] = {}
    counts: dict[tuple[str, int], int] = {}
    total = len(feeds) if hasattr(feeds, "__len__") else 0  # type: ignore[arg-type]
    with open_session(probe, source_dir, threads) as sess:
        batches = 0
        for feed in feeds:
            feed = dict(feed)
            mask = None
            if mask_input is not None:
                if mask_input not in feed:
                    raise CalibrationError(f"--calib-mask {mask_input}: not among the fed inputs {', '.join(sorted(feed))}.")
                mask = np.asarray(feed[mask_input])
            values = dict(zip(fetch, sess.run(fetch, feed))) if fetch else {}
            cap.runs += 1
            for key in wanted:
                name, axis = key
                x = np.asarray(values[name] if name in values else feed[name])
                rows = _rows(x, axis, mask)
                if mask is not None and rows.shape[0] != int(np.prod(x.shape[:-1] if x.ndim > 1 else (1,))):
                    cap.masked.add(name)
                r64 = rows.astype(np.float64, copy=False)
                g = r64.T @ r64
                sums[key] = sums[key] + g if key in sums else g
                counts[key] = counts.get(key, 0) + rows.shape[0]
            batches += 1
            if progress is not None:
                progress(batches, total, "capturing activations")
    if batches == 0:
        raise CalibrationError("the calibration data holds no feeds; pass a non-empty --calib.")
    for gid, (side, acts) in plan.items():
        g = None
        for key in acts:
            g = sums[key] if g is None else g + sums[key]
        if g is None or not np.any(np.diag(g) > 0):
            cap.skipped[gid] = "data-aware: the calibration data never reaches this layer's input; plain SVD used"
            continue
        cap.grams[gid] = (g, side)
        cap.rows[gid] = sum(counts[k] for k in acts)
    log.info("captured input statistics of %d weight(s) in %d run(s)", len(cap.grams), cap.runs)
    return cap
