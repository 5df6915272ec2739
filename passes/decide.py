"""Decide: each layer's rank, by the per-layer rule or under a global budget.

* Per-layer (``energy``, ``rank``, ``rank_rule``): each plan's rank from its own spectrum
  (:mod:`onnx_lowrank.linalg.rank`); a rank that saves nothing leaves the layer alone.
* Budget (``target_params``, ``target_macs``, ``target_bytes``): the ranks of all plans at once,
  by greedy water-filling on the normalized truncation error ``1 - E(r)`` (of the whitened
  spectrum in data-aware mode; :mod:`onnx_lowrank.linalg.allocate`).  A Conv takes part under
  ``target_params`` alone, in one view (:attr:`~onnx_lowrank.plan.LayerPlan.budget_mode`: the one
  that keeps more energy at half the parameters), its ranks capped where they stop saving MACs.
* Otherwise a Conv keeps the per-layer rule (at the default energy when none is set), and with
  both views in play keeps the one with fewer MACs (``channel`` on a tie: one fewer odd-shaped
  kernel).  Under ``target_macs`` (MACs per activation row, a MatMul's unit) and ``target_bytes``
  (MatMul/Gemm weights only) its factorized size then counts as fixed.

Adaptive allocation (:mod:`.adaptive`) replaces this stage when ``adaptive`` is on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
from onnx import helper

from onnx_lowrank import linalg
from onnx_lowrank.config import DEFAULT_ENERGY, CompressConfig
from onnx_lowrank.errors import UsageError, option, option_value
from onnx_lowrank.pipeline import Context, StageResult, Step
from onnx_lowrank.plan import MATRIX, Decision, LayerPlan, Skip, SkipCode

__all__ = ["Decide", "Decided", "BudgetBase", "per_layer", "decide_conv", "decide_budget", "budget_options", "allocated_plans",
           "allocate_decisions", "rank_ceiling", "BUDGETS", "plan_options", "int4_choices", "width_options", "block_byte_cost",
           "Int4Unit", "unit_int4_options", "block_options", "block_int4_choices"]

STAGE = "decide"
#: The budget options, as config keys.
BUDGETS = ("target_params", "target_macs", "target_bytes")
#: Correction ranks a byte budget may give a weight in 4-bit blocks (``--quantize int4``).
INT4_RANKS = (0, 4, 8, 16, 24, 32, 48, 64)


@dataclass
class Decided(StageResult):
    """The current decision for every plan, by weight-group key (later deciders return their own).

    ``widths``: with ``ffn_keep="auto"``, the feed-forward widths the budget chose (a new
    :class:`~.width.Narrowed`, which is then also the report's ``width`` section).
    """

    decisions: dict[int, Decision] = field(default_factory=dict)
    widths: Any = field(default=None, kw_only=True)
    #: With ``--quantize int4`` and ``target_bytes``: the weights the budget gave 4-bit blocks, by
    #: group key, and the rank of each one's correction branch.
    int4_ranks: dict[int, int] | None = field(default=None, kw_only=True)

    @property
    def section(self) -> str | None:  # type: ignore[override]
        return "width" if self.widths is not None else None

    def to_dict(self) -> dict[str, Any]:
        return self.widths.to_dict() if self.widths is not None else {}


def latest_decided(ctx: Context, attribute: str) -> Any:
    """The last non-``None`` ``attribute`` (``widths``, ``int4_ranks``) any decider returned:
    later deciders (refine, the latency check) return decisions without them."""
    return next((getattr(r, attribute) for r in reversed(list(ctx.results.values()))
                 if isinstance(r, Decided) and getattr(r, attribute) is not None), None)


def allocates_convs(cfg: CompressConfig) -> bool:
    """Whether a budget (or adaptive mode) allocates the Conv plans too: under ``target_params``
    (or adaptive mode's search over it), not under ``target_macs`` or ``target_bytes``."""
    return cfg.target_macs is None and cfg.target_bytes is None


def budget_sizes(cfg: CompressConfig, is_conv: bool) -> bool:
    """Whether a budget (or adaptive mode) gives a plan of this kind its rank, rather than the
    per-layer rule."""
    return (cfg.has_budget or cfg.adaptive) and (not is_conv or allocates_convs(cfg))


def allocated_plans(plans: dict[int, LayerPlan], cfg: CompressConfig) -> list[LayerPlan]:
    """The active plans a budget (or adaptive mode) allocates; the other active ones (Conv
    plans under ``target_macs``/``target_bytes``, and a Conv no rank of which saves MACs and
    parameters) follow the per-layer rule."""
    convs = allocates_convs(cfg)
    return [p for p in plans.values() if p.active and (not p.is_conv or (convs and p.break_even(p.budget_mode) >= 1))]


def _conv_energy(cfg: CompressConfig) -> float | None:
    # A Conv keeps the per-layer rule, at the default energy when the configuration sets none.
    return cfg.effective_energy if cfg.effective_energy is not None or cfg.rank is not None else DEFAULT_ENERGY


def rank_ceiling(cfg: CompressConfig, is_conv: bool, s, total: float | None, m: int, n: int, break_even: int) -> int:
    """The highest rank any decider can give an ``(m, n)`` view with singular values ``s`` (of
    ``total`` energy; ``break_even`` its layer's): the spectra stage keeps only that many
    singular vectors, so memory follows the factors, not the weights."""
    if budget_sizes(cfg, is_conv):
        return min(break_even, m, n)
    return linalg.choose_rank(s, m, n, energy=rule_energy(cfg, is_conv), rank=cfg.rank, rank_multiple=cfg.rank_multiple,
                              rule=cfg.rank_rule, break_even=break_even if is_conv else None, total=total).rank


def rule_energy(cfg: CompressConfig, is_conv: bool) -> float | None:
    """The energy threshold the per-layer rule applies to a layer (``None``: a fixed rank)."""
    return _conv_energy(cfg) if is_conv else cfg.effective_energy


def rule_choice(cfg: CompressConfig, is_conv: bool, v, break_even: int | None = None) -> linalg.RankChoice:
    """The per-layer rule's choice for view ``v`` (a Conv's ``break_even`` counts its MACs too)."""
    return linalg.choose_rank(v.spectrum.s, v.m, v.n, energy=rule_energy(cfg, is_conv), rank=cfg.rank,
                              rank_multiple=cfg.rank_multiple, rule=cfg.rank_rule, break_even=break_even if is_conv else None,
                              total=v.spectrum.total)


def _rule(cfg: CompressConfig, plan: LayerPlan, v) -> linalg.RankChoice:
    return rule_choice(cfg, plan.is_conv, v, plan.break_even(v.mode) if plan.is_conv else None)


def per_layer(plan: LayerPlan, cfg: CompressConfig) -> Decision:
    """The per-layer rule's decision for one plan."""
    if plan.is_conv:
        return decide_conv(plan, cfg)
    v = plan.view()
    choice = _rule(cfg, plan, v)
    if choice.saves:
        return Decision(plan.key, MATRIX, choice)
    r, m, n = choice.rank, v.m, v.n
    skip = Skip(SkipCode.SAVES_NOTHING, f"rank {r} saves nothing: {r}*({m}+{n}) >= {m}*{n} (break-even {choice.break_even})", STAGE)
    return Decision(plan.key, MATRIX, choice, skip)


def decide_conv(plan: LayerPlan, cfg: CompressConfig) -> Decision:
    """A Conv's rank in each view it has, and the view with fewer MACs; under a fixed ``rank``,
    which holds no error level in common between the views, the view that keeps more energy
    at that rank (then fewer MACs)."""
    dense = plan.macs(None)
    unit = "MACs" if plan.macs_known else "MACs per output pixel"
    outcomes = []
    for v in plan.views.values():
        if v.spectrum is None:
            continue
        choice = _rule(cfg, plan, v)
        lost = round(1.0 - choice.energy, 6) if cfg.rank is not None else 0.0
        outcomes.append((not choice.saves, lost, plan.macs(choice.rank, v.mode), v.mode != "channel", v.mode, choice))
    outcomes.sort(key=lambda o: o[:4])
    outcomes = [(o[0], o[2], o[3], o[4], o[5]) for o in outcomes]
    mode, choice = outcomes[0][3], outcomes[0][4]
    if choice.saves:
        return Decision(plan.key, mode, choice)
    tried = []
    for _, macs_r, _, mode_r, choice_r in outcomes:
        params_r = plan.params_at(choice_r.rank, mode_r)
        tried.append(f"{mode_r}-wise rank {choice_r.rank} needs {macs_r:,} {unit} and {params_r:,} parameters "
                     f"(break-even rank {choice_r.break_even})")
    skip = Skip(SkipCode.SAVES_NOTHING, f"factoring saves nothing: {'; '.join(tried)}; the dense Conv needs {dense:,} {unit} "
                f"and {plan.dense_params:,} parameters", STAGE)
    return Decision(plan.key, mode, choice, skip)


@dataclass(frozen=True)
class BudgetBase:
    """What a budget fraction is a fraction of, and what no decision here can change.

    Attributes:
        params_total: Parameters the fraction applies to (all candidate weights, or the model).
        params_fixed: Of those, parameters outside the plans being allocated (whatever happens to them).
        macs_total: MACs per row of every candidate layer.
        macs_fixed: Of those, MACs outside the plans being allocated.
    """

    params_total: int
    params_fixed: int
    macs_total: int
    macs_fixed: int
    bytes_total: int = 0
    bytes_fixed: int = 0

    @classmethod
    def of(cls, groups, plans: list[LayerPlan], cfg: CompressConfig, model_params: int) -> "BudgetBase":
        """The base for allocating ``plans`` (:func:`allocated_plans`) among discovery's ``groups``
        (MACs per row: a weight's elements per user; a Conv's per output pixel at stride 1)."""
        weights = macs = n_bytes = fixed_bytes = 0
        keys = {p.key for p in plans}
        for group in groups:
            if group.weight.tensor is not None:
                dense = int(np.prod(group.weight.shape))
                weights += dense
                macs += dense * len(group.layers)
                if not any(layer.is_conv for layer in group.layers):  # bytes: MatMul/Gemm weights only
                    n_bytes += dense * itemsize(group)
                    if group.key not in keys:  # written as the quantization leaves it
                        fixed_bytes += stored_bytes(cfg, dense, itemsize(group), None, channels=max(group.weight.shape))
        base = model_params if cfg.budget_scope == "model" else weights
        return cls(params_total=base, params_fixed=base - sum(p.dense_params for p in plans),
                   macs_total=macs, macs_fixed=macs - sum(p.dense_params * p.users for p in plans),
                   bytes_total=n_bytes, bytes_fixed=fixed_bytes)

    def with_widths(self, narrowed, byte_cost: Callable[[Any, int], int] | None = None) -> "BudgetBase":
        """The same base with the feed-forward blocks of width reduction taken out of the fixed
        part: a block narrowed to a fraction counts at its narrowed size, a block the budget
        sizes (``ffn_keep="auto"``) is allocated, not fixed.  ``byte_cost(block, params)``: the
        bytes a block's projections take as written (for ``target_bytes``)."""
        out = narrowed.saved_params() + sum(u.dense_params for u in narrowed.units.values())
        out_bytes = 0
        if byte_cost is not None:
            out_bytes = sum(byte_cost(u.block, u.dense_params) for u in narrowed.units.values())
            out_bytes += sum(byte_cost(p.block, p.dense_params) - byte_cost(p.block, p.params) for p in narrowed.plans.values())
        return dataclasses.replace(self, params_fixed=self.params_fixed - out, macs_fixed=self.macs_fixed - out,
                                   bytes_fixed=self.bytes_fixed - out_bytes)

    def with_decided_convs(self, plans: dict[int, LayerPlan], decisions: dict[int, Decision]) -> "BudgetBase":
        """The same base with every Conv the per-layer rule factorized counted at its factorized
        size: those parameters (and MACs: a Conv's per output pixel at stride 1, its weights per
        user) are fixed, but not at their dense size (that would leave the budget's difference
        unused, or refuse a MACs budget the model meets)."""
        done = [(plans[k], plans[k].dense_params - plans[k].params_at(d.rank, d.mode)) for k, d in decisions.items()
                if plans[k].is_conv and d.factorize]
        return dataclasses.replace(self, params_fixed=self.params_fixed - sum(s for _, s in done),
                                   macs_fixed=self.macs_fixed - sum(s * p.users for p, s in done))

    def limits(self, cfg: CompressConfig, target_params: float | None = None) -> list[tuple[str, float, int]]:
        """``(option, fraction, budget left for the allocated plans)`` for each budget in force."""
        out = []
        fp = cfg.target_params if target_params is None else target_params
        if fp is not None:
            out.append(("target_params", float(fp), int(np.floor(fp * self.params_total)) - self.params_fixed))
        if cfg.target_macs is not None:
            out.append(("target_macs", float(cfg.target_macs), int(np.floor(cfg.target_macs * self.macs_total)) - self.macs_fixed))
        if cfg.target_bytes is not None:
            out.append(("target_bytes", float(cfg.target_bytes),
                        int(np.floor(cfg.target_bytes * self.bytes_total)) - self.bytes_fixed))
        return out

    def total(self, name: str) -> tuple[int, int]:
        """``(total, fixed)`` of one budget."""
        return {"target_params": (self.params_total, self.params_fixed), "target_macs": (self.macs_total, self.macs_fixed),
                "target_bytes": (self.bytes_total, self.bytes_fixed)}[name]


def itemsize(group) -> int:
    """Bytes per element of a weight group's tensor (4 when its type is unknown)."""
    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(group.weight.tensor.data_type)).itemsize)
    except Exception:  # an unknown or non-numeric type: priced as float32
        return 4


#: Bytes of one int8 quantization parameter set as onnxruntime writes it: a float32 scale and an
#: int8 zero point.
INT8_SCALE_BYTES = 5


def stored_bytes(cfg: CompressConfig, elements: int, size: int, rank: int | None, float_pair: bool = False,
                 channels: int = 0) -> int:
    """Bytes ``elements`` weights (a rank-``rank`` factor pair's, or a dense matrix's for
    ``None``) take once the output is written: int8 after ``--quantize int8*``, with a scale and
    zero point per tensor, or per output column (``channels``: the dense matrix's, which the
    pair's second factor keeps; the first factor has ``rank``) under ``int8-per-channel``; under
    ``int4``, factors stored int8 (``int4_factors``) carry one float32 scale per singular
    direction on each side, unless the quantize stage leaves this pair float (``float_pair``:
    :func:`~.int4.float_pairs`)."""
    if cfg.quantize == "int8":
        return elements + INT8_SCALE_BYTES * (1 if rank is None else 2)
    if cfg.quantize == "int8-per-channel":
        return elements + INT8_SCALE_BYTES * (max(channels, 1) + (rank or 0))
    if cfg.quantize == "int4" and rank is not None and cfg.int4_factors == "int8" and not float_pair:
        return elements + 8 * rank
    return elements * size


def budget_options(plan: LayerPlan, errors_at: Callable[[list[int]], np.ndarray], budgets: list[str], rank_multiple: int,
                   min_rank: int = 1, byte_cost: Callable[[int | None], int] | None = None) -> linalg.Options:
    """A plan's options under a budget, in its :attr:`~onnx_lowrank.plan.LayerPlan.budget_mode`:
    ranks up to break-even (a Conv's: where its MACs stop falling too), then dense, with their
    costs (``byte_cost(rank)``, ``byte_cost(None)`` for dense: the bytes, for ``target_bytes``)."""
    mode = plan.budget_mode
    v = plan.view(mode)
    top = plan.break_even(mode)
    ranks = [r for r in linalg.rank_options(v.m, v.n, rank_multiple) if min_rank <= r <= top]
    errs = np.append(errors_at(ranks), 0.0) if ranks else np.zeros(1)
    cols = []
    for budget in budgets:
        if budget == "target_params":
            cols.append([plan.params_at(r, mode) for r in ranks] + [plan.dense_params])
        elif budget == "target_bytes":
            if byte_cost is None:
                raise ValueError("a byte budget needs byte_cost")
            cols.append([byte_cost(r) for r in ranks] + [byte_cost(None)])
        else:
            cols.append([plan.macs(r, mode) for r in ranks] + [plan.macs(None)])
    costs = np.array(cols, dtype=np.float64).T.reshape(len(ranks) + 1, len(budgets))
    return linalg.Options(ranks=tuple(ranks) + (None,), errors=errs, costs=costs)


def truncation_errors(plan: LayerPlan) -> Callable[[list[int]], np.ndarray]:
    """Normalized squared truncation error ``1 - E(r)`` of a plan's spectrum (plain or whitened)."""
    spec = plan.view(plan.budget_mode).spectrum
    return lambda ranks: np.array([1.0 - linalg.energy_kept(spec.s, r, spec.total) for r in ranks])


def allocate_decisions(plans: list[LayerPlan], options: list[linalg.Options], limits: list[tuple[str, float, int]],
                       base: BudgetBase, stage: str = STAGE, units: list[linalg.Options] = (),
                       chosen_units: list[int] | None = None, chosen_plans: list[int] | None = None) -> dict[int, Decision]:
    """Run the allocator: each plan's rank, or "left dense".

    ``units``: further options allocated with the plans (the widths of feed-forward blocks);
    their chosen option indices are appended to ``chosen_units``.

    Raises:
        UsageError: a budget is below what every plan at its lowest rank costs (names the option).
    """
    options = list(options) + list(units)
    try:
        chosen = linalg.allocate(options, [b for _, _, b in limits])
        if chosen_units is not None:
            chosen_units.extend(chosen[len(plans):])
        if chosen_plans is not None:
            chosen_plans.extend(chosen[:len(plans)])
    except linalg.BudgetError:
        lowest = np.sum([o.costs[0] for o in options], axis=0) if options else np.zeros(len(limits))
        for (name, frac, budget), need in zip(limits, lowest):
            if need > budget:
                total, fixed = base.total(name)
                reach = (need + fixed) / total if total else 1.0
                raise UsageError(f"{option(name)} {frac:g} cannot be met: with every layer at its smallest form {reach:.4f} remains; "
                                 f"pass {option_value(name, np.ceil(reach * 1e4) / 1e4)} or more, or widen the layer "
                                 "selection.") from None
        raise
    out = {}
    for plan, opt, k in zip(plans, options, chosen):
        r, mode = opt.ranks[k], plan.budget_mode
        if r is None:
            v = plan.view(mode)
            out[plan.key] = Decision(plan.key, mode, plan.choice(min(v.m, v.n), mode), Skip(
                SkipCode.LEFT_DENSE_BY_BUDGET, "left dense by the budget: other layers lose less per "
                f"{'byte' if any(name == 'target_bytes' for name, _, _ in limits) else 'parameter'} saved", stage))
        else:
            out[plan.key] = Decision(plan.key, mode, plan.choice(r, mode))
    return out


def width_options(unit, budgets: list[str], byte_cost: Callable[[Any, int], int] | None = None) -> linalg.Options:
    """A feed-forward block's options under a budget: its widths, then whole; its costs are
    its two projections' parameters (and MACs per row, the same number), and for
    ``target_bytes`` their bytes as written (``byte_cost(block, params)``)."""
    def cost(params: int) -> list[int]:
        return [byte_cost(unit.block, params) if b == "target_bytes" else params for b in budgets]

    if "target_bytes" in budgets and byte_cost is None:
        raise ValueError("a byte budget needs byte_cost")
    costs = np.array([cost(unit.params(k)) for k in unit.ks] + [cost(unit.dense_params)], dtype=np.float64)
    return linalg.Options(ranks=tuple(unit.ks) + (None,), errors=np.append(unit.errors, 0.0), costs=costs)


def block_byte_cost(cfg: CompressConfig, found) -> Callable[[Any, int], int]:
    """``byte_cost(block, params)`` for :func:`width_options`: a feed-forward block's projections
    in float (or int8 after ``--quantize int8*``), at its weights' element size."""
    def cost(block, params: int) -> int:
        size = itemsize(found.group(block.up.key))
        d = int(np.prod(block.shapes[1])) // block.hidden if block.shapes[1] else 0  # the block's outer width (W2's)
        if not d:
            return stored_bytes(cfg, params, size, None)
        # W1 (d x k: k output columns, 2k when fused; a gated block's gate too) and W2 (k x d, d), each with its own scales
        k = round(params * block.hidden / block.dense_params)
        firsts = [len(block.columns(range(k))) for _ in block.firsts]
        return (sum(stored_bytes(cfg, d * c, size, None, channels=c) for c in firsts)
                + stored_bytes(cfg, params - d * sum(firsts), size, None, channels=d))

    return cost


@dataclass(frozen=True)
class Int4Unit:
    """A feed-forward block's 4-bit forms under a byte budget (``--quantize int4``): both
    projections in 4-bit blocks, each with a correction branch of one rank, at each width the
    block may keep (``None``: whole).

    Attributes:
        ranks: Branch ranks priced.
        forms: Per width: the bytes of the two projections at each rank, and their whitened
            errors at each rank, summed (:func:`linalg.quant.column_correction_errors`).
    """

    ranks: tuple[int, ...]
    forms: dict[int | None, tuple[tuple[int, ...], tuple[float, ...]]]


def unit_int4_options(unit, cand: Int4Unit) -> tuple[linalg.Options, list[tuple[int | None, int]]]:
    """A block's options under a byte budget with ``--quantize int4``: every width (and whole)
    with every branch rank, priced in bytes; the error of a narrowed one is its refit error plus
    its projections' 4-bit errors.  Sorted by bytes, options that cost more for no less error
    dropped (as :func:`with_int4`); each option's ``(width, rank)``."""
    width_error = dict(zip(unit.ks, (float(e) for e in unit.errors)))
    points = []
    for k, (costs, errors) in cand.forms.items():
        base = width_error.get(k, 0.0) if k is not None else 0.0
        points += [(float(c), base + float(e), (k, r)) for r, c, e in zip(cand.ranks, costs, errors)]
    kept = _cheapest_first(points)
    options = linalg.Options(ranks=tuple(lab[0] for _, _, lab in kept), errors=np.array([e for _, e, _ in kept]),
                             costs=np.array([[c] for c, _, _ in kept]))
    return options, [lab for _, _, lab in kept]


def block_options(unit, budgets: list[str], byte_cost: Callable[[Any, int], int] | None,
                  cand: Int4Unit | None) -> tuple[linalg.Options, list[tuple[int | None, int]] | None]:
    """A feed-forward block's options under the budgets and what each one is: its widths in
    float (:func:`width_options`; ``None``), or with ``cand`` its widths and branch ranks in 4-bit
    blocks (:func:`unit_int4_options`; ``(width, rank)`` per option)."""
    if cand is None:
        return width_options(unit, budgets, byte_cost), None
    return unit_int4_options(unit, cand)


def block_int4_choices(units: Iterable[Any], labels: Iterable[list | None], picked: Iterable[int]) -> dict[int, int]:
    """The branch rank of both projections of each block whose picked option is in 4-bit blocks,
    by group key (labels as :func:`block_options` gives them)."""
    out = {}
    for u, lab, i in zip(units, labels, picked):
        if lab is not None:
            for key in u.block.keys:
                out[key] = lab[i][1]
    return out


def _cheapest_first(points: list[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
    """``(bytes, error, label)`` points sorted by bytes, without those that cost the same bytes
    for more error or more bytes for no less error (the allocator wants costs rising and errors
    falling)."""
    kept: list[tuple[float, float, Any]] = []
    for p in sorted(points, key=lambda t: (t[0], t[1])):
        if kept and (p[0] == kept[-1][0] or p[1] >= kept[-1][1]):
            continue
        kept.append(p)
    return kept


def decide_budget(plans: dict[int, LayerPlan], cfg: CompressConfig, base: BudgetBase, units: dict | None = None,
                  sizes: dict[int, int] | None = None, int4: dict[int, "Int4Candidate"] | None = None,
                  chosen_int4_out: dict[int, int] | None = None, byte_cost: Callable[[Any, int], int] | None = None,
                  int4_units: dict[int, Int4Unit] | None = None,
                  float_pairs: frozenset[int] = frozenset()) -> tuple[dict[int, Decision], dict[int, int | None]]:
    """Allocate ``target_params``/``target_macs``/``target_bytes`` across the plans of
    :func:`allocated_plans` (module docstring) and the feed-forward blocks whose width the budget sizes (``units``, by
    key: their chosen width, ``None`` for whole).

    ``sizes``: bytes per element of each plan's weight (for ``target_bytes``).  ``int4``: the
    plans that may take 4-bit blocks with a correction instead (``--quantize int4``); the ranks
    chosen for those that do go into ``chosen_int4_out``.  ``byte_cost``: a block's bytes (for
    ``target_bytes``); ``int4_units``: the blocks whose projections take 4-bit blocks, with
    their forms (their chosen branch rank goes into ``chosen_int4_out`` under both projections'
    keys); ``float_pairs``: the plans whose factors the ``int4`` quantize stage leaves float."""
    active = allocated_plans(plans, cfg)
    allocated = {p.key for p in active}
    decisions = {k: decide_conv(p, cfg) for k, p in plans.items() if p.is_conv and p.active and k not in allocated}
    base = base.with_decided_convs(plans, decisions)
    limits = base.limits(cfg)
    names = [name for name, _, _ in limits]
    sizes = sizes or {}
    int4 = int4 or {}
    options, labels = [], []
    for p in active:
        cand = int4.get(p.key)
        errors_at = cand.pair_errors if cand is not None and cand.values is not None else truncation_errors(p)
        opt, lab = plan_options(p, cfg, names, sizes.get(p.key, 4), errors_at, cand, float_pair=p.key in float_pairs)
        options.append(opt)
        labels.append(lab)
    units = units or {}
    int4_units = int4_units or {}
    per_block = [block_options(u, names, byte_cost, int4_units.get(key)) for key, u in units.items()]
    unit_options, unit_labels = [o for o, _ in per_block], [lab for _, lab in per_block]
    chosen: list[int] = []
    picked: list[int] = []
    decisions.update(allocate_decisions(active, options, limits, base, units=unit_options, chosen_units=chosen,
                                        chosen_plans=picked))
    chosen_int4 = int4_choices(decisions, active, labels, picked)
    chosen_int4.update(block_int4_choices(units.values(), unit_labels, chosen))
    if (int4 or int4_units) and chosen_int4_out is not None:
        chosen_int4_out.update(chosen_int4)
    return decisions, {key: opt.ranks[i] for key, opt, i in zip(units, unit_options, chosen)}


def plan_options(p: LayerPlan, cfg: CompressConfig, names: list[str], size: int, errors_at: Callable[[list[int]], np.ndarray],
                 cand: "Int4Candidate | None" = None, min_rank: int = 1,
                 float_pair: bool = False) -> tuple[linalg.Options, list[tuple[str, int | None]]]:
    """A plan's options under the budgets ``names`` (bytes priced at ``size`` bytes per weight as
    written; ``float_pair``: its factors stay float under ``int4``), with the 4-bit forms of
    ``cand`` among them; and what each option is: ``("rank", r)``, ``("dense", None)`` or
    ``("int4", branch rank)``."""
    cost = (lambda r: stored_bytes(cfg, p.params_at(r) if r is not None else p.dense_params, size, r, float_pair,
                                   channels=1 if p.is_conv else max(p.m, p.n))  # (ConvInteger: one scale per tensor)
            ) if "target_bytes" in names else None
    opt = budget_options(p, errors_at, names, cfg.rank_multiple, min_rank=min_rank, byte_cost=cost)
    if cand is not None:
        return with_int4(opt, cand)
    return opt, [("rank", r) if r is not None else ("dense", None) for r in opt.ranks]


def int4_choices(decisions: dict[int, Decision], active: list[LayerPlan], labels: list[list[tuple[str, int | None]]],
                 picked: list[int], stage: str = STAGE) -> dict[int, int]:
    """The plans whose picked option is 4-bit blocks, with the rank of their branch; their
    decisions say so (in place)."""
    chosen = {}
    for p, lab, i in zip(active, labels, picked):
        form, c = lab[i]
        if form == "int4":
            chosen[p.key] = c
            decisions[p.key] = dataclasses.replace(decisions[p.key], skip=Skip(
                SkipCode.LEFT_DENSE_BY_BUDGET, f"int4 blocks with a rank-{c} correction, chosen by the budget: "
                "a factor pair loses more per byte saved", stage))
    return chosen


@dataclass(frozen=True)
class Int4Candidate:
    """What 4-bit blocks with a correction branch cost a weight, by branch rank: bytes, and the
    error on the same scale as the plan's truncation error (:func:`linalg.quant.correction_errors`)."""

    ranks: tuple[int, ...]
    costs: tuple[int, ...]
    errors: tuple[float, ...]
    #: Singular values of the (input-)whitened weight: a factor pair's errors on the same scale.
    values: np.ndarray | None = None

    def pair_errors(self, ranks: list[int]) -> np.ndarray:
        return np.array([1.0 - linalg.energy_kept(self.values, r) for r in ranks])


def with_int4(opt: linalg.Options, cand: Int4Candidate) -> tuple[linalg.Options, list]:
    """A plan's byte-budget options (one cost column) with the int4 forms in place of the float
    one (under ``--quantize int4`` a dense weight is written in 4 bits): every option sorted by
    bytes, ties and options that cost more for no less error dropped (the allocator wants costs
    rising)."""
    points = [(float(opt.costs[i, 0]), float(opt.errors[i]), ("rank", r)) for i, r in enumerate(opt.ranks) if r is not None]
    points += [(float(c), float(e), ("int4", r)) for r, c, e in zip(cand.ranks, cand.costs, cand.errors)]
    kept = _cheapest_first(points)
    options = linalg.Options(ranks=tuple(lab[1] if lab[0] == "rank" else None for _, _, lab in kept),
                             errors=np.array([e for _, e, _ in kept]), costs=np.array([[c] for c, _, _ in kept]))
    return options, [lab for _, _, lab in kept]


class Decide(Step):
    """The per-layer rule, or a global budget (not with ``adaptive``, which decides itself)."""

    name = STAGE

    def applies(self, ctx: Context) -> bool:
        return not ctx.config.adaptive

    def run(self, ctx: Context) -> Decided:
        from .discover import Discovery
        from .load import Loaded
        from .spectra import Spectra

        from .width import Narrowed

        cfg = ctx.config
        plans = ctx.need(Spectra).plans
        narrowed = ctx.get(Narrowed)
        decisions = {k: Decision(k, p.view().mode, skip=p.skip) for k, p in plans.items() if not p.active}
        if cfg.has_budget:
            allocated = allocated_plans(plans, cfg)
            matrices = [p for p in allocated if not p.is_conv]
            found = ctx.need(Discovery)
            base = BudgetBase.of(found.groups, allocated, cfg, ctx.need(Loaded).params)
            byte_cost = block_byte_cost(cfg, found) if cfg.target_bytes is not None else None
            if narrowed is not None:
                base = base.with_widths(narrowed, byte_cost)
            sizes = {p.key: itemsize(found.group(p.key)) for p in matrices}
            int4 = int4_units = None
            pairs_float: frozenset[int] = frozenset()
            if cfg.quantize == "int4" and cfg.target_bytes is not None:
                from .int4 import budget_candidates, float_pairs, unit_candidates

                int4 = budget_candidates(ctx, matrices)
                pairs_float = float_pairs(ctx.model, [found.group(p.key) for p in matrices], cfg)
                if narrowed is not None and narrowed.units:
                    int4_units = unit_candidates(ctx, narrowed.units)
            int4_ranks: dict[int, int] = {}
            budgeted, widths = decide_budget(plans, cfg, base, narrowed.units if narrowed is not None else None, sizes=sizes,
                                             int4=int4, chosen_int4_out=int4_ranks, byte_cost=byte_cost,
                                             int4_units=int4_units, float_pairs=pairs_float)
            decisions.update(budgeted)
            chosen_widths = None
            if narrowed is not None and narrowed.units:
                per = "byte" if cfg.target_bytes is not None else "parameter"
                chosen = {key: narrowed.units[key].plan(k) for key, k in widths.items() if k is not None}
                whole = [(narrowed.units[key].block.name, f"left whole by the budget: other layers lose less per {per} "
                          "saved") for key, k in widths.items() if k is None]
                chosen_widths = dataclasses.replace(narrowed, plans=chosen, units={}, skipped=narrowed.skipped + whole)
            return Decided(decisions, widths=chosen_widths, int4_ranks=int4_ranks if int4 is not None else None)
        else:
            decisions.update({k: per_layer(p, cfg) for k, p in plans.items() if p.active})
        return Decided(decisions)
