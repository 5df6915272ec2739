"""Spectra: read each factorizable weight, one at a time, and take its SVD (the slow step).

A MatMul/Gemm weight gets the plain SVD, or with input statistics the whitened one
(:mod:`onnx_lowrank.linalg.whiten`; data-aware mode).  A Conv kernel gets the SVD of each view
``conv_mode`` allows (``auto``: channel and, for a 2-D kernel, spatial), so the decider can
compare their MACs.

Each spectrum keeps only the singular vectors a decider can use (:func:`.decide.rank_ceiling`:
the rule's rank, or break-even under a budget), and the weight is dropped before the next is
read: memory follows the factors, not the model.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import numpy as np

from onnx_lowrank import linalg, shapes
from onnx_lowrank.config import CompressConfig
from onnx_lowrank.errors import ModelError, option
from onnx_lowrank.pipeline import Context, StageResult, Step

from .discover import Discovery
from .statistics import Statistics
from onnx_lowrank.plan import MATRIX, ConvUse, LayerPlan, Skip, SkipCode, View

__all__ = ["Spectra", "TakeSpectra", "plan_weight", "conv_use"]

log = logging.getLogger(__name__)

STAGE = "spectra"


@dataclass
class Spectra(StageResult):
    """One plan per weight group that discovery left in, by key; and the model's known shapes
    (for Conv MACs), when there is a Conv."""

    plans: dict[int, LayerPlan] = field(default_factory=dict)
    shapes: shapes.ShapeInfo | None = None


def conv_use(layer, known: shapes.ShapeInfo | None) -> ConvUse:
    """A Conv node's input and output sizes, when the model's shapes give them."""
    spec = layer.conv
    shape = known.get(layer.node.input[0]) if known is not None else None
    if shape is None or len(shape) != spec.ndim + 2 or any(d is None for d in shape[2:]):
        return ConvUse(layer)
    in_size = tuple(int(d) for d in shape[2:])
    out = linalg.conv_output_size(in_size, spec.kernel, spec.strides, spec.pads, spec.dilations, spec.auto_pad)
    if min(out) < 1:  # the model is inconsistent here; count per pixel rather than guess
        return ConvUse(layer)
    return ConvUse(layer, in_size=in_size, out_size=out)


def _matrix_view(arr: np.ndarray, gram: tuple[np.ndarray, str] | None, out_gram: np.ndarray | None, damping: float,
                 name: str, energy: float | None, method: str) -> tuple[View, str | None]:
    m, n = arr.shape
    note = None
    if gram is None:
        return View(MATRIX, m, n, linalg.spectrum(arr, energy=energy, method=method)), None
    g, side = gram
    spec = None
    if out_gram is not None:
        try:
            spec = linalg.whitened_spectrum(arr, g, side, damping, out_gram=out_gram, energy=energy, method=method)
            note = "attention-aware"
        except ValueError as exc:  # e.g. keys that never vary: weigh by the input only
            log.info("attention-aware weighting of %s skipped: %s", name, exc)
    if spec is None:
        spec = linalg.whitened_spectrum(arr, g, side, damping, energy=energy, method=method)
    return View(MATRIX, m, n, spec), note


def _energy(cfg: CompressConfig, is_conv: bool) -> float | None:
    """The threshold that will choose the rank, when only it does (so the leading part of the
    spectrum may serve): the per-layer energy rule, not a fixed rank, entropy or a budget."""
    from .decide import rule_energy  # the deciders own their rules (a later stage: imported here)

    if cfg.rank is not None or cfg.rank_rule != "energy" or (not is_conv and (cfg.has_budget or cfg.adaptive)):
        return None
    return rule_energy(cfg, is_conv)


def plan_weight(key: int, group, arr: np.ndarray, cfg: CompressConfig, *, gram=None, out_gram=None, note: str | None = None,
                known: shapes.ShapeInfo | None = None) -> LayerPlan:
    """The plan of one weight: its view(s) and spectra, truncated to what a decider can use."""
    if group.layers[0].is_conv:
        plan = _conv_plan(key, group, arr, cfg, known)
    else:
        plan = LayerPlan(key, group, arr.dtype, tuple(arr.shape), note=note)
        try:
            view, extra = _matrix_view(arr, gram, out_gram, cfg.damping, group.weight.name, _energy(cfg, False), cfg.svd)
            plan = dataclasses.replace(plan, views={MATRIX: view}, note=extra or note)
        except ValueError as exc:
            m, n = arr.shape
            plan = dataclasses.replace(plan, views={MATRIX: View(MATRIX, m, n)},
                                       skip=Skip(SkipCode.NOT_FACTORIZABLE, f"cannot factorize: {exc}", STAGE))
    if not plan.active:
        return plan
    from .decide import rank_ceiling  # (a later stage, as in _energy)

    kept = {mode: dataclasses.replace(v, spectrum=v.spectrum.truncated(rank_ceiling(cfg, plan, mode)))
            for mode, v in plan.views.items() if v.spectrum is not None}
    return dataclasses.replace(plan, views={**plan.views, **kept})


def _conv_plan(key: int, group, arr: np.ndarray, cfg: CompressConfig, known: shapes.ShapeInfo | None) -> LayerPlan:
    nd = arr.ndim - 2
    modes = ["channel", "spatial"] if cfg.conv_mode == "auto" else [cfg.conv_mode]
    if nd != 2 and "spatial" in modes:
        modes.remove("spatial")  # auto: spatial-wise needs kh x kw
    plan = LayerPlan(key, group, arr.dtype, tuple(arr.shape), conv_uses=tuple(conv_use(layer, known) for layer in group.layers))
    if not modes:
        skip = Skip(SkipCode.NO_SPATIAL_VIEW, f"spatial-wise decomposition needs a 2-D kernel (kh x kw); this Conv's kernel is {nd}-D "
                    f"{list(arr.shape[2:])}; use {option('conv_mode')} channel or auto", STAGE)
        return dataclasses.replace(plan, views={"channel": View("channel", *linalg.conv_matrix_shape(arr.shape, "channel"))},
                                   skip=skip)
    views, skip = {}, None
    for mode in modes:
        m, n = linalg.conv_matrix_shape(arr.shape, mode)
        try:
            views[mode] = View(mode, m, n, linalg.spectrum(linalg.conv_matrix(arr, mode), energy=_energy(cfg, True), method=cfg.svd))
        except ValueError as exc:
            views[mode] = View(mode, m, n)
            skip = Skip(SkipCode.NOT_FACTORIZABLE, f"cannot factorize: {exc}", STAGE)
    return dataclasses.replace(plan, views=views, skip=skip)


class TakeSpectra(Step):
    """Read each weight discovery left in and take its spectrum, one weight at a time."""

    name = STAGE

    def run(self, ctx: Context) -> Spectra:
        found = ctx.need(Discovery)
        stats = ctx.get(Statistics)
        cap = stats.capture if stats is not None else None
        # Conv MACs scale with the output size, which only the model's shapes tell.
        known = shapes.value_shapes(ctx.model) if any(l.is_conv for l in found.layers) else None
        todo = found.candidates
        plans = {}
        for k, group in enumerate(todo, 1):
            try:
                arr = ctx.data.read(group.weight.tensor)
            except OSError as exc:
                raise ModelError(f"cannot read weight '{group.weight.name}': {exc}") from None
            gram = cap.grams.get(group.key) if cap is not None else None
            out_gram = cap.out_grams.get(group.key) if cap is not None else None
            note = cap.skipped.get(group.key) if cap is not None else None
            plans[group.key] = plan_weight(group.key, group, arr, ctx.config, gram=gram, out_gram=out_gram, note=note, known=known)
            del arr
            ctx.progress(k, len(todo), group.weight.name)
        return Spectra(plans, known)
