"""Refit: least-squares refit of the chosen factors on propagated activations (``refine``).

After the ranks are chosen, each compressed layer no longer sees its original input but the
input the already compressed layers before it produce.  Level by level in graph order
(:func:`refit_levels`), the statistics ``G~ = X~^T X~`` and ``C = X~^T X`` are captured with every
layer so far at its current factors, and the factors are refitted in closed form
(:mod:`onnx_lowrank.linalg.refit`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import onnx

from onnx_lowrank import io
from onnx_lowrank.pipeline import Context, StageResult, Step
from onnx_lowrank import linalg
from onnx_lowrank.passes.discover import WeightGroup

from .calibrate import Calibration
from .decide import Decided
from .spectra import Spectra
from .width import current_widths, emulated_arrays
from onnx_lowrank.passes.statistics import _mask_of, _rows, layer_inputs
from onnx_lowrank.runtime import Feeds, Progress, capture, main_constants

__all__ = ["RefitStats", "capture_refit_stats", "refit_levels", "refit_factors", "output_errors", "Refine", "Refits"]

log = logging.getLogger(__name__)


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


def capture_refit_stats(
    model: onnx.ModelProto,
    groups: list[WeightGroup],
    replaced: Mapping[str, np.ndarray],
    feeds: Feeds,
    data: io.DataFiles | Path | None,
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
        data: Where the model's external data lives (its :class:`~onnx_lowrank.io.DataFiles` or folder).
        mask_input: Name of an input whose zeros mark padded rows.
        threads: onnxruntime intra-op threads.

    Raises:
        CalibrationError: no feeds, or the mask input is not fed.
    """
    stats = RefitStats()
    plan, _ = layer_inputs(groups, model.graph)
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
                         data=io.as_data(data), threads=threads, overrides=({}, overrides))
    for key, (side, acts) in plan.items():
        stats.grams[key] = (sum(gsum[k] for k in acts), side)
        stats.cross[key] = sum(csum[k] for k in acts)
    return stats


def refit_levels(graph: onnx.GraphProto, groups: list[WeightGroup]) -> dict[int, int]:
    """Per group key: 0 when no other group's layer lies upstream of its inputs, else one more
    than the deepest such group.  Layers of one level do not feed each other."""
    node_of = {layer.node.output[0]: (g.key, layer) for g in groups for layer in g.layers if layer.node.output}
    upstream: dict[str, frozenset[int]] = {}
    level: dict[int, int] = {}
    for node in graph.node:  # ONNX nodes are stored in topological order
        up = frozenset().union(*(upstream.get(name, frozenset()) for name in node.input if name))
        hit = node_of.get(node.output[0]) if node.output else None
        if hit is not None:
            key, layer = hit
            act = node.input[1 - layer.weight_index]
            before = upstream.get(act, frozenset()) - {key}
            level[key] = max(level.get(key, 0), 1 + max((level.get(u, 0) for u in before), default=-1))
            up = up | {key}
        for name in node.output:
            upstream[name] = up
    return {g.key: level.get(g.key, 0) for g in groups}


def refit_factors(
    model: onnx.ModelProto,
    groups: list[WeightGroup],
    factors: Mapping[int, tuple[np.ndarray, np.ndarray]],
    weights: Mapping[int, np.ndarray],
    feeds: Feeds,
    data: io.DataFiles | Path | None,
    *,
    passes: int = 1,
    both: bool = False,
    sequential: bool = False,
    damping: float = 0.01,
    mask_input: str | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    output_only: Iterable[int] = (),
    fixed: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], int]:
    """Refit the output-side factor of every compressed layer on propagated activations.

    Each pass collects :class:`RefitStats` with every layer at its current factors, then
    refits all layers at once (:func:`onnx_lowrank.linalg.refit_factor`).  After ``p``
    passes a layer with at most ``p - 1`` compressed layers upstream of it has seen inputs
    from the refitted ones; the rest approach that as the passes repeat.

    Args:
        model: The original model (not modified).
        groups: The weight groups that ``factors`` belong to.
        factors: Per group key: ``(A, B)`` from truncation.
        weights: Per group key: the original matrix ``W`` (m, n).
        feeds: Calibration feeds (re-iterable).
        data: Where the model's external data lives (its :class:`~onnx_lowrank.io.DataFiles` or folder).
        passes: Statistics passes (each two onnxruntime runs per feed); ignored when
            ``sequential``.
        sequential: Refit level by level in graph order (:func:`refit_levels`), so every
            layer sees the inputs of the already refitted layers before it: one statistics
            pass per level instead of per ``passes``.
        both: Refit both factors (:func:`~onnx_lowrank.linalg.refit_lowrank`) instead of
            the output-side one only.
        output_only: Groups (by key) that refit only the output-side factor even with
            ``both``: those truncated with an output-side weight (attention-aware), whose
            input-side factor the unweighted refit of both would undo.  The output-side refit
            does not depend on that weight.
        damping: Relative damping of ``G~``.
        mask_input: Name of an input whose zeros mark padded rows.
        threads: onnxruntime intra-op threads.
        progress: Called as ``progress(pass_done, passes, "refitting factors")``.
        fixed: Weight name -> value for the other compressed layers (Conv kernels rebuilt from
            their factors, narrowed blocks' ``W2``), in place in every compressed run so that
            the inputs each layer is refitted on carry their error too.

    Returns:
        ``(factors, runs)``: the refitted factors (cast to each weight's dtype) for every group
        that could be refitted, the others unchanged; and the onnxruntime runs made.
    """
    from onnx_lowrank.linalg import refit_factor, refit_lowrank

    by_key = {g.key: g for g in groups if g.key in factors}
    keep_input = set(output_only)
    current = {key: (np.asarray(a), np.asarray(b)) for key, (a, b) in factors.items()}
    runs = 0
    if sequential:
        levels = refit_levels(model.graph, list(by_key.values()))
        steps = [[by_key[g] for g in by_key if levels[g] == k] for k in sorted(set(levels.values()))]
    else:
        steps = [list(by_key.values())] * max(1, int(passes))
    for k, todo in enumerate(steps):
        replaced = dict(fixed or {})
        for key, (a, b) in current.items():
            w = weights[key]
            replaced[by_key[key].weight.name] = (a.astype(np.float64) @ b.astype(np.float64)).astype(w.dtype)
        stats = capture_refit_stats(model, todo, replaced, feeds, data, mask_input=mask_input, threads=threads)
        runs += stats.runs
        for key, (g, side) in stats.grams.items():
            w = weights[key]
            pair = both and key not in keep_input
            try:
                if pair:
                    a, b = refit_lowrank(w, g, stats.cross[key], factors[key][0].shape[1], side, damping)
                else:
                    a, b = refit_factor(*factors[key], w, g, stats.cross[key], side, damping)
            except ValueError as exc:
                log.warning("refit of %s skipped: %s", by_key[key].weight.name, exc)
                continue
            if pair:
                current[key] = (a.astype(w.dtype), b.astype(w.dtype))
            elif side == "left":
                current[key] = (np.asarray(factors[key][0]), b.astype(w.dtype))
            else:
                current[key] = (a.astype(w.dtype), np.asarray(factors[key][1]))
        if progress is not None:
            progress(k + 1, len(steps), "refitting factors")
    log.info("refitted %d layer(s) in %d pass(es), %d run(s)", len(current), len(steps), runs)
    return current, runs


def output_errors(model: onnx.ModelProto, candidates: list[Mapping[str, np.ndarray]], feeds: Feeds,
                  data: io.DataFiles | Path | None, *, threads: int | None = None) -> tuple[list[float] | None, int]:
    """The relative L2 error of ``model``'s outputs (every float output together, each weighed by
    its own energy) with each candidate's weights fed instead of the stored ones, against the
    stored weights' outputs (``None`` when no float output is ever nonzero: nothing to compare);
    and the onnxruntime runs made."""
    names = [o.name for o in model.graph.output]
    ref = np.zeros(len(names))
    err = np.zeros((len(candidates), len(names)))

    def add(feed: dict[str, np.ndarray], got: list[dict[str, np.ndarray]]) -> None:
        for j, name in enumerate(names):
            y = np.asarray(got[0][name])
            if not np.issubdtype(y.dtype, np.floating):
                continue
            y64 = y.astype(np.float64)
            ref[j] += float(np.sum(y64 * y64))
            for i, out in enumerate(got[1:]):
                err[i, j] += float(np.sum((np.asarray(out[name], np.float64) - y64) ** 2))

    runs = capture(model, names, feeds, add, data=io.as_data(data), threads=threads, overrides=({}, *candidates),
                   label="checking the refit")
    if not np.any(ref > 0):
        return None, runs
    scale = np.where(ref > 0, ref, 1.0)
    sq = np.sqrt(np.sum(err / scale, axis=1) / int(np.count_nonzero(ref)))
    return [float(v) for v in sq], runs


@dataclass
class Refits(StageResult):
    """Refitted factors, by weight-group key (only the layers whose factors changed; none when
    the refit did not lower the calibration error, ``kept`` false)."""

    section = "refine"
    factors: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    runs: int = 0
    error_before: float | None = None  # relative L2 of the outputs on the calibration data, truncated factors
    error_after: float | None = None  # the same with the refitted factors
    kept: bool = True
    note: str | None = None  # why nothing was refitted

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers_refitted": len(self.factors), "ort_runs": self.runs}
        if self.note:
            out["why_none"] = self.note
        if self.error_before is not None:
            out.update(rel_l2_truncated=self.error_before, rel_l2_refitted=self.error_after, kept=self.kept,
                       checked_on="the calibration data")
        return out


class Refine(Step):
    """Refit both factors of every chosen MatMul/Gemm layer, level by level in graph order (``refine``)."""

    name = "refine"

    def applies(self, ctx: Context) -> bool:
        return ctx.config.refine and not ctx.request.dry_run

    def run(self, ctx: Context) -> Refits:
        from .adaptive import in_main, product, truncated_weight  # (adaptive imports rewrite, which imports this)

        cfg = ctx.config
        plans = ctx.need(Spectra).plans
        decided = [(plans[k], d) for k, d in ctx.latest(Decided).decisions.items() if d.factorize]
        chosen = [(p, d) for p, d in decided if not p.is_conv]
        factors = {p.key: linalg.factors(p.view().spectrum, d.rank) for p, d in chosen}
        weights = {p.key: ctx.data.read(p.group.weight.tensor) for p, _ in chosen}
        main = main_constants(ctx.model)
        # The layers the refit leaves as they are still change what the refitted ones receive.
        fixed = {name: arr for plan in {w.block.up.key: w for w in current_widths(ctx).values()}.values()
                 if not plan.block.down.weight.scope for name, arr in emulated_arrays(plan).items() if name in main}
        fixed.update({p.name: truncated_weight(p, d.rank, mode=d.mode) for p, d in decided if p.is_conv and in_main(p, main)})
        refitted, runs = refit_factors(ctx.model, [p.group for p, _ in chosen], factors, weights, ctx.need(Calibration).feeds,
                                       ctx.data, both=True, sequential=True, damping=cfg.damping, mask_input=cfg.calib_mask,
                                       progress=ctx.progress,
                                       output_only={p.key for p, _ in chosen if p.view().spectrum.out_whiten is not None},
                                       fixed=fixed)
        changed = {k: ab for k, ab in refitted.items() if ab[0] is not factors[k][0] or ab[1] is not factors[k][1]}
        if not changed:
            why = ("no MatMul/Gemm layer is factorized" if not chosen else
                   "no factorized MatMul/Gemm weight of the main graph could be refitted (weights inside If/Loop/Scan bodies "
                   "are not)")
            log.info("--refine: nothing refitted: %s", why)
            return Refits(changed, runs, note=why)
        # The refit matches each layer's own output; a network's output may still move away (seen on
        # a CNN), so it is kept only where it lowers the error on the calibration data.
        names = {p.key: p.name for p, _ in chosen if in_main(p, main)}

        def products(fs: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
            return {names[k]: product(np.asarray(a), np.asarray(b), weights[k].dtype) for k, (a, b) in fs.items() if k in names}

        errors, checked = output_errors(ctx.model, [{**fixed, **products(factors)}, {**fixed, **products({**factors, **refitted})}],
                                        ctx.need(Calibration).feeds, ctx.data)
        if errors is None:  # integer outputs only (an ArgMax head): no error to compare; the refit stands
            return Refits(changed, runs + checked)
        before, after = errors
        kept = after < before
        if not kept:
            log.warning("--refine: the refitted factors do not lower the output error on the calibration data (relative L2 "
                        "%.6g, truncated %.6g); the truncated factors are kept", after, before)
        return Refits(changed if kept else {}, runs + checked, before, after, kept)
