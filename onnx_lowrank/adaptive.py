"""Accuracy-adaptive allocation: ranks chosen by sensitivity measured on calibration data.

Approach
--------
1. **Sensitivity.**  For every layer and every rank of a grid (fractions of its break-even rank,
   :data:`GRID`), only that layer is replaced by its rank-``r`` truncation and the model runs
   on the calibration set.  The layer's sensitivity at ``r`` is ``1 - mean cosine`` between the
   outputs and the original outputs (averaged over the floating-point outputs): smooth, and
   defined for every model.  One onnxruntime session serves every measurement: the weights
   become overridable initializers (graph inputs with a default), and each run feeds the
   truncated matrix ``A @ B`` of the layer under test.  ``1 + L x grid`` passes in all.
2. **Allocation.**  Sensitivities between grid ranks are interpolated linearly.  With the
   measured curves as errors, the budget allocator of :mod:`onnx_lowrank.policies` (greedy by
   sensitivity per parameter saved, over the lower convex hull of each curve) gives the best
   assignment for any parameter budget.
3. **Search.**  With ``max_drop``, a bisection on the global parameter budget finds the smallest
   one whose assignment, measured with all layers compressed together, loses at most
   ``max_drop`` of the quality metric on the calibration set, read as the verification gate reads
   it (``metric``, or each output's default; the worst output counts).  With a budget instead,
   the assignment for that budget is measured once.

Nothing is written: the session's model lives in memory (or, with external data, in a
temporary file beside the data that is removed on exit, interruption included).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx

from . import linalg
from . import io
from .runtime import Feeds, overridable, run_all, session
from .config import CompressConfig
from .plan import BudgetBase, LayerPlan, decide_conv, allocate_plans, budget_options
from .verify import compare, judge

__all__ = ["GRID", "Evaluator", "Curve", "grid_ranks", "measure_sensitivity", "decide_adaptive", "quality_drop", "distortion"]

log = logging.getLogger(__name__)

#: Ranks measured per layer, as fractions of its break-even rank.  Geometric at the low end, in
#: eighths from a quarter up, where budgets of 10-30 % fewer parameters put most layers: with
#: the allocator interpolating linearly between grid ranks, a sparse upper grid leaves it only
#: a few coarse steps per layer (all-MiniLM-L6-v2 at 20 % fewer: held-out cosine 0.9616 with
#: 7 points, 0.9627 with these 10; ``docs/rank-selection.md``).
GRID = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)
#: Bisection steps on the budget (each one full pass over the calibration set).
SEARCH_STEPS = 7

Progress = Callable[[int, int, str], None]


def _float_outputs(outs: list[np.ndarray]) -> list[int]:
    return [i for i, o in enumerate(outs) if np.issubdtype(o.dtype, np.floating)]


def quality_drop(base: list[np.ndarray], outs: list[np.ndarray], labels: np.ndarray | None, *,
                 metric: str | None = None, names: list[str] | None = None) -> tuple[str, float]:
    """``(metric, drop)`` of ``outs`` against the original outputs ``base``, as the verification
    gate reads it: every output judged by ``metric`` (or its default), the worst counts."""
    names = names or [f"output {i}" for i in range(len(base))]
    metrics = [compare(n, y, z, labels) for n, y, z in zip(names, base, outs)]
    judged, _ = judge(metrics, metric=metric, max_drop=None, have_labels=labels is not None)
    worst = max(judged, key=lambda j: j.drop)
    return worst.metric, float(worst.drop)


def distortion(base: list[np.ndarray], outs: list[np.ndarray]) -> float:
    """A layer's sensitivity: the squared-error distortion of the outputs, averaged over the
    floating-point ones.  ``1 - mean cosine`` per sample; for an output with one value per sample,
    where a cosine is only a sign, ``rel_l2^2 / 2`` (the same quantity when norms are kept)."""
    idx = _float_outputs(base) or list(range(len(base)))
    parts = []
    for i in idx:
        m = compare("o", base[i], outs[i])
        per_sample = int(np.prod(base[i].shape[1:])) if base[i].ndim > 1 else 1
        parts.append(m.rel_l2_error ** 2 / 2 if per_sample == 1 else 1.0 - m.cosine_mean)
    return float(np.mean(parts))


class Evaluator:
    """Runs the model on the calibration set with some weights replaced, counting runs.

    Args:
        model: The original model (a copy is made overridable).
        weights: Names of main-graph weights that may be replaced.
        feeds: Calibration feeds.
        source_dir: Where external data lives.
        threads: onnxruntime intra-op threads.
    """

    def __init__(self, model: onnx.ModelProto, weights: list[str], feeds: Feeds, source_dir: Path | None, threads: int | None):
        self.feeds = feeds
        self.runs = 0
        self.passes = 0
        self.session = session(overridable(model, weights), threads=threads, data=io.DataFiles(source_dir))
        self.names = [o.name for o in self.session.get_outputs()]
        self.base = self.run({})

    def close(self) -> None:
        self.session = None

    def run(self, overrides: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """One pass over the calibration set; outputs concatenated along the first axis."""
        outs = run_all(self.session, self.feeds, overrides=overrides, names=self.names)
        self.runs += sum(1 for _ in self.feeds)
        self.passes += 1
        return outs


def _truncated(plan: LayerPlan, rank: int) -> np.ndarray:
    a, b = linalg.factors(plan.spectrum, rank)
    return (a.astype(np.float64) @ b.astype(np.float64)).astype(plan.dtype)


def grid_ranks(plan: LayerPlan, rank_multiple: int = 1) -> list[int]:
    """The ranks measured for a plan: :data:`GRID` fractions of break-even, rounded."""
    top = min(linalg.break_even_rank(plan.m, plan.n), plan.m, plan.n)
    ranks = {linalg.round_rank(max(1, int(round(f * top))), rank_multiple, plan.m, plan.n) for f in GRID}
    return sorted(r for r in ranks if 1 <= r <= top)


@dataclass
class Curve:
    """Measured sensitivity of one layer at the grid ranks; :meth:`at` interpolates."""

    ranks: list[int]
    sens: list[float] = field(default_factory=list)

    def at(self, ranks: list[int]) -> np.ndarray:
        return np.interp(ranks, self.ranks, self.sens)


def measure_sensitivity(ev: Evaluator, plans: list[LayerPlan], rank_multiple: int = 1,
                        progress: Progress | None = None) -> list[Curve]:
    """Each plan's sensitivity at its :func:`grid_ranks`, compressing one layer at a time."""
    curves = []
    total = sum(len(grid_ranks(p, rank_multiple)) for p in plans)
    done = 0
    for p in plans:
        curve = Curve(grid_ranks(p, rank_multiple))
        for r in curve.ranks:
            outs = ev.run({p.group.weight.name: _truncated(p, r)})
            curve.sens.append(distortion(ev.base, outs))
            done += 1
            if progress is not None:
                progress(done, total, f"sensitivity {p.group.weight.name} rank {r}")
        log.debug("sensitivity of %s: %s", p.group.weight.name, dict(zip(curve.ranks, curve.sens)))
        curves.append(curve)
    return curves


def decide_adaptive(
    model: onnx.ModelProto,
    plans: list[LayerPlan],
    cfg: CompressConfig,
    base: BudgetBase,
    feeds: Feeds,
    labels: np.ndarray | None,
    source_dir: Path | None,
    *,
    threads: int | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], list[np.ndarray] | None]:
    """Measure, allocate and search (see the module docstring); sets each plan's choice or reason.

    Returns:
        The report section (metric, goal, measured drop, budget found, grid, run counts) and
        the original model's outputs on the calibration set (``None`` when nothing was measured).
    """
    main = {t.name for t in model.graph.initializer} | {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    active = []
    for p in plans:
        if p.is_conv and p.reason is None:
            decide_conv(p, cfg)  # Conv layers follow the per-layer rule; adaptive allocation covers MatMul/Gemm
            continue
        if not p.active:
            continue
        if p.group.weight.graph is not model.graph or p.group.weight.name not in main:
            p.reason = "adaptive mode measures weights of the main graph only; left alone"
            continue
        active.append(p)
    base = base.with_decided_convs(plans)
    section: dict[str, Any] = {"grid": [round(f, 4) for f in GRID]}
    if not active:
        return section, None
    ev = Evaluator(model, [p.group.weight.name for p in active], feeds, source_dir, threads)
    try:
        metric, _ = quality_drop(ev.base, ev.base, labels, metric=cfg.metric, names=ev.names)
        curves = measure_sensitivity(ev, active, cfg.rank_multiple, progress)

        def assign(target: float | None) -> None:
            for p in active:
                p.reason, p.choice = None, None
            limits = base.limits(cfg, target_params=target)
            flags = [f for f, _, _ in limits]
            options = [budget_options(p, c.at, flags, cfg.rank_multiple, min_rank=c.ranks[0]) for p, c in zip(active, curves)]
            allocate_plans(active, options, limits, base)

        def measure() -> float:
            overrides = {p.group.weight.name: _truncated(p, p.rank) for p in active if p.reason is None}
            return quality_drop(ev.base, ev.run(overrides), labels, metric=cfg.metric, names=ev.names)[1] if overrides else 0.0

        if cfg.max_drop is None:
            assign(None)
            drop = measure()
            found = cfg.target_params
        else:
            lo_cost = sum(p.params_at(c.ranks[0]) for p, c in zip(active, curves))
            lo = (lo_cost + base.params_fixed) / base.params_total
            hi, hi_drop = 1.0, 0.0
            assign(lo)
            drop = measure()
            if drop <= cfg.max_drop:
                hi, hi_drop = lo, drop
            else:
                for _ in range(SEARCH_STEPS):
                    mid = (lo + hi) / 2
                    assign(mid)
                    d = measure()
                    if progress is not None:
                        progress(ev.passes, ev.passes, f"budget {mid:.4f}: drop {d:.5f}")
                    if d <= cfg.max_drop:
                        hi, hi_drop = mid, d
                    else:
                        lo = mid
            assign(hi)
            drop, found = hi_drop, hi
        for p, c in zip(active, curves):
            if p.reason is None:
                p.extra["sensitivity"] = float(c.at([p.rank])[0])
        section.update(metric=metric, max_drop=cfg.max_drop, target_params=round(found, 6) if found is not None else None,
                       measured_drop=drop, layers_measured=len(active), ort_runs=ev.runs, passes=ev.passes)
        log.info("adaptive: %d layer(s) measured in %d onnxruntime run(s); drop %.5f (%s)", len(active), ev.runs, drop, metric)
        return section, ev.base
    finally:
        ev.close()
