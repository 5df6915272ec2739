"""The plan: one entry per weight the pass may factorize, between discovery and the rewrite.

Stages, in order (``api.compress`` runs them):

1. :func:`build_plans` reads each factorizable weight and takes its spectrum;
2. :func:`decide` applies the rank rule and the break-even guard, setting ``rank`` or ``reason``
   (global budgets, data-aware spectra or latency filters act on the same list here);
3. :func:`apply` rewrites the graph for every plan with a rank;
4. :func:`decisions` turns plans and discovery into the per-node report rows.

A plan sees a matrix ``M`` (m, n) and the users that run it; what ``M`` is for an op type (the
weight itself for MatMul/Gemm) is decided in :func:`build_plans`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from . import decompose, io
from .config import CompressConfig
from .discovery import Discovery, WeightGroup
from .errors import ModelError
from .policies import RankChoice, choose_rank
from .report import LayerDecision
from .rewrite import NameScope, factorize_group

__all__ = ["LayerPlan", "build_plans", "decide", "apply", "decisions"]

log = logging.getLogger(__name__)


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
        extra: Per-plan numbers that later stages add to the report (e.g. sensitivity).
    """

    group: WeightGroup
    m: int
    n: int
    dtype: np.dtype
    spectrum: decompose.Spectrum | None = None
    choice: RankChoice | None = None
    factor_names: tuple[str, str] | None = None
    extra: dict = field(default_factory=dict)

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
    def users(self) -> int:
        return len(self.group.layers)

    @property
    def dense_params(self) -> int:
        return self.m * self.n

    def params_at(self, rank: int) -> int:
        return decompose.lowrank_params(self.m, self.n, rank)

    def macs_per_row(self, rank: int | None) -> int:
        """MACs per activation row, summed over users; ``None`` means dense."""
        per_user = self.dense_params if rank is None else self.params_at(rank)
        return per_user * self.users


Progress = Callable[[int, int, str], None]


def build_plans(found: Discovery, source_dir: Path | None, progress: Progress | None = None) -> list[LayerPlan]:
    """Read each factorizable weight and take its spectrum (the slow step: one SVD per weight)."""
    plans = []
    todo = [g for g in found.groups if g.reason is None]
    for k, group in enumerate(todo, 1):
        w = group.weight
        try:
            arr = io.read_tensor(w.tensor, source_dir)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read weight '{w.name}': {exc}") from None
        m, n = arr.shape
        plan = LayerPlan(group=group, m=m, n=n, dtype=arr.dtype)
        try:
            plan.spectrum = decompose.spectrum(arr)
        except ValueError as exc:
            plan.reason = f"cannot factorize: {exc}"
        plans.append(plan)
        if progress is not None:
            progress(k, len(todo), w.name)
    return plans


def decide(plans: list[LayerPlan], cfg: CompressConfig) -> None:
    """Choose each plan's rank by the configured rule; plans that would save nothing get a reason."""
    for plan in plans:
        if plan.spectrum is None:
            continue
        plan.choice = choose_rank(plan.spectrum.s, plan.m, plan.n, energy=cfg.effective_energy, rank=cfg.rank,
                                  rank_multiple=cfg.rank_multiple)
        if not plan.choice.saves:
            r, m, n = plan.choice.rank, plan.m, plan.n
            plan.reason = f"rank {r} saves nothing: {r}*({m}+{n}) >= {m}*{n} (break-even {plan.choice.break_even})"


def apply(model: onnx.ModelProto, plans: list[LayerPlan]) -> None:
    """Rewrite every plan that has a rank and no reason."""
    names = NameScope(model)
    for plan in plans:
        if plan.reason is None and plan.choice is not None:
            a, b = decompose.factors(plan.spectrum, plan.choice.rank, dtype=plan.dtype)
            plan.factor_names = factorize_group(model, plan.group, a, b, names)


def decisions(found: Discovery, plans: list[LayerPlan]) -> list[LayerDecision]:
    """One report row per discovered node, in graph order."""
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
                macs_before=dense,
                macs_after=low,
                factorized=factorized,
                reason=None if factorized else (layer.reason or group.reason),
                factors=plan.factor_names if plan is not None else None,
                shared_with=group.layers[0].display_name if k > 0 else None,
            )
    out = []
    for layer in found.layers:
        row = rows.get(id(layer))
        if row is None:
            has_shape = layer.weight is not None and layer.weight.tensor is not None
            row = LayerDecision(node=layer.display_name, op_type=layer.op_type, weight=layer.weight_name,
                                shape=layer.weight.shape if has_shape else None, reason=layer.reason)
        out.append(row)
    return out
