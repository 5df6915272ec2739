"""Report: one row per candidate node and the totals, made once from the stages' results.

Rows come from discovery (every MatMul/Gemm/Conv node, in graph order), the plans (shapes and
spectra), the last decisions (rank or skip) and the rewrite (factor names).  Parameters count
once per weight (a shared weight's second user shows 0); MACs count per node, in the unit its
row names (:mod:`onnx_lowrank.report`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx

from onnx_lowrank import io
from onnx_lowrank.pipeline import Context, StageResult, Step
from onnx_lowrank.plan import Decision, LayerPlan
from onnx_lowrank.report import LayerDecision, Totals
from onnx_lowrank.shapes import ShapeInfo

from .decide import Decided
from .discover import Discovery, Layer
from .fold import Folded
from .load import TENSOR_KINDS, Loaded, tensor_bytes
from .rewrite import Rewritten, needs_zero_bias, opset_version
from .spectra import Spectra, conv_use
from .width import WidthPlan, current_widths

__all__ = ["rows", "totals", "stamp", "Report", "Reported", "METADATA_KEY"]

log = logging.getLogger(__name__)

def _conv_macs(layer: Layer, plan: LayerPlan | None, decision: Decision | None, known: ShapeInfo | None
               ) -> tuple[int, int, str | None]:
    """``(macs_before, macs_after, unit)`` of one Conv row; zeros when its geometry is unknown."""
    use = None
    if plan is not None:
        use = next((u for u in plan.conv_uses if u.layer.index == layer.index), None)
    elif layer.conv is not None and layer.weight is not None:
        use = conv_use(layer, known)
    if use is None:
        return 0, 0, None
    shape = layer.weight.shape
    before = use.macs(shape, None, "channel")
    after = use.macs(shape, decision.rank, decision.mode) if decision is not None and decision.factorize else before
    return before, after, "sample" if use.known else "output pixel"


def rows(found: Discovery, plans: Mapping[int, LayerPlan], decisions: Mapping[int, Decision],
         factors: Mapping[int, tuple[str, str]], known: ShapeInfo | None = None, opset: int = 17,
         widths: Mapping[int, "WidthPlan"] | None = None) -> list[LayerDecision]:
    """One report row per discovered node, in graph order.

    Args:
        found: Discovery's result.
        plans: The plans, by weight-group key.
        decisions: The final decisions, by key.
        factors: The factor names the rewrite gave, by key.
        known: Known value shapes, to count the MACs of Conv nodes.
        opset: The model's opset (before 11 a factorized Gemm adds a one-element zero ``C``).
        widths: Per weight-group key of a width-reduced block's projection: its plan.
    """
    by_layer: dict[int, LayerDecision] = {}
    for group in found.groups:
        plan, d = plans.get(group.key), decisions.get(group.key)
        w = group.weight
        shape = w.shape if w.tensor is not None else None
        narrowed = (widths or {}).get(group.key)
        if narrowed is not None:  # the rewrite narrowed the tensor in place: its shape as found
            shape = narrowed.block.found_shape(group.key)
        choice = d.choice if d is not None else None
        factorized = d is not None and d.factorize
        dense = int(np.prod(shape)) if shape else 0
        low = plan.params_at(d.rank, d.mode) + needs_zero_bias(opset, group) if factorized else dense
        skip = group.skip or (plan.skip if plan is not None else None) or (d.skip if d is not None else None)
        if narrowed is not None:
            low = dense // narrowed.block.hidden * narrowed.kept
        for k, layer in enumerate(group.layers):
            if layer.is_conv:
                macs_before, macs_after, unit = _conv_macs(layer, plan, d, known)
            else:
                macs_before, macs_after, unit = dense, low, "row"
            why = None if factorized or narrowed is not None else (layer.skip or skip)
            by_layer[layer.index] = LayerDecision(
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
                reason=why.message if why is not None else None,
                skip_code=why.code.value if why is not None else None,
                skip_stage=why.stage if why is not None else None,
                factors=factors.get(group.key) if factorized else None,
                shared_with=group.layers[0].display_name if k > 0 else None,
                whitened=plan is not None and d is not None and plan.view(d.mode).whitened,
                sensitivity=d.sensitivity if d is not None else None,
                note=plan.note if plan is not None else None,
                conv_mode=d.mode if plan is not None and plan.is_conv and choice is not None else None,
                macs_per=unit,
                width=(narrowed.kept, narrowed.block.hidden) if narrowed is not None else None,
            )
    out = []
    counted = {g.weight.no for g in found.groups}
    for layer in found.layers:
        row = by_layer.get(layer.index)
        if row is None:
            has_shape = layer.weight is not None and layer.weight.tensor is not None
            shape = layer.weight.shape if has_shape else None
            # Weights left alone before grouping (e.g. factor pairs) still count, once each.
            params = 0
            if shape and layer.weight.no not in counted:
                counted.add(layer.weight.no)
                params = int(np.prod(shape))
            matrix = not (layer.is_conv or layer.op_type == "ConvTranspose")
            # a matrix left alone still runs: its MACs per activation row count, the same before and after
            macs = int(np.prod(shape)) if matrix and shape and len(shape) == 2 else 0
            skip = layer.skip
            row = LayerDecision(node=layer.display_name, op_type=layer.op_type, weight=layer.weight_name, shape=shape,
                                reason=skip.message if skip else None, skip_code=skip.code.value if skip else None,
                                skip_stage=skip.stage if skip else None, params_before=params, params_after=params,
                                macs_before=macs, macs_after=macs, macs_per="row" if matrix else None)
        out.append(row)
    return out


def _macs_units(decisions: list[LayerDecision], known: ShapeInfo | None) -> tuple[str, str | None]:
    units = {d.macs_per for d in decisions if d.macs_per is not None and d.macs_before}
    if units <= {"row"}:
        return "row", None
    parts = []
    if "sample" in units:
        parts.append("Conv per sample at batch 1")
    if "row" in units:
        parts.append("MatMul/Gemm per activation row")
    pixel = sum(d.macs_per == "output pixel" for d in decisions)
    if pixel:
        why = known.note if known is not None and known.note else (
            "shape inference did not reach their inputs: dynamic input dims, or an operator it cannot follow, such as a Pad "
            "with computed pads")
        parts.append(f"{pixel} Conv node(s) per output pixel, their size being unknown ({why}); to count them per sample "
                     "fix the input size (python -m onnxruntime.tools.make_dynamic_shape_fixed) or fold the graph (onnxsim)")
    return "mixed", "; ".join(parts)


def totals(layers: list[LayerDecision], model_params: int, size_before: int | None, known: ShapeInfo | None,
           other_saved: int = 0) -> Totals:
    """Parameters, MACs and sizes before and after, summed over the rows; ``other_saved``:
    parameters removed outside the rows' weights (the first biases of narrowed blocks)."""
    t = Totals(layers=len(layers), factorized=sum(d.factorized for d in layers), size_before=size_before,
               narrowed=sum(d.width is not None for d in layers))
    for d in layers:
        t.params_before += d.params_before
        t.params_after += d.params_after
        t.macs_before += d.macs_before
        t.macs_after += d.macs_after
    t.macs_per, t.macs_note = _macs_units(layers, known)
    t.model_params_before = model_params
    t.model_params_after = model_params - t.params_before + t.params_after - other_saved
    return t


def _mark_quantized(ctx: Context, layers: list[LayerDecision]) -> None:
    """Say on each row how ``--quantize int4`` stored its weight (or its factors)."""
    from .int4 import Int4Quantized

    q = ctx.get(Int4Quantized)
    if q is None:
        _mark_planned(ctx, layers)
        return
    held = {l.weight: l for l in q.summary.layers}
    int8 = {p.factor for p in q.summary.factors if p.storage == "int8"}
    for i, row in enumerate(layers):
        layer = held.get(row.weight or "")
        if layer is not None:
            how = f"int4 (block {layer.block})"
            if layer.rank:
                how += f" + rank-{layer.rank} correction" + (" (stacked)" if layer.stacked else "")
        elif row.factorized and row.factors and set(row.factors) <= int8:
            how = "factors int8"
        else:
            continue
        layers[i] = dataclasses.replace(row, quantized=how)


def _mark_planned(ctx: Context, layers: list[LayerDecision]) -> None:
    """Under ``dry_run``, the rows a byte budget put in 4-bit blocks say so as a real run's would."""
    from .decide import latest_decided

    budget = latest_decided(ctx, "int4_ranks")
    if not budget:
        return
    found = ctx.need(Discovery)
    planned = {found.group(key).weight.name: rank for key, rank in budget.items()}
    for i, row in enumerate(layers):
        if row.weight in planned and not row.factorized:
            rank = planned[row.weight]
            how = f"int4 (block {ctx.config.int4_block})" + (f" + rank-{rank} correction" if rank else "")
            layers[i] = dataclasses.replace(row, quantized=how)


METADATA_KEY = "onnx_lowrank"


@dataclass
class Reported(StageResult):
    """The report rows and totals, made once; and the model, stamped with what was done."""

    layers: list[LayerDecision]
    totals: Totals
    model: onnx.ModelProto | None
    data: io.DataFiles


def stamp(model: onnx.ModelProto, config: dict, t: Totals) -> None:
    """Record in the model's metadata (key ``onnx_lowrank``) what the pass did to it."""
    from onnx_lowrank import __version__

    value = json.dumps({"version": __version__, "config": config, "factorized": t.factorized, "narrowed": t.narrowed,
                        "weight_params_before": t.params_before, "weight_params_after": t.params_after}, sort_keys=True)
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            entry.value = value
            return
    model.metadata_props.add(key=METADATA_KEY, value=value)


class Report(Step):
    """Make the rows and totals from every stage's result; stamp a rewritten model's metadata."""

    name = "report"
    changes_model = True

    def run(self, ctx: Context) -> Reported:
        spectra = ctx.need(Spectra)
        decided = ctx.latest(Decided)
        rewritten = ctx.get(Rewritten)
        loaded = ctx.need(Loaded)
        widths = current_widths(ctx)
        layers = rows(ctx.need(Discovery), spectra.plans, decided.decisions if decided else {},
                      rewritten.factors if rewritten else {}, spectra.shapes, opset_version(loaded.model), widths)
        _mark_quantized(ctx, layers)
        for row in layers:
            if row.reason is not None and row.width is None:
                log.debug("skipped %s (%s): %s", row.node, row.weight or "no constant weight", row.reason)
        narrowed = {p.block.up.key: p for p in widths.values()}.values()  # (each block under every projection's key)
        biases = sum(len(p.block.columns(range(p.block.hidden))) - len(p.block.columns(p.fit.keep))
                     for p in narrowed for _, b, _ in p.block.firsts if b is not None)
        t = totals(layers, loaded.params, loaded.size, spectra.shapes, other_saved=biases)
        folded = ctx.get(Folded)
        # (after the fold stage a weight it freed counts as what reads it; a folded Cast changed bytes)
        before = folded.tensor_bytes if folded is not None and folded.tensor_bytes else loaded.tensor_bytes
        after = None if ctx.request.dry_run else tensor_bytes(ctx.model)  # a dry run writes nothing: as loaded
        t.tensor_bytes = {k: [before[k], after[k] if after else None] for k in TENSOR_KINDS
                          if before[k] or (after and after[k])}
        if not ctx.request.dry_run and (t.factorized or t.narrowed):
            stamp(ctx.model, ctx.config.to_dict(results_only=True), t)
        return Reported(layers, t, ctx.model, ctx.data)
