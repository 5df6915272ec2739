"""Accuracy-adaptive allocation: ranks chosen by sensitivity measured on calibration data.

Approach
--------
1. **Sensitivity.**  For every layer and some ranks of a grid (fractions of its break-even rank,
   :data:`GRID`; ``sensitivity_points`` of them, by default 2, the rest following the layer's
   whitened truncation loss scaled to them), only that layer is replaced by its rank-``r``
   truncation and the model runs on a sample of the calibration set (``adaptive_samples``, by
   default 64 spread evenly over it).  Feed-forward blocks whose width the budget sizes
   (``ffn_keep="auto"``) are measured the same way at widths of :data:`WIDTH_GRID`; with
   ``--quantize int4`` and ``target_bytes``, each layer and each such block also in 4-bit blocks
   at its branch ranks (the weights the runtime's dequantization and the branch compute).  The
   layer's sensitivity at ``r`` is ``1 - mean cosine`` between the outputs and the original
   outputs (averaged over the floating-point outputs): smooth, and defined for every model.
   One onnxruntime session serves every measurement: the weights become overridable
   initializers (graph inputs with a default), and each run feeds the truncated matrix
   ``A @ B`` of the layer under test.  ``1 + L x points`` passes over the
   sample.
2. **Allocation.**  Sensitivities between grid ranks are interpolated linearly.  With the
   measured curves as errors, the budget allocator of :mod:`onnx_lowrank.policies` (greedy by
   sensitivity per parameter saved, over the lower convex hull of each curve) gives the best
   assignment for any parameter budget.
3. **Search.**  With ``max_drop``, a bisection on the global parameter budget finds the smallest
   one whose assignment, measured with all layers compressed together, loses at most
   ``max_drop`` of the quality metric on the whole calibration set, read as the verification gate reads
   it (``metric``, or each output's default; the worst output counts).  With a budget instead,
   the assignment for that budget is measured once.

Nothing is written: the session's model lives in memory (or, with external data, in a
temporary file beside the data that is removed on exit, interruption included).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx

from onnx_lowrank import io, linalg
from onnx_lowrank.config import CompressConfig
from onnx_lowrank.errors import option, option_value
from onnx_lowrank.pipeline import Context, StageResult, Step
from onnx_lowrank.plan import Decision, LayerPlan, Skip, SkipCode
from onnx_lowrank.runtime import Feeds, Progress, main_constants, overridable, run_all, session
from onnx_lowrank.runtime.executor import Executor, InProcess
from onnx_lowrank.verify import compare, judge, require_finite

from .calibrate import Calibration
from .decide import (BudgetBase, Decided, Int4Candidate, Int4Unit, allocate_decisions, allocated_plans, block_byte_cost,
                     block_int4_choices, block_options, decide_conv, int4_choices, plan_options)
from .discover import Discovery
from .load import Loaded
from .rewrite import Rewritten
from .spectra import Spectra
from .width import Narrowed, WidthPlan, WidthUnit, current_widths, emulated_arrays, overridden_names

__all__ = ["GRID", "Evaluator", "Curve", "grid_ranks", "product", "truncated_weight", "in_main", "measure_sensitivity", "decide_adaptive", "measured_plans",
           "quality_drop", "distortion", "Adapt", "Adapted", "CheckAdaptive", "Checked"]

STAGE = "adaptive"

log = logging.getLogger(__name__)

#: Ranks measured per layer, as fractions of its break-even rank.  Geometric at the low end, in
#: eighths from a quarter up, where budgets of 10-30 % fewer parameters put most layers: with
#: the allocator interpolating linearly between grid ranks, a sparse upper grid leaves it only
#: a few coarse steps per layer (all-MiniLM-L6-v2 at 20 % fewer: held-out cosine 0.9616 with
#: 7 points, 0.9627 with these 10; ``docs/rank-selection.md``).
GRID = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)
#: Bisection steps on the budget (each one full pass over the calibration set).
SEARCH_STEPS = 7


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
        data: Where external data lives.
        threads: onnxruntime intra-op threads.
    """

    def __init__(self, model: onnx.ModelProto, weights: list[str], feeds: Feeds, data: io.DataFiles | Path | None,
                 threads: int | None, fixed: Mapping[str, np.ndarray] | None = None):
        self.feeds = feeds
        self.runs = 0
        self.passes = 0
        self.probe = overridable(model, weights)
        self.data = io.as_data(data)
        self.session = session(self.probe, threads=threads, data=self.data)
        self.names = [o.name for o in self.session.get_outputs()]
        self._reference(fixed)

    def _reference(self, fixed: Mapping[str, np.ndarray] | None) -> None:
        """The original outputs on these feeds; then the changes in force in every run
        (feed-forward blocks narrowed to a fixed fraction), whose distortion a layer's
        sensitivity is measured beyond."""
        self.fixed: dict[str, np.ndarray] = {}
        self.base = self.run({})
        for name, y in zip(self.names, self.base):
            require_finite(name, y, "on the calibration data", "no sensitivity can be measured")
        self.fixed = dict(fixed or {})
        self.offset = distortion(self.base, self.run({})) if self.fixed else 0.0

    def shared(self) -> tuple:
        """What a worker process needs to measure as this evaluator does (picklable)."""
        folder = str(self.data.base_dir) if self.data.base_dir is not None else None
        return (self.probe.SerializeToString(), folder, [dict(f) for f in self.feeds], self.base, self.names, self.fixed,
                self.offset)

    def on(self, feeds: Feeds) -> "Evaluator":
        """An evaluator on other feeds, sharing this one's session and the changes in force."""
        if feeds is self.feeds:
            return self
        other = object.__new__(Evaluator)
        other.feeds, other.runs, other.passes = feeds, 0, 0
        other.probe, other.data, other.session, other.names = self.probe, self.data, self.session, self.names
        other._reference(self.fixed)
        return other

    def state(self) -> tuple:
        """What :func:`_sensitivity_task` measures with, here."""
        return self.session, self.feeds, self.base, self.names, self.fixed, self.offset

    def close(self) -> None:
        self.session = None

    def run(self, overrides: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """One pass over the calibration set; outputs concatenated along the first axis."""
        outs = run_all(self.session, self.feeds, overrides={**self.fixed, **overrides}, names=self.names)
        self.runs += sum(1 for _ in self.feeds)
        self.passes += 1
        return outs


def product(a: np.ndarray, b: np.ndarray, dtype) -> np.ndarray:
    return (a.astype(np.float64) @ b.astype(np.float64)).astype(dtype)


def truncated_weight(plan: LayerPlan, rank: int, int4: "Int4Forms | None" = None, mode: str | None = None) -> np.ndarray:
    """The plan's weight at ``rank`` in view ``mode`` (default: its budget view; a Conv's kernel
    rebuilt from that view; ``int4``: a pair whose factors the int4 stage stores int8 is rounded
    as it stores them)."""
    mode = mode or plan.budget_mode
    matrix = product(*_factors(plan, rank, int4, mode), plan.dtype)
    return linalg.conv_weight(matrix, plan.weight_shape, mode) if plan.is_conv else matrix


def _factors(plan: LayerPlan, rank: int, int4: "Int4Forms | None", mode: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The plan's factor pair at ``rank`` (in view ``mode``, default its own) as it will be
    written: under ``--quantize int4`` with int8 factors, their int8 codes read back."""
    a, b = linalg.factors(plan.view(mode).spectrum, rank)
    if int4 is not None and plan.key in int4.int8_pairs:
        from .int4 import stored_factor

        a, b = stored_factor(a), stored_factor(b)
    return a, b


def grid_ranks(plan: LayerPlan, rank_multiple: int = 1) -> list[int]:
    """The ranks measured for a plan (anything with ``m`` and ``n``; a :class:`LayerPlan` in its
    budget view, up to the rank where a Conv stops saving MACs): :data:`GRID` fractions of
    break-even, rounded."""
    if isinstance(plan, LayerPlan):
        mode = plan.budget_mode
        v = plan.view(mode)
        m, n, top = v.m, v.n, min(plan.break_even(mode), v.m, v.n)
    else:
        m, n = plan.m, plan.n
        top = min(linalg.break_even_rank(m, n), m, n)
    ranks = {linalg.round_rank(max(1, int(round(f * top))), rank_multiple, m, n) for f in GRID}
    return sorted(r for r in ranks if 1 <= r <= top)


@dataclass
class Curve:
    """Measured sensitivity of one layer at the grid ranks; :meth:`at` interpolates."""

    ranks: list[int]
    sens: list[float] = field(default_factory=list)

    def at(self, ranks: list[int]) -> np.ndarray:
        return np.interp(ranks, self.ranks, self.sens)


def _sensitivity_setup(shared: tuple) -> tuple:
    """A worker's evaluator: a session of the overridable model, the feeds, the original outputs,
    the changes in force in every run and their distortion."""
    model_bytes, folder, feeds, base, names, fixed, offset = shared
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    return session(model, data=io.as_data(folder)), feeds, base, names, fixed, offset


def _sensitivity_task(state: tuple, item: Mapping[str, Any]) -> float:
    """The distortion one change adds (one pass).  ``item`` maps tensor names to their values: an
    array, or ``(A, B, dtype)`` for the product of a factor pair (factors travel, not products)."""
    sess, feeds, base, names, fixed, offset = state
    overrides = dict(fixed)
    for name, v in item.items():
        overrides[name] = product(*v) if isinstance(v, tuple) else v
    return max(0.0, distortion(base, run_all(sess, feeds, overrides=overrides, names=names)) - offset)


def measured_ranks(ranks: list[int], points: int) -> list[int]:
    """The grid ranks actually measured when only ``points`` of them are: spread evenly over the
    grid, the middle one for a single point."""
    if points >= len(ranks):
        return list(ranks)
    picks = np.linspace(0, len(ranks) - 1, points + 2)[1:-1] if points > 1 else [(len(ranks) - 1) / 2]
    return sorted({ranks[int(round(float(i)))] for i in picks})


def truncation_loss(plan: LayerPlan, ranks: list[int]) -> np.ndarray:
    """``1 - E(r)``: the normalized squared truncation error of the plan's (whitened) spectrum."""
    spec = plan.view(plan.budget_mode).spectrum
    return np.array([1.0 - linalg.energy_kept(spec.s, r, spec.total) for r in ranks])


def fit_curve(ranks: list[int], loss: np.ndarray, at: list[int], measured: list[float]) -> list[float]:
    """Sensitivities at ``ranks`` from the truncation loss, scaled to the measured points.

    ``d(r) = c * loss(r) ** p``: one point fixes ``c`` (``p = 1``), two or more fit ``c`` and ``p``
    in log space (SVD-LLM v2's observation that the whitened truncation loss tracks the output
    error, calibrated per layer).  Measured points keep their measured values.
    """
    where = [ranks.index(r) for r in at]
    x, y = np.log(np.maximum(loss[where], 1e-30)), np.log(np.maximum(np.asarray(measured, dtype=np.float64), 1e-30))
    if len(at) >= 2 and np.ptp(x) > 1e-9:
        p, logc = np.polyfit(x, y, 1)
        p = float(np.clip(p, 0.25, 4.0))
        logc = float(np.mean(y - p * x))
    else:
        p, logc = 1.0, float(np.mean(y - x))
    out = list(np.exp(logc + p * np.log(np.maximum(loss, 1e-30))))
    for k, v in zip(where, measured):
        out[k] = v
    return out


#: Widths measured per feed-forward block (``--ffn-keep auto``), as fractions of its neurons:
#: dense near the top, where budgets of 10-40 % fewer parameters put most blocks.
WIDTH_GRID = (1 / 4, 3 / 8, 1 / 2, 5 / 8, 11 / 16, 3 / 4, 13 / 16, 7 / 8, 15 / 16)


def grid_widths(unit: WidthUnit) -> list[int]:
    """The widths measured for a block: :data:`WIDTH_GRID` fractions, each the nearest width the
    block may take."""
    ks = np.asarray(unit.ks)
    return sorted({int(ks[np.argmin(np.abs(ks - f * unit.block.hidden))]) for f in WIDTH_GRID})


def measure_sensitivity(ev: Evaluator, plans: list[LayerPlan], rank_multiple: int = 1,
                        progress: Progress | None = None, executor: Executor | None = None,
                        points: int | None = None, units: list[WidthUnit] = (),
                        int4: Int4Forms | None = None) -> list[Curve]:
    """Each plan's sensitivity at its :func:`grid_ranks`, compressing one layer at a time, and
    after them each feed-forward block's (``units``) at its :func:`grid_widths`, narrowing one
    block at a time (:func:`.width.emulated_arrays`).

    With ``int4``, each plan that may take 4-bit blocks is also measured in that form at its
    branch ranks (after the blocks; one curve each, appended in the order of ``plans``).

    With ``points`` (fewer than the grid), only that many ranks (widths) per layer (block) are
    measured and the rest follow its truncation loss (refit error, 4-bit error), scaled to them
    (:func:`fit_curve`).  The runs are independent: an ``executor`` with several workers spreads
    them, each worker building its own session once (:mod:`onnx_lowrank.runtime.executor`).
    """
    quantized = [p for p in plans if int4 is not None and p.key in int4.candidates]
    blocks4 = [u for u in units if int4 is not None and u.block.up.key in int4.units]
    curves = [Curve(grid_ranks(p, rank_multiple)) for p in plans] + [Curve(grid_widths(u)) for u in units] + \
        [Curve(list(int4.candidates[p.key].ranks)) for p in quantized] + \
        [Curve(list(int4.units[u.block.up.key].ranks)) for u in blocks4]
    at = [measured_ranks(c.ranks, points or len(c.ranks)) for c in curves]
    items: list[dict[str, Any]] = [{p.name: truncated_weight(p, r) if p.is_conv else (*_factors(p, r, int4), p.dtype)}
                                   for p, rs in zip(plans, at) for r in rs]
    labels = [f"sensitivity {p.name} rank {r}" for p, rs in zip(plans, at) for r in rs]
    for u, rs in zip(units, at[len(plans):]):
        items += [emulated_arrays(u.plan(k)) for k in rs]
        labels += [f"sensitivity {u.block.name} width {k}" for k in rs]
    for p, rs in zip(quantized, at[len(plans) + len(units):]):
        items += [int4.arrays(p, r) for r in rs]
        labels += [f"sensitivity {p.name} int4 + rank {r}" for r in rs]
    for u, rs in zip(blocks4, at[len(plans) + len(units) + len(quantized):]):
        items += [int4.unit_arrays(u, None, r) for r in rs]
        labels += [f"sensitivity {u.block.name} int4 + rank {r}" for r in rs]

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total, labels[done - 1] if executor is None or executor.workers == 1 else "sensitivity")

    if executor is None or executor.workers == 1:  # here, on the evaluator's own session
        values = InProcess().run(lambda _: ev.state(), _sensitivity_task, None, items, report)
    else:
        values = executor.run(_sensitivity_setup, _sensitivity_task, ev.shared(), items, report)
    feeds = sum(1 for _ in ev.feeds)
    ev.runs += len(items) * feeds
    ev.passes += len(items)
    it = iter(values)
    kinds = [("rank", p) for p in plans] + [("width", u) for u in units] + [("int4", p) for p in quantized] + \
        [("int4 block", u) for u in blocks4]
    for (kind, thing), curve, rs in zip(kinds, curves, at):
        measured = [next(it) for _ in rs]
        if rs == curve.ranks:
            curve.sens = measured
        else:
            if kind == "rank":
                loss = truncation_loss(thing, curve.ranks)
            elif kind == "width":
                loss = np.array([thing.errors[thing.ks.index(k)] for k in curve.ranks])
            elif kind == "int4":
                loss = np.array(int4.candidates[thing.key].errors, dtype=np.float64)
            else:  # the whole block in 4 bits, at each branch rank
                loss = np.array(int4.units[thing.block.up.key].forms[None][1], dtype=np.float64)
            curve.sens = fit_curve(curve.ranks, loss, rs, measured)
        log.debug("sensitivity of %s (%s): %s (measured at %s)", getattr(thing, "name", None) or thing.block.name, kind,
                  dict(zip(curve.ranks, curve.sens)), rs)
    return curves


@dataclass
class Adapted(Decided):
    """Decisions by measured sensitivity, the numbers behind them, and the original outputs on the
    calibration feeds (for the check after the rewrite)."""

    section = "adaptive"
    numbers: dict[str, Any] = field(default_factory=dict)
    base: list[np.ndarray] | None = None
    names: list[str] = field(default_factory=list)
    #: The weights (group keys) whose 4-bit forms were measured with a mean correction: the
    #: quantize stage corrects those and no other.
    int4_means: frozenset[int] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        return dict(self.numbers)

    def report_sections(self) -> dict[str, dict[str, Any]]:
        out = {"adaptive": self.to_dict()}
        if self.widths is not None:
            out["width"] = self.widths.to_dict()
        return out


def in_main(plan: LayerPlan, main: set[str]) -> bool:
    """Whether one session can take another value for the plan's weight: a main-graph constant
    (a body's weight may share such a name)."""
    return not plan.group.weight.scope and plan.name in main


def measured_plans(model: onnx.ModelProto, plans: dict[int, LayerPlan], cfg: CompressConfig) -> list[LayerPlan]:
    """The plans adaptive mode allocates: those a budget allocates whose weights it can
    measure (main-graph constants); the others keep their size in the budget's fixed part."""
    main = main_constants(model)
    return [p for p in allocated_plans(plans, cfg) if in_main(p, main)]


def _measurable(model: onnx.ModelProto, plans: dict[int, LayerPlan], cfg: CompressConfig
                ) -> tuple[list[LayerPlan], dict[int, Decision]]:
    """The plans adaptive mode allocates and can measure (main-graph weights), and a decision
    for every other plan (a Conv it does not allocate: the per-layer rule)."""
    main = main_constants(model)
    allocated = {p.key for p in allocated_plans(plans, cfg)}
    active, other = [], {}
    for k, p in plans.items():
        if not p.active:
            other[k] = Decision(k, p.view().mode, skip=p.skip)
        elif k not in allocated:
            other[k] = decide_conv(p, cfg)  # a Conv under target_macs/target_bytes: the per-layer rule
        elif not in_main(p, main):
            other[k] = Decision(k, p.view().mode, skip=Skip(
                SkipCode.NOT_MEASURED, "adaptive mode measures weights of the main graph only; left alone", STAGE))
        else:
            active.append(p)
    return active, other


@dataclass(frozen=True)
class Int4Forms:
    """With ``--quantize int4`` and ``target_bytes``: the plans that may take 4-bit blocks with a
    branch (their :class:`~.decide.Int4Candidate`, by key), how to emulate that form at a branch
    rank (``arrays(plan, rank)``: the tensors to feed), and every plan's bytes per weight."""

    candidates: dict[int, Int4Candidate]
    arrays: Callable[[LayerPlan, int], dict[str, np.ndarray]]
    sizes: dict[int, int] = field(default_factory=dict)
    #: Feed-forward blocks whose projections may take 4-bit blocks (``--ffn-keep auto``), by
    #: block key (:class:`~.decide.Int4Unit`), and how to emulate one narrowed to a
    #: :class:`~.width.WidthPlan` (``None``: whole) with branches of a rank.
    units: dict[int, Int4Unit] = field(default_factory=dict)
    unit_arrays: Callable[[WidthUnit, WidthPlan | None, int], dict[str, np.ndarray]] | None = None
    #: The biases ``arrays`` also feeds (a mean correction's shift), by plan key.
    biases: dict[int, str] = field(default_factory=dict)
    #: The plans whose factor pairs the quantize stage leaves float (:func:`~.int4.float_pairs`).
    float_pairs: frozenset[int] = frozenset()
    #: The plans whose factor pairs it stores int8 (measured so: :func:`~.int4.stored_factor`).
    int8_pairs: frozenset[int] = frozenset()


def _zeros(ranks: list[int]) -> np.ndarray:
    return np.zeros(len(ranks))


def _options(active: list[LayerPlan], cfg: CompressConfig, names: list[str], int4: Int4Forms | None = None,
             rank_curves: list[Curve] | None = None, int4_curves: dict[int, Curve] | None = None
             ) -> tuple[list[linalg.Options], list[list[tuple[str, int | None]]]]:
    """Every plan's options and what each one is: from its measured curves, or (before any is
    measured) with zero errors, for their costs alone."""
    options, labels = [], []
    for k, p in enumerate(active):
        errors_at = rank_curves[k].at if rank_curves is not None else _zeros
        low = rank_curves[k].ranks[0] if rank_curves is not None else grid_ranks(p, cfg.rank_multiple)[0]
        cand = int4.candidates.get(p.key) if int4 is not None else None
        if cand is not None:
            errors = int4_curves[p.key].at(list(cand.ranks)) if int4_curves is not None else _zeros(list(cand.ranks))
            cand = Int4Candidate(cand.ranks, cand.costs, tuple(float(e) for e in errors))
        size = int4.sizes.get(p.key, 4) if int4 is not None else 4
        opt, lab = plan_options(p, cfg, names, size, errors_at, cand, min_rank=low,
                                float_pair=int4 is not None and p.key in int4.float_pairs)
        options.append(opt)
        labels.append(lab)
    return options, labels


def _unit_options(units: list[WidthUnit], curves: list[Curve] | None, names: list[str],
                  byte_cost: Callable[[Any, int], int] | None = None, int4: Int4Forms | None = None,
                  int4_curves: dict[int, Curve] | None = None) -> tuple[list[linalg.Options], list[list | None]]:
    """Each block's widths from its narrowest measured one up (their measured or fitted
    sensitivities; zeros before any is measured), and what each option is: ``None`` for a block
    in float, else its ``(width, branch rank)`` per option (a block whose projections may take
    4-bit blocks: :func:`~.decide.unit_int4_options`, its sensitivity at a width and rank the
    width's plus the whole block's in 4 bits at that rank, scaled by the ratio of their 4-bit
    errors)."""
    out, labels = [], []
    for k, u in enumerate(units):
        low = grid_widths(u)[0]
        ks = tuple(x for x in u.ks if x >= low)
        errors = curves[k].at(list(ks)) if curves is not None else np.zeros(len(ks))
        narrowed = dataclasses.replace(u, ks=ks, errors=np.asarray(errors, dtype=np.float64))
        cand = int4.units.get(u.block.up.key) if int4 is not None else None
        if cand is not None:  # the layer-local 4-bit errors, rescaled to the measured ones
            whole = np.asarray(cand.forms[None][1], dtype=np.float64)
            measured = int4_curves[u.block.up.key].at(list(cand.ranks)) if int4_curves is not None else np.zeros(len(whole))
            forms = {}
            for width in (*ks, None):
                costs, local = cand.forms[width]
                ratio = np.divide(np.asarray(local), whole, out=np.ones(len(whole)), where=whole > 0)
                forms[width] = (costs, tuple(float(v) for v in measured * ratio))
            cand = Int4Unit(cand.ranks, forms)
        opt, lab = block_options(narrowed, names, byte_cost, cand)
        out.append(opt)
        labels.append(lab)
    return out, labels


def _cheapest(active: list[LayerPlan], units: list[WidthUnit], cfg: CompressConfig, base: BudgetBase,
              target: float | None, int4: Int4Forms | None, byte_cost: Callable[[Any, int], int] | None = None) -> None:
    """Allocate with nothing measured yet: raises when a budget cannot be met at all."""
    limits = base.limits(cfg, target_params=target)
    names = [name for name, _, _ in limits]
    allocate_decisions(active, _options(active, cfg, names, int4)[0], limits, base, STAGE,
                       units=_unit_options(units, None, names, byte_cost, int4)[0])


def _lowest_budget(active: list[LayerPlan], units: list[WidthUnit], cfg: CompressConfig, base: BudgetBase) -> float:
    """The smallest ``target_params`` the allocator can meet: each layer (block) at its cheapest
    option, counted exactly as the allocator counts it."""
    names = ["target_params"]
    cost = sum(float(o.costs[0][0]) for o in _options(active, cfg, names)[0] + _unit_options(units, None, names)[0])
    return min(1.0, (cost + base.params_fixed + 0.5) / base.params_total)


def _measurable_units(narrowed: Narrowed | None, main: set[str]) -> tuple[list[WidthUnit], list[tuple[str, str]]]:
    """The blocks whose width adaptive mode measures (their ``W2`` and ``b2`` in the main graph),
    and why each other one is left whole."""
    units, whole = [], []
    for u in (narrowed.units.values() if narrowed is not None else ()):
        if all(n in main for n in overridden_names(u.block)):
            units.append(u)
        else:
            whole.append((u.block.name, "adaptive mode measures blocks of the main graph only; left whole"))
    return units, whole


def decide_adaptive(model: onnx.ModelProto, plans: dict[int, LayerPlan], cfg: CompressConfig, base: BudgetBase, feeds: Feeds,
                    labels: np.ndarray | None, data: io.DataFiles | None, *, threads: int | None = None,
                    progress: Progress | None = None, executor: Executor | None = None,
                    narrowed: Narrowed | None = None, sample: Feeds | None = None, int4: Int4Forms | None = None,
                    byte_cost: Callable[[Any, int], int] | None = None) -> Adapted:
    """Measure, allocate and search (see the module docstring).

    ``sample``: the feeds sensitivities are measured on (default ``feeds``, which the budget
    search and its check always use).  ``int4``: the 4-bit forms a byte budget may choose.

    ``narrowed``: width reduction's result: blocks narrowed to a fixed fraction are in force in
    every run (and counted at their narrowed size); blocks whose width a budget sizes
    (``ffn_keep="auto"``) are measured at :func:`grid_widths` and allocated with the ranks.
    """
    active, decisions = _measurable(model, plans, cfg)
    base = base.with_decided_convs(plans, decisions)
    main = main_constants(model)
    units, whole = _measurable_units(narrowed, main)
    if int4 is not None and int4.units:  # a block in 4 bits is fed both projections: the first must be overridable too
        in_main = {u.block.up.key for u in units if all(g.weight.name in main for g, _, _ in u.block.firsts)}
        int4 = dataclasses.replace(int4, units={k: v for k, v in int4.units.items() if k in in_main})
    blocks4 = [u for u in units if int4 is not None and u.block.up.key in int4.units]
    if narrowed is not None:  # blocks not measured are left whole: a fixed part at their dense size
        base = base.with_widths(dataclasses.replace(narrowed, units={u.block.up.key: u for u in units}), byte_cost)
    fixed_plans = dict(narrowed.plans) if narrowed is not None else {}
    numbers: dict[str, Any] = {"grid": [round(f, 4) for f in GRID], "points": min(cfg.sensitivity_points or len(GRID), len(GRID))}
    if units:
        numbers["width_grid"] = [round(f, 4) for f in WIDTH_GRID]
    if not active and not units:
        return Adapted(decisions, numbers)
    # What can fail fails before the long measurement: a budget given must fit the cheapest
    # assignment, and the search starts from that assignment's own cost, counted as the
    # allocator counts it.
    lo = _lowest_budget(active, units, cfg, base)
    if cfg.max_drop is None:
        _cheapest(active, units, cfg, base, None, int4, byte_cost)
    fixed: dict[str, np.ndarray] = {}
    for plan in fixed_plans.values():
        fixed.update(emulated_arrays(plan))
    weights = [p.name for p in active] + [n for u in units for n in overridden_names(u.block)] + \
        [g.weight.name for u in blocks4 for g, _, _ in u.block.firsts] + list(fixed) + (list(int4.biases.values()) if int4 is not None else [])
    ev = Evaluator(model, weights, feeds, data, threads, fixed=fixed)
    try:
        metric, _ = quality_drop(ev.base, ev.base, labels, metric=cfg.metric, names=ev.names)
        sev = ev.on(sample if sample is not None else feeds)
        curves = measure_sensitivity(sev, active, cfg.rank_multiple, progress, executor, cfg.sensitivity_points, units, int4)
        sensitivity_passes = sev.passes if sev is not ev else sev.passes - 1  # (the reference pass is the search's too)
        if sev is not ev:
            ev.runs, ev.passes = ev.runs + sev.runs, ev.passes + sev.passes
        rank_curves, width_curves = curves[:len(active)], curves[len(active):len(active) + len(units)]
        quantized = [p.key for p in active if int4 is not None and p.key in int4.candidates]
        rest = curves[len(active) + len(units):]
        int4_curves = dict(zip(quantized, rest[:len(quantized)]))
        block4_curves = dict(zip([u.block.up.key for u in blocks4], rest[len(quantized):]))
        emulated: dict[tuple, dict[str, np.ndarray]] = {}
        refits: dict[tuple[int, int], WidthPlan] = {}

        def refit(k: int, width: int) -> WidthPlan:
            if (k, width) not in refits:
                refits[k, width] = units[k].plan(width)
            return refits[k, width]

        def assign(target: float | None) -> tuple[dict[int, Decision], dict[int, int | None], dict[int, int]]:
            limits = base.limits(cfg, target_params=target)
            names = [name for name, _, _ in limits]
            options, labels = _options(active, cfg, names, int4, rank_curves, int4_curves)
            unit_opts, unit_labels = _unit_options(units, width_curves, names, byte_cost, int4, block4_curves)
            chosen_units: list[int] = []
            picked: list[int] = []
            out = allocate_decisions(active, options, limits, base, STAGE, units=unit_opts, chosen_units=chosen_units,
                                     chosen_plans=picked)
            quantized_at = int4_choices(out, active, labels, picked, STAGE)
            quantized_at.update(block_int4_choices(units, unit_labels, chosen_units))
            return out, {k: opt.ranks[i] for k, (opt, i) in enumerate(zip(unit_opts, chosen_units))}, quantized_at

        def measure(chosen: tuple[dict[int, Decision], dict[int, int | None], dict[int, int]]) -> float:
            ranks, widths, quantized_at = chosen
            overrides = {p.name: truncated_weight(p, ranks[p.key].rank, int4) for p in active if ranks[p.key].factorize}
            for k, width in widths.items():
                r = quantized_at.get(units[k].block.up.key)
                if r is not None:
                    if (k, width, r) not in emulated:
                        emulated[k, width, r] = int4.unit_arrays(units[k], refit(k, width) if width is not None else None, r)
                    overrides.update(emulated[k, width, r])
                elif width is not None:
                    overrides.update(emulated_arrays(refit(k, width)))
            for p in active:
                if p.key in quantized_at:
                    if (p.key, quantized_at[p.key]) not in emulated:
                        emulated[p.key, quantized_at[p.key]] = int4.arrays(p, quantized_at[p.key])
                    overrides.update(emulated[p.key, quantized_at[p.key]])
            if not overrides and not fixed:
                return 0.0
            return quality_drop(ev.base, ev.run(overrides), labels, metric=cfg.metric, names=ev.names)[1]

        if cfg.max_drop is None:
            chosen = assign(None)
            drop, found = measure(chosen), cfg.target_params
        else:
            # nothing allocated: what the blocks narrowed to a fixed fraction lose alone
            hi, hi_drop = 1.0, quality_drop(ev.base, ev.run({}), labels, metric=cfg.metric, names=ev.names)[1] if fixed else 0.0
            chosen = assign(lo)
            drop = measure(chosen)
            if drop <= cfg.max_drop:
                hi, hi_drop = lo, drop
            else:
                for _ in range(SEARCH_STEPS):
                    mid = (lo + hi) / 2
                    d = measure(assign(mid))
                    if progress is not None:
                        progress(ev.passes, ev.passes, f"budget {mid:.4f}: drop {d:.5f}")
                    if d <= cfg.max_drop:
                        hi, hi_drop = mid, d
                    else:
                        lo = mid
            chosen = assign(hi)
            drop, found = hi_drop, hi
        ranks, widths, quantized_at = chosen
        for p, c in zip(active, rank_curves):
            d = ranks[p.key]
            decisions[p.key] = d.replace(sensitivity=float(c.at([d.rank])[0])) if d.factorize else d
        numbers.update(metric=metric, max_drop=cfg.max_drop, target_params=round(found, 6) if found is not None else None,
                       measured_drop=drop, layers_measured=len(active), ort_runs=ev.runs, passes=ev.passes,
                       sensitivity_passes=sensitivity_passes)
        if units:
            numbers["blocks_measured"] = len(units)
        log.info("adaptive: %d layer(s) measured in %d onnxruntime run(s); drop %.5f (%s)", len(active), ev.runs, drop, metric)
        new_widths = None
        if narrowed is not None and narrowed.units:
            chosen_plans = {**fixed_plans, **{units[k].block.up.key: refit(k, w) for k, w in widths.items() if w is not None}}
            per = "byte" if cfg.target_bytes is not None else "parameter"
            whole += [(units[k].block.name, f"left whole: other layers lose less per {per} saved")
                      for k, w in widths.items() if w is None]
            new_widths = dataclasses.replace(narrowed, plans=chosen_plans, units={}, skipped=narrowed.skipped + whole)
        if int4 is not None:
            numbers["int4_layers"] = len(quantized_at)
        return Adapted(decisions, numbers, ev.base, list(ev.names), widths=new_widths,
                       int4_ranks=quantized_at if int4 is not None else None,
                       int4_means=frozenset(int4.biases) if int4 is not None else frozenset())
    finally:
        ev.close()


class Adapt(Step):
    """Allocate ranks by sensitivity measured on the calibration data (``adaptive``)."""

    name = STAGE
    switch = "adaptive"

    def run(self, ctx: Context) -> Adapted:
        cfg = ctx.config
        plans = ctx.need(Spectra).plans
        active = measured_plans(ctx.model, plans, cfg)
        base = BudgetBase.of(ctx.need(Discovery).groups, active, cfg, ctx.need(Loaded).params)
        calibration = ctx.need(Calibration)
        feeds, sample = calibration.feeds, calibration.sensitivity_feeds(cfg.adaptive_samples)
        adapted = decide_adaptive(ctx.model, plans, cfg, base, feeds, feeds.labels, ctx.data, progress=ctx.progress,
                                  executor=ctx.executor, narrowed=ctx.get(Narrowed), sample=sample,
                                  int4=_int4_forms(ctx, [p for p in active if not p.is_conv]),
                                  byte_cost=block_byte_cost(cfg, ctx.need(Discovery)) if cfg.target_bytes is not None else None)
        if sample.samples is not None and adapted.base is not None:
            adapted.numbers["samples"] = sample.samples
        return adapted


def _int4_forms(ctx: Context, active: list[LayerPlan]) -> Int4Forms | None:
    """The 4-bit forms a byte budget may choose under ``--quantize int4`` (else ``None``): of the
    plans, and of the feed-forward blocks whose width it sizes."""
    cfg = ctx.config
    if cfg.quantize != "int4" or cfg.target_bytes is None:
        return None
    if cfg.int4_accuracy_level == 4:
        log.warning("with %s the runtime also rounds activations to int8, which the sensitivity runs (fed dequantized "
                    "weights) do not show: the drop they measure is smaller than the written model's; the check after "
                    "the rewrite measures the real one", option_value("int4_accuracy_level", 4))
    from .decide import itemsize
    from .int4 import (budget_candidates, emulated_block, emulated_corrected, emulated_weight, float_pairs, input_mean,
                       mean_biases, unit_candidates)
    from .rewrite import opset_version
    from .statistics import Statistics

    found = ctx.need(Discovery)
    stats = ctx.get(Statistics)
    grams = stats.capture.grams if stats is not None and cfg.data_aware else {}
    opset = opset_version(ctx.model)
    candidates = budget_candidates(ctx, active)
    narrowed = ctx.get(Narrowed)
    units = unit_candidates(ctx, narrowed.units) if narrowed is not None and narrowed.units else {}
    captured = {k: v[0] for k, v in stats.capture.grams.items()} if stats is not None else {}  # as the quantize stage reads them
    # the mean correction, where the quantize stage will write it into a bias fed here: of the
    # plans and of the projections of the blocks in 4 bits
    keys = [*candidates, *(k for key in units for k in narrowed.units[key].block.keys)]
    means = {k: m for k in keys if k in grams and (m := input_mean(stats.capture, k)) is not None}
    biases = mean_biases(ctx.model, [found.group(k) for k in means], ctx.data, cfg) if means else {}

    def arrays(plan: LayerPlan, rank: int) -> dict[str, np.ndarray]:
        group = found.group(plan.key)
        gram = grams[plan.key][0] if plan.key in grams else None
        stored = ctx.data.read(group.weight.tensor)
        if plan.key in biases:
            return emulated_corrected(group, stored, gram, means[plan.key], biases[plan.key], cfg, rank, opset)
        return {plan.name: emulated_weight(group, stored, gram, cfg, rank, opset)}

    def unit_arrays(unit: WidthUnit, plan: WidthPlan | None, rank: int) -> dict[str, np.ndarray]:
        return emulated_block(found, ctx.data, unit, plan, captured, cfg, rank, opset, means, biases)

    floats = float_pairs(ctx.model, [found.group(p.key) for p in active], cfg)
    int8s = frozenset(p.key for p in active if not p.is_conv and p.key not in floats) if cfg.int4_factors == "int8" else frozenset()
    return Int4Forms(candidates, arrays, {p.key: itemsize(found.group(p.key)) for p in active}, units, unit_arrays,
                     {k: bias.name for k, bias in biases.items()}, floats, int8s)


@dataclass
class Checked(StageResult):
    """The drop the rewritten model actually gives on the adaptive feeds, beside the search's numbers."""

    section = "adaptive"
    numbers: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.numbers)


class CheckAdaptive(Step):
    """Run the rewritten (and quantized) model on the calibration feeds: the drop the user
    actually gets."""

    name = "adaptive-check"

    def applies(self, ctx: Context) -> bool:
        adapted = ctx.get(Adapted)
        rewritten = ctx.get(Rewritten)
        if adapted is None or adapted.base is None or rewritten is None:
            return False
        # whatever changed the model: factor pairs, narrowed blocks, quantization (this runs after it)
        return bool(rewritten.factors) or bool(current_widths(ctx)) or ctx.config.quantize is not None

    def run(self, ctx: Context) -> Checked:
        adapted = ctx.need(Adapted)
        feeds = ctx.need(Calibration).feeds
        sess = session(ctx.model, data=ctx.data)
        outs = run_all(sess, feeds)
        numbers = dict(adapted.numbers)
        numbers["ort_runs"] = numbers.get("ort_runs", 0) + sum(1 for _ in feeds)
        numbers["passes"] = numbers.get("passes", 0) + 1
        drop = quality_drop(adapted.base, outs, feeds.labels, metric=ctx.config.metric, names=[o.name for o in sess.get_outputs()])[1]
        max_drop = numbers.get("max_drop")
        if max_drop is not None and drop > max_drop + 1e-6:
            log.warning("the rewritten model loses %.5f on the calibration set, above %s %g", drop, option("max_drop"), max_drop)
        numbers["final_drop"] = drop
        return Checked(numbers)
