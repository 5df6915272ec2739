"""Width reduction: the feed-forward blocks (:mod:`.ffn`) keep a fraction of their hidden neurons.

Two stages:

* ``blocks`` (after discovery): find the blocks, so that the statistics stage captures what
  they need (the Gram ``C = H^T H`` and the column sums of each block's hidden activations,
  which are the second projection's input statistics);
* ``width`` (after the statistics): per block, keep ``round(ffn_keep * f)`` neurons (chosen
  with the refit by default, ``ffn_select``) and refit the second projection in closed form
  (:func:`onnx_lowrank.linalg.refit_width`).

The two weights of a reduced block are *claimed*: no spectrum is taken of them and they are not
factorized; the rewrite stage slices ``W1`` and ``b1``, writes the refitted ``W2`` and shifts
``b2`` by the fitted intercept, adding no node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnx_lowrank import io, linalg
from onnx_lowrank.errors import ModelError, option
from onnx_lowrank.pipeline import Context, StageResult, Step

from .discover import Discovery
from .ffn import Blocks, FfnBlock, find_blocks
from .statistics import Statistics

__all__ = ["FindBlocks", "Narrow", "Narrowed", "WidthPlan", "WidthUnit", "FoundBlocks", "current_widths", "emulated_arrays",
           "overridden_names"]

log = logging.getLogger(__name__)


@dataclass
class FoundBlocks(StageResult):
    """The feed-forward blocks of the model (:class:`~.ffn.Blocks`)."""

    found: Blocks

    @property
    def down_keys(self) -> set[int]:
        return {b.down.key for b in self.found.blocks}


class FindBlocks(Step):
    """Find the feed-forward blocks (only when width reduction is asked for)."""

    name = "blocks"

    def applies(self, ctx: Context) -> bool:
        return ctx.config.ffn_keep is not None

    def run(self, ctx: Context) -> FoundBlocks:
        found = find_blocks(ctx.model, ctx.need(Discovery), ctx.data)
        log.info("found %d feed-forward block(s)", len(found.blocks))
        return FoundBlocks(found)


@dataclass(frozen=True)
class WidthPlan:
    """One block's reduction: the neurons kept and the refitted second projection.

    Attributes:
        block: The block.
        fit: The kept neurons, the refitted rows of ``W2`` (one per kept neuron) and the shift
            of ``b2`` (:class:`onnx_lowrank.linalg.WidthFit`).
    """

    block: FfnBlock
    fit: linalg.WidthFit

    @property
    def kept(self) -> int:
        return len(self.fit.keep)

    @property
    def dense_params(self) -> int:
        """Weight parameters of the block's projections before the reduction."""
        return self.block.dense_params

    @property
    def params(self) -> int:
        """Weight parameters of the two projections at the kept width."""
        return self.dense_params // self.block.hidden * self.kept


@dataclass(frozen=True)
class WidthUnit:
    """A block whose width a budget chooses (``ffn_keep="auto"``): its options and what refits it.

    Attributes:
        block: The block.
        ks: Neurons it may keep, ascending (keeping all ``f`` is the dense option, not listed).
        errors: :attr:`~onnx_lowrank.linalg.WidthFit.error` at each of ``ks``.
        gram, w2, sums, count: The refit's inputs (:func:`onnx_lowrank.linalg.refit_width`).
        damping: The ridge.
        scores: The neurons' priority (:func:`onnx_lowrank.linalg.neuron_priority`), computed once.
    """

    block: FfnBlock
    ks: tuple[int, ...]
    errors: np.ndarray
    gram: np.ndarray
    w2: np.ndarray
    sums: np.ndarray | None
    count: int
    damping: float
    scores: np.ndarray

    @property
    def dense_params(self) -> int:
        return self.block.dense_params

    def params(self, k: int) -> int:
        """Weight parameters (and MACs per row) of the block's projections at width ``k``."""
        return self.dense_params // self.block.hidden * k

    def plan(self, k: int) -> WidthPlan:
        return WidthPlan(self.block, linalg.refit_width(self.gram, self.w2, k, sums=self.sums, count=self.count,
                                                        damping=self.damping, scores=self.scores))


#: How finely a budget may set a block's width: multiples of ``f / WIDTH_STEPS``.
WIDTH_STEPS = 16


@dataclass
class Narrowed(StageResult):
    """Every reduced block (by its first projection's group key), the blocks a budget will size
    (``units``, with ``ffn_keep="auto"``), and the blocks left whole."""

    section = "width"
    plans: dict[int, WidthPlan] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    keep: float | str = 1.0
    units: dict[int, WidthUnit] = field(default_factory=dict)
    selection: str = "refit"

    @property
    def claimed(self) -> dict[int, WidthPlan | WidthUnit]:
        """Per weight-group key of either projection: its block's plan (or unit)."""
        out: dict[int, WidthPlan | WidthUnit] = {}
        for p in (*self.units.values(), *self.plans.values()):
            for key in p.block.keys:
                out[key] = p
        return out

    def saved_params(self) -> int:
        """Weight parameters the reduced blocks no longer have."""
        return sum(p.dense_params - p.params for p in self.plans.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "ffn_keep": self.keep,
            "selection": self.selection,
            "blocks": [{"node": p.block.name, "second": p.block.down.layers[0].display_name, "hidden": p.block.hidden,
                        "kept": p.kept, "activation": list(p.block.activation), "refit_error": round(p.fit.error, 6),
                        "bias_shifted": p.fit.shift is not None,
                        # (a gated block's other first projection, narrowed with "node")
                        **({"paired": p.block.gate.layers[0].display_name} if p.block.gate is not None else {}),
                        # (the same block in other If branches, on the same weights: narrowed with it)
                        **({"twins": [t.name for t in p.block.twins]} if p.block.twins else {}),
                        "reshapes": [e.reshape.name or e.reshape.output[0] for e in p.block.reshapes] + list(p.block.follows)}
                       for p in self.plans.values()],
            "not_reduced": [{"node": n, "reason": r} for n, r in self.skipped],
        }


class Narrow(Step):
    """Choose each block's neurons and refit its second projection."""

    name = "width"

    def applies(self, ctx: Context) -> bool:
        return ctx.config.ffn_keep is not None

    def run(self, ctx: Context) -> Narrowed:
        cfg = ctx.config
        found = ctx.need(FoundBlocks).found
        cap = ctx.need(Statistics).capture
        auto = cfg.ffn_keep == "auto"
        out = Narrowed(skipped=list(found.skipped), keep=cfg.ffn_keep, selection=cfg.ffn_select)
        for block in found.blocks:
            key = block.down.key
            k = block.hidden if auto else max(1, int(round(cfg.ffn_keep * block.hidden)))
            if k >= block.hidden and not auto:
                out.skipped.append((block.name, f"keeps all {block.hidden} neurons at {cfg.ffn_keep:g}"))
                continue
            if key not in cap.grams:
                why = cap.skipped.get(key, "no statistics of its hidden activations")
                out.skipped.append((block.name, f"no statistics of its hidden activations: {why}"))
                continue
            gram, _ = cap.grams[key]
            try:
                w2 = ctx.data.read(block.down.weight.tensor)
            except (OSError, ModelError) as exc:
                raise ModelError(f"cannot read weight '{block.down.weight.name}': {exc}") from None
            sums = cap.row_sums.get(key) if block.down_bias is not None else None
            rows, count = block.w2_rows(w2), cap.rows.get(key, 0)
            if count < block.hidden:
                log.warning("%s: %d calibration row(s) for %d hidden neurons: the refit of the second projection is fitted "
                            "to fewer rows than it has unknowns and will not hold on other data; pass more %s data", block.name,
                            count, block.hidden, option("calib"))
            try:
                ks = tuple(sorted({max(1, round(block.hidden * j / WIDTH_STEPS))
                                   for j in range(1, WIDTH_STEPS)} - {block.hidden})) if auto else (k,)
                scores = linalg.neuron_priority(gram, rows, sums=sums, count=count, damping=cfg.damping,
                                                selection=cfg.ffn_select, until=ks[0])
                if auto:
                    errors = linalg.width_errors(gram, rows, list(ks), sums=sums, count=count, damping=cfg.damping,
                                                 scores=scores)
                    out.units[block.up.key] = WidthUnit(block, ks, errors, gram, np.asarray(rows, np.float64), sums,
                                                        count, cfg.damping, scores)
                    ctx.progress(len(out.units), len(found.blocks), f"width options of {block.name}")
                    continue
                fit = linalg.refit_width(gram, rows, k, sums=sums, count=count, damping=cfg.damping, scores=scores)
            except ValueError as exc:
                out.skipped.append((block.name, f"cannot refit: {exc}"))
                continue
            out.plans[block.up.key] = WidthPlan(block, fit)
            log.info("%s: keep %d of %d neurons, refit error %.4f", block.name, k, block.hidden, fit.error)
        if not out.plans and not out.units:
            why = (f"first: {out.skipped[0][0]}: {out.skipped[0][1]}" if out.skipped else
                   "the model has no MatMul/Gemm -> elementwise activation -> MatMul/Gemm block in its main graph")
            log.warning("%s: no feed-forward block narrowed (%s)", option("ffn_keep"), why)
        return out


def narrowed_arrays(plan: WidthPlan, data: io.DataFiles) -> dict[str, np.ndarray]:
    """The new values of the block's tensors, by name: ``W1`` and ``b1`` sliced (and a gated
    block's gate weight and bias), ``W2`` refitted, ``b2`` shifted (each in its own dtype and
    layout)."""
    b, keep = plan.block, plan.fit.keep
    out = {}
    cols = b.columns(keep)  # (a fused gate and up projection keeps both halves' columns of each neuron)
    for group, bias, transposed in b.firsts:
        w1 = data.read(group.weight.tensor)
        out[group.weight.name] = np.ascontiguousarray(w1[cols] if transposed else w1[:, cols])
        if bias is not None:
            shape = bias.shape[:-1] + (len(cols),) if bias.shape else (len(cols),)
            out[bias.name] = bias.value[cols].reshape(shape)
    w2 = data.read(b.down.weight.tensor)
    rows = plan.fit.w2.astype(w2.dtype)
    out[b.down.weight.name] = np.ascontiguousarray(rows.T if b.down_t else rows)
    if b.down_bias is not None and plan.fit.shift is not None:  # (the intercept is in W2's units: scaled as W2 is)
        v = b.down_bias.value.astype(np.float64) + b.down_alpha * plan.fit.shift
        out[b.down_bias.name] = v.astype(b.down_bias.value.dtype).reshape(b.down_bias.shape)
    return out


def emulated_arrays(plan: WidthPlan) -> dict[str, np.ndarray]:
    """The block's reduction in tensors of the shapes as found, for a run that overrides them
    (adaptive mode measures widths this way, on one session): ``W2`` with the refitted rows of
    the kept neurons and zero rows for the others (whose activations then add nothing, whatever
    the activation gives at zero), and ``b2`` shifted."""
    b = plan.block
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(b.down.weight.tensor.data_type))
    rows = np.zeros((b.hidden, plan.fit.w2.shape[1]), dtype=np.float64)
    rows[plan.fit.keep] = plan.fit.w2
    out = {b.down.weight.name: np.ascontiguousarray((rows.T if b.down_t else rows).astype(dtype))}
    if b.down_bias is not None and plan.fit.shift is not None:
        v = b.down_bias.value.astype(np.float64) + b.down_alpha * plan.fit.shift
        out[b.down_bias.name] = v.astype(b.down_bias.value.dtype).reshape(b.down_bias.shape)
    return out


def overridden_names(block: FfnBlock) -> list[str]:
    """The tensors :func:`emulated_arrays` replaces."""
    return [block.down.weight.name] + ([block.down_bias.name] if block.down_bias is not None else [])


def current_widths(ctx: Context) -> dict[int, WidthPlan]:
    """The width reductions in force, by each projection's group key: the budget's choice
    (``ffn_keep="auto"``, carried by the decisions) or the uniform fraction's."""
    from .decide import latest_decided

    chosen = latest_decided(ctx, "widths")
    if chosen is not None:
        return chosen.claimed
    narrowed = ctx.get(Narrowed)
    return {k: p for k, p in narrowed.claimed.items() if isinstance(p, WidthPlan)} if narrowed is not None else {}
