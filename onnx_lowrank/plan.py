"""The plan: one entry per weight the pass may factorize, between discovery and the rewrite.

Stages, in order (``api.compress`` runs them):

1. :func:`build_plans` reads each factorizable weight and takes its spectrum: the plain SVD, or
   with input statistics the whitened one (data-aware mode);
2. a decider sets each plan's ``choice`` or ``reason``: :func:`decide` applies the per-layer rank
   rule and the break-even guard, :func:`decide_budget` allocates a global budget across the
   plans, and :mod:`onnx_lowrank.adaptive` allocates by measured sensitivity;
3. :func:`apply` rewrites the graph for every plan with a rank;
4. :func:`decisions` turns plans and discovery into the per-node report rows.

A plan sees a matrix ``M`` (m, n) and the users that run it; what ``M`` is for an op type is
decided in :func:`build_plans`: the weight itself for MatMul/Gemm, a reshaped view of the kernel
for Conv (:func:`~onnx_lowrank.linalg.conv_matrix`).  A Conv plan may hold both views
(``--conv-mode auto``); :func:`decide` picks the one with fewer multiply-accumulates.

MACs: a MatMul/Gemm costs ``m n`` per activation row dense and ``r (m + n)`` factorized.  A Conv's
cost depends on its output size (and, in spatial mode, on its input width); with both known
from the model's shapes it is counted per sample (batch 1).  When they are unknown (dynamic
spatial dims) it is counted per output pixel, taking the spatial form's intermediate as
``stride_w`` columns per output column (exact for SAME padding), and the report says so.  The
break-even guard of a Conv compares these MAC counts as well as parameters.
"""

from __future__ import annotations

import logging
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from . import io, linalg
from .config import DEFAULT_ENERGY, CompressConfig
from .discovery import Discovery, Layer, WeightGroup
from .errors import ModelError, UsageError
from .linalg import BudgetError, Options, RankChoice, allocate, choice_at, choose_rank, rank_options
from .report import LayerDecision
from .rewrite import NameScope, factorize_conv_group, factorize_group
from .shapes import ShapeInfo

__all__ = ["LayerPlan", "ConvUse", "ConvOption", "build_plans", "decide", "decide_budget", "BudgetBase", "apply", "decisions"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConvUse:
    """One Conv node that runs a planned weight, and its sizes when the model's shapes tell them.

    Attributes:
        layer: The node (its ``conv`` spec is set).
        in_size: Spatial input size, e.g. ``(H_i, W_i)``; ``None`` when unknown.
        out_size: Spatial output size; ``None`` when unknown.
    """

    layer: Layer
    in_size: tuple[int, ...] | None = None
    out_size: tuple[int, ...] | None = None

    @property
    def known(self) -> bool:
        return self.out_size is not None

    def macs(self, w_shape: tuple[int, ...], rank: int | None, mode: str) -> int:
        """MACs per sample, or per output pixel when the sizes are unknown; ``rank=None`` is dense."""
        spec = self.layer.conv
        if self.known:
            out, mid = self.out_size, self.in_size[-1]
        else:
            out, mid = (1,) * spec.ndim, spec.strides[-1]
        return linalg.conv_macs(w_shape, rank, mode, out, mid)


@dataclass(eq=False)
class ConvOption:
    """One matrix view of a Conv weight: its mode, shape and spectrum."""

    mode: str
    m: int
    n: int
    spectrum: linalg.Spectrum | None = None


@dataclass(eq=False)
class LayerPlan:
    """A weight group and what the pass intends to do with it.

    Attributes:
        group: The weight and its users.
        m, n: Shape of the matrix that is factorized.
        dtype: The weight's dtype; factors are cast back to it.
        spectrum: Its SVD (``None`` until read, or when it could not be taken).
        choice: The rank rule's outcome.
        factor_names: Names of the two factors once rewritten.
        refit: Factors ``(A, B)`` refitted on calibration activations; used instead of the
            truncated SVD's when set.
        extra: Per-plan numbers that later stages add to the report (e.g. sensitivity).
        op_kind: ``"matrix"`` (MatMul/Gemm) or ``"conv"``.
        weight_shape: The weight's stored shape.
        conv_mode: For Conv, the view ``m, n, spectrum`` belong to (``channel`` or ``spatial``).
        conv_options: For Conv, every view still in play, by mode.
        conv_uses: For Conv, one entry per user node.
    """

    group: WeightGroup
    m: int
    n: int
    dtype: np.dtype
    spectrum: linalg.Spectrum | None = None
    choice: RankChoice | None = None
    factor_names: tuple[str, str] | None = None
    refit: tuple[np.ndarray, np.ndarray] | None = None
    extra: dict = field(default_factory=dict)
    op_kind: str = "matrix"
    weight_shape: tuple[int, ...] = ()
    conv_mode: str | None = None
    conv_options: dict[str, ConvOption] = field(default_factory=dict)
    conv_uses: list[ConvUse] = field(default_factory=list)

    @property
    def reason(self) -> str | None:
        return self.group.reason

    @reason.setter
    def reason(self, value: str | None) -> None:
        self.group.reason = value

    @property
    def rank(self) -> int | None:
        return self.choice.rank if self.choice is not None else None

    @property
    def active(self) -> bool:
        """Whether the plan has a spectrum and no reason to be left alone yet."""
        return self.spectrum is not None and self.reason is None

    @property
    def whitened(self) -> bool:
        return self.spectrum is not None and self.spectrum.whiten is not None

    @property
    def users(self) -> int:
        return len(self.group.layers)

    @property
    def is_conv(self) -> bool:
        return self.op_kind == "conv"

    @property
    def macs_known(self) -> bool:
        """False for a Conv with an unknown spatial size (its MACs are per output pixel)."""
        return all(u.known for u in self.conv_uses)

    @property
    def dense_params(self) -> int:
        return self.m * self.n

    def params_at(self, rank: int) -> int:
        return linalg.lowrank_params(self.m, self.n, rank)

    def select(self, mode: str) -> None:
        """Make the Conv view ``mode`` the one that ``m``, ``n`` and ``spectrum`` describe."""
        opt = self.conv_options[mode]
        self.conv_mode, self.m, self.n, self.spectrum = mode, opt.m, opt.n, opt.spectrum

    def macs(self, rank: int | None, mode: str | None = None) -> int:
        """MACs summed over users; ``rank=None`` means dense.

        MatMul/Gemm: per activation row.  Conv: per sample, or per output pixel when the size is
        unknown (:attr:`macs_known`), in view ``mode`` (default: the selected one).
        """
        if not self.is_conv:
            per_user = self.dense_params if rank is None else self.params_at(rank)
            return per_user * self.users
        mode = mode or self.conv_mode
        return sum(u.macs(self.weight_shape, rank, mode) for u in self.conv_uses)

    def macs_per_row(self, rank: int | None) -> int:
        """MACs per activation row (per sample for a Conv), summed over users; ``None`` means dense."""
        return self.macs(rank)

    def break_even(self, mode: str | None = None) -> int:
        """Largest rank that saves both parameters and MACs (both are linear in the rank)."""
        if not self.is_conv:
            return linalg.break_even_rank(self.m, self.n)
        opt = self.conv_options[mode or self.conv_mode]
        by_params = linalg.break_even_rank(opt.m, opt.n)
        by_macs = (self.macs(None) - 1) // max(1, self.macs(1, opt.mode))
        return min(by_params, by_macs)


Progress = Callable[[int, int, str], None]


def build_plans(
    found: Discovery,
    source_dir: Path | None,
    progress: Progress | None = None,
    *,
    grams: dict[int, tuple[np.ndarray, str]] | None = None,
    out_grams: dict[int, np.ndarray] | None = None,
    damping: float = linalg.DEFAULT_DAMPING,
    notes: dict[int, str] | None = None,
    conv_mode: str = "auto",
    shapes: ShapeInfo | None = None,
) -> list[LayerPlan]:
    """Read each factorizable weight and take its spectrum (the slow step: one SVD per weight).

    Args:
        found: Discovery's result.
        source_dir: Where external data lives.
        progress: Called after each SVD.
        grams: Per group ``id``: ``(G, side)`` input statistics; those MatMul/Gemm groups get the
            whitened spectrum (data-aware mode).
        out_grams: Per group ``id``: an output-side weight for the whitened spectrum (attention
            query/key projections; :func:`onnx_lowrank.activations.capture_grams`).
        damping: Relative damping of ``G`` (and of the output-side weight).
        notes: Per group ``id``: a remark for the report (e.g. why the plain SVD was used).
        conv_mode: ``channel``, ``spatial`` or ``auto``; ``auto`` takes both views of a 2-D
            Conv kernel (two SVDs) so that :func:`decide` can compare them.
        shapes: Known value shapes, for Conv sizes; without them Conv MACs are per output pixel.
    """
    grams = grams or {}
    out_grams = out_grams or {}
    notes = notes or {}
    plans = []
    todo = [g for g in found.groups if g.reason is None]
    for k, group in enumerate(todo, 1):
        w = group.weight
        try:
            arr = io.read_tensor(w.tensor, source_dir)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read weight '{w.name}': {exc}") from None
        if group.layers[0].is_conv:
            plan = _conv_plan(group, arr, conv_mode, shapes)
        else:
            m, n = arr.shape
            plan = LayerPlan(group=group, m=m, n=n, dtype=arr.dtype, weight_shape=arr.shape)
            try:
                if id(group) in grams:
                    g, side = grams[id(group)]
                    plan.spectrum = None
                    if id(group) in out_grams:
                        try:
                            plan.spectrum = linalg.whitened_spectrum(arr, g, side, damping, out_gram=out_grams[id(group)])
                            plan.extra["note"] = "attention-aware"
                        except ValueError as exc:  # e.g. keys that never vary: weigh by the input only
                            log.info("attention-aware weighting of %s skipped: %s", w.name, exc)
                    if plan.spectrum is None:
                        plan.spectrum = linalg.whitened_spectrum(arr, g, side, damping)
                else:
                    plan.spectrum = linalg.spectrum(arr)
            except ValueError as exc:
                plan.reason = f"cannot factorize: {exc}"
        if id(group) in notes:
            plan.extra["note"] = notes[id(group)]
        plans.append(plan)
        if progress is not None:
            progress(k, len(todo), w.name)
    return plans


def _conv_use(layer: Layer, shapes: ShapeInfo | None) -> ConvUse:
    spec = layer.conv
    shape = shapes.get(layer.node.input[0]) if shapes is not None else None
    if shape is None or len(shape) != spec.ndim + 2 or any(d is None for d in shape[2:]):
        return ConvUse(layer)
    in_size = tuple(int(d) for d in shape[2:])
    out = linalg.conv_output_size(in_size, spec.kernel, spec.strides, spec.pads, spec.dilations, spec.auto_pad)
    if min(out) < 1:  # the model is inconsistent here; count per pixel rather than guess
        return ConvUse(layer)
    return ConvUse(layer, in_size=in_size, out_size=out)


def _conv_plan(group: WeightGroup, arr: np.ndarray, conv_mode: str, shapes: ShapeInfo | None) -> LayerPlan:
    nd = arr.ndim - 2
    modes = ["channel", "spatial"] if conv_mode == "auto" else [conv_mode]
    if nd != 2 and "spatial" in modes:
        modes.remove("spatial")  # auto: spatial-wise needs kh x kw
    plan = LayerPlan(group=group, m=0, n=0, dtype=arr.dtype, op_kind="conv", weight_shape=tuple(arr.shape),
                     conv_uses=[_conv_use(layer, shapes) for layer in group.layers])
    if not modes:
        plan.reason = (f"spatial-wise decomposition needs a 2-D kernel (kh x kw); this Conv's kernel is {nd}-D "
                       f"{list(arr.shape[2:])}; use --conv-mode channel or auto")
        plan.conv_options["channel"] = ConvOption("channel", *linalg.conv_matrix_shape(arr.shape, "channel"))
        plan.select("channel")
        return plan
    for mode in modes:
        opt = ConvOption(mode, *linalg.conv_matrix_shape(arr.shape, mode))
        try:
            opt.spectrum = linalg.spectrum(linalg.conv_matrix(arr, mode))
        except ValueError as exc:
            plan.reason = f"cannot factorize: {exc}"
        plan.conv_options[mode] = opt
    plan.select(modes[0])
    return plan


def decide(plans: list[LayerPlan], cfg: CompressConfig) -> None:
    """Choose each plan's rank by the configured rule; plans that would save nothing get a reason.

    A Conv plan with both views chooses a rank in each and keeps the view with fewer MACs
    (``channel`` on a tie: one fewer odd-shaped kernel).
    """
    for plan in plans:
        if plan.spectrum is None:
            continue
        if plan.is_conv:
            decide_conv(plan, cfg)
            continue
        plan.choice = choose_rank(plan.spectrum.s, plan.m, plan.n, energy=cfg.effective_energy, rank=cfg.rank,
                                  rank_multiple=cfg.rank_multiple, rule=cfg.rank_rule)
        if not plan.choice.saves:
            r, m, n = plan.choice.rank, plan.m, plan.n
            plan.reason = f"rank {r} saves nothing: {r}*({m}+{n}) >= {m}*{n} (break-even {plan.choice.break_even})"


@dataclass(frozen=True)
class BudgetBase:
    """What a budget fraction is a fraction of, and what no decision here can change.

    Attributes:
        params_total: Parameters the fraction applies to (all candidate weights, or the model).
        params_fixed: Of those, parameters outside the active plans (left alone whatever happens).
        macs_total: MACs per row of every candidate layer.
        macs_fixed: Of those, MACs outside the active plans.
    """

    params_total: int
    params_fixed: int
    macs_total: int
    macs_fixed: int

    @classmethod
    def of(cls, found: Discovery, plans: list[LayerPlan], cfg: CompressConfig, model_params: int) -> "BudgetBase":
        weights = 0
        macs = 0
        for group in found.groups:
            if group.weight.tensor is not None:
                dense = int(np.prod(group.weight.shape))
                weights += dense
                macs += dense * len(group.layers)
        active = [p for p in plans if p.active and not p.is_conv]
        base = model_params if cfg.budget_scope == "model" else weights
        return cls(
            params_total=base,
            params_fixed=base - sum(p.dense_params for p in active),
            macs_total=macs,
            macs_fixed=macs - sum(p.macs_per_row(None) for p in active),
        )

    def with_decided_convs(self, plans: list[LayerPlan]) -> "BudgetBase":
        """The same base with every Conv the per-layer rule factorized counted at its factorized
        size: those parameters are fixed, but not at their dense size (that would leave the
        budget's difference unused)."""
        saved = sum(p.dense_params - p.params_at(p.rank) for p in plans if p.is_conv and p.reason is None and p.choice is not None)
        return dataclasses.replace(self, params_fixed=self.params_fixed - saved)

    def limits(self, cfg: CompressConfig, target_params: float | None = None) -> list[tuple[str, float, int]]:
        """``(flag, fraction, budget left for the active plans)`` for each budget in force."""
        out = []
        fp = cfg.target_params if target_params is None else target_params
        if fp is not None:
            out.append(("--target-params", float(fp), int(np.floor(fp * self.params_total)) - self.params_fixed))
        if cfg.target_macs is not None:
            out.append(("--target-macs", float(cfg.target_macs), int(np.floor(cfg.target_macs * self.macs_total)) - self.macs_fixed))
        return out


def budget_options(plan: LayerPlan, errors_at: Callable[[list[int]], np.ndarray], flags: list[str], rank_multiple: int,
                   min_rank: int = 1) -> Options:
    """A plan's options under a budget: ranks up to break-even, then dense, with their costs."""
    ranks = [r for r in rank_options(plan.m, plan.n, rank_multiple) if r >= min_rank]
    errs = np.append(errors_at(ranks), 0.0) if ranks else np.zeros(1)
    cols = []
    for flag in flags:
        if flag == "--target-params":
            cols.append([plan.params_at(r) for r in ranks] + [plan.dense_params])
        else:
            cols.append([plan.macs_per_row(r) for r in ranks] + [plan.macs_per_row(None)])
    costs = np.array(cols, dtype=np.float64).T.reshape(len(ranks) + 1, len(flags))
    return Options(ranks=tuple(ranks) + (None,), errors=errs, costs=costs)


def truncation_errors(plan: LayerPlan) -> Callable[[list[int]], np.ndarray]:
    """Normalized squared truncation error ``1 - E(r)`` of a plan's spectrum (plain or whitened)."""
    s = plan.spectrum.s
    return lambda ranks: np.array([1.0 - linalg.energy_kept(s, r) for r in ranks])


def allocate_plans(plans: list[LayerPlan], options: list[Options], limits: list[tuple[str, float, int]], base: BudgetBase) -> None:
    """Run the allocator and set each plan's choice (a rank) or reason (left dense).

    Raises:
        UsageError: a budget is below what every plan at its lowest rank costs (names the flag).
    """
    try:
        chosen = allocate(options, [b for _, _, b in limits])
    except BudgetError:
        lowest = np.sum([o.costs[0] for o in options], axis=0) if options else np.zeros(len(limits))
        for (flag, frac, budget), need in zip(limits, lowest):
            if need > budget:
                total, fixed = (base.params_total, base.params_fixed) if flag == "--target-params" else (base.macs_total, base.macs_fixed)
                reach = (need + fixed) / total if total else 1.0
                raise UsageError(f"{flag} {frac:g} cannot be met: with every layer at its lowest rank {reach:.4f} remains; "
                                 f"pass {flag} {np.ceil(reach * 1e4) / 1e4:g} or more, or widen the layer selection.") from None
        raise
    for plan, opt, k in zip(plans, options, chosen):
        r = opt.ranks[k]
        if r is None:
            full = min(plan.m, plan.n)
            plan.choice = choice_at(plan.spectrum.s, plan.m, plan.n, full)
            plan.reason = "left dense by the budget: other layers lose less per parameter saved"
        else:
            plan.choice = choice_at(plan.spectrum.s, plan.m, plan.n, r)


def decide_budget(plans: list[LayerPlan], cfg: CompressConfig, base: BudgetBase) -> None:
    """Allocate ``--target-params``/``--target-macs`` across the plans by greedy water-filling.

    The error a plan contributes is its normalized squared truncation error ``1 - E(r)`` (of
    the whitened spectrum in data-aware mode); break-even and ``rank_multiple`` bound its ranks.
    """
    for plan in plans:
        if plan.is_conv and plan.reason is None:
            decide_conv(plan, cfg)  # Conv layers follow the per-layer rule; their cost counts as fixed
    base = base.with_decided_convs(plans)
    active = [p for p in plans if p.active and not p.is_conv]
    limits = base.limits(cfg)
    flags = [f for f, _, _ in limits]
    options = [budget_options(p, truncation_errors(p), flags, cfg.rank_multiple) for p in active]
    allocate_plans(active, options, limits, base)


def decide_conv(plan: LayerPlan, cfg: CompressConfig) -> None:
    dense = plan.macs(None)
    unit = "MACs" if plan.macs_known else "MACs per output pixel"
    outcomes = []
    for opt in plan.conv_options.values():
        if opt.spectrum is None:
            continue
        # Budgets and adaptive allocation cover MatMul/Gemm; a Conv keeps the per-layer rule,
        # at the default energy when the configuration sets none.
        energy = cfg.effective_energy if cfg.effective_energy is not None or cfg.rank is not None else DEFAULT_ENERGY
        choice = choose_rank(opt.spectrum.s, opt.m, opt.n, energy=energy, rank=cfg.rank, rank_multiple=cfg.rank_multiple,
                             rule=cfg.rank_rule, break_even=plan.break_even(opt.mode))
        outcomes.append((not choice.saves, plan.macs(choice.rank, opt.mode), opt.mode != "channel", opt.mode, choice))
    outcomes.sort(key=lambda o: o[:3])
    mode, choice = outcomes[0][3], outcomes[0][4]
    plan.select(mode)
    plan.choice = choice
    if choice.saves:
        return
    tried = []
    for _, macs_r, _, mode_r, choice_r in outcomes:
        params_r = choice_r.rank * (plan.conv_options[mode_r].m + plan.conv_options[mode_r].n)
        tried.append(f"{mode_r}-wise rank {choice_r.rank} needs {macs_r:,} {unit} and {params_r:,} parameters "
                     f"(break-even rank {choice_r.break_even})")
    plan.reason = (f"factoring saves nothing: {'; '.join(tried)}; the dense Conv needs {dense:,} {unit} "
                   f"and {int(np.prod(plan.weight_shape)):,} parameters")


def apply(model: onnx.ModelProto, plans: list[LayerPlan]) -> None:
    """Rewrite every plan that has a rank and no reason."""
    names = NameScope(model)
    for plan in plans:
        if plan.reason is None and plan.choice is not None:
            if plan.refit is not None and plan.refit[0].shape[1] == plan.choice.rank:
                a, b = (np.ascontiguousarray(f, dtype=plan.dtype) for f in plan.refit)
            else:
                a, b = linalg.factors(plan.spectrum, plan.choice.rank, dtype=plan.dtype)
            if plan.is_conv:
                first, second = linalg.conv_kernels(a, b, plan.weight_shape, plan.conv_mode)
                plan.factor_names = factorize_conv_group(model, plan.group, first, second, plan.conv_mode, names)
            else:
                plan.factor_names = factorize_group(model, plan.group, a, b, names)


def _conv_macs_row(layer: Layer, plan: LayerPlan | None, factorized: bool, shapes: ShapeInfo | None) -> tuple[int, int, str | None]:
    """``(macs_before, macs_after, unit)`` of one Conv row; zeros when its geometry is unknown."""
    use = None
    if plan is not None:
        use = next((u for u in plan.conv_uses if u.layer is layer), None)
    elif layer.conv is not None and layer.weight is not None:
        use = _conv_use(layer, shapes)
    if use is None:
        return 0, 0, None
    shape = layer.weight.shape
    before = use.macs(shape, None, "channel")
    after = use.macs(shape, plan.rank, plan.conv_mode) if factorized else before
    return before, after, "sample" if use.known else "output pixel"


def decisions(found: Discovery, plans: list[LayerPlan], shapes: ShapeInfo | None = None) -> list[LayerDecision]:
    """One report row per discovered node, in graph order.

    Args:
        shapes: Known value shapes, to count the MACs of Conv nodes that have no plan.
    """
    by_group = {id(p.group): p for p in plans}
    rows: dict[int, LayerDecision] = {}
    for group in found.groups:
        plan = by_group.get(id(group))
        w = group.weight
        shape = w.shape if w.tensor is not None else None
        choice = plan.choice if plan is not None else None
        factorized = plan is not None and plan.reason is None and choice is not None
        if group.reason is not None:
            log.debug("left %s alone: %s", w.name, group.reason)
        dense = int(np.prod(shape)) if shape else 0
        low = plan.params_at(choice.rank) if factorized else dense
        for k, layer in enumerate(group.layers):
            if layer.is_conv:
                macs_before, macs_after, unit = _conv_macs_row(layer, plan, factorized, shapes)
            else:
                macs_before, macs_after, unit = dense, low, "row"
            rows[id(layer)] = LayerDecision(
                node=layer.display_name,
                op_type=layer.op_type,
                weight=w.name,
                shape=shape,
                rank=choice.rank if choice else None,
                full_rank=choice.full_rank if choice else None,
                break_even=choice.break_even if choice else None,
                energy=choice.energy if choice else None,
                rel_error=choice.rel_error if choice else None,
                params_before=dense if k == 0 else 0,
                params_after=low if k == 0 else 0,
                macs_before=macs_before,
                macs_after=macs_after,
                factorized=factorized,
                reason=None if factorized else (layer.reason or group.reason),
                factors=plan.factor_names if plan is not None else None,
                shared_with=group.layers[0].display_name if k > 0 else None,
                whitened=plan.whitened if plan is not None else False,
                sensitivity=plan.extra.get("sensitivity") if plan is not None else None,
                note=plan.extra.get("note") if plan is not None else None,
                conv_mode=plan.conv_mode if plan is not None and plan.is_conv and choice is not None else None,
                macs_per=unit,
            )
    out = []
    counted = {id(g.weight) for g in found.groups}
    for layer in found.layers:
        row = rows.get(id(layer))
        if row is None:
            has_shape = layer.weight is not None and layer.weight.tensor is not None
            shape = layer.weight.shape if has_shape else None
            # Weights left alone before grouping (e.g. factor pairs) still count, once each.
            params = 0
            if shape and id(layer.weight) not in counted:
                counted.add(id(layer.weight))
                params = int(np.prod(shape))
            matrix = not (layer.is_conv or layer.op_type == "ConvTranspose")
            # a matrix left alone still runs: its MACs per activation row count, the same before and after
            macs = int(np.prod(shape)) if matrix and shape and len(shape) == 2 else 0
            row = LayerDecision(node=layer.display_name, op_type=layer.op_type, weight=layer.weight_name,
                                shape=shape, reason=layer.reason, params_before=params, params_after=params,
                                macs_before=macs, macs_after=macs, macs_per="row" if matrix else None)
        out.append(row)
    return out
