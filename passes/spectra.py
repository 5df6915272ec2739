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

import onnx

from onnx_lowrank import io, linalg, shapes
from onnx_lowrank.config import CompressConfig
from onnx_lowrank.errors import ModelError, option
from onnx_lowrank.pipeline import Context, StageResult, Step
from onnx_lowrank.runtime import threads
from onnx_lowrank.runtime.executor import InProcess, Threads

from onnx_lowrank.plan import MATRIX, ConvUse, LayerPlan, Skip, SkipCode, View

from .discover import Discovery
from .statistics import Statistics
from .width import Narrowed

__all__ = ["Spectra", "TakeSpectra", "WeightTask", "take_spectra", "plan_weight", "conv_use"]

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
                 name: str, energy: float | None, method: str, keep) -> tuple[View, str | None]:
    m, n = arr.shape
    note = None
    if gram is None:
        return View(MATRIX, m, n, linalg.spectrum(arr, energy=energy, method=method, keep=keep)), None
    g, side = gram
    spec = None
    if out_gram is not None:
        try:
            spec = linalg.whitened_spectrum(arr, g, side, damping, out_gram=out_gram, energy=energy, method=method, keep=keep)
            note = "attention-aware"
        except ValueError as exc:  # e.g. keys that never vary: weigh by the input only
            log.info("attention-aware weighting of %s skipped: %s", name, exc)
    if spec is None:
        spec = linalg.whitened_spectrum(arr, g, side, damping, energy=energy, method=method, keep=keep)
    return View(MATRIX, m, n, spec), note


def _energy(cfg: CompressConfig, is_conv: bool) -> float | None:
    """The threshold that will choose the rank, when only it does (so the leading part of the
    spectrum may serve): the per-layer energy rule, not a fixed rank, entropy or a budget (which
    allocates Convs too under a parameter budget)."""
    from .decide import budget_sizes, rule_energy  # the deciders own their rules (a later stage: imported here)

    if cfg.rank is not None or cfg.rank_rule != "energy" or budget_sizes(cfg, is_conv):
        return None
    return rule_energy(cfg, is_conv)


@dataclass(frozen=True)
class WeightTask:
    """What a worker needs to take one weight's spectra (picklable: no graph objects).

    Attributes:
        key: The weight group's handle.
        tensor: The weight's tensor (without its data when that lives in a file).
        is_conv: A Conv kernel (one or two views), else a matrix.
        cfg: The configuration (which views, the rank rule, damping, ``svd``).
        break_even: Per view, the largest rank that saves (a Conv's counts its MACs).
        gram, out_gram, note: Data-aware statistics, and a remark for the report.
    """

    key: int
    tensor: onnx.TensorProto
    is_conv: bool
    cfg: CompressConfig
    break_even: dict[str, int]
    gram: tuple[np.ndarray, str] | None = None
    out_gram: np.ndarray | None = None
    note: str | None = None


def take_spectra(data: io.DataFiles, task: WeightTask) -> tuple[dict[str, View], str | None, Skip | None]:
    """Read one weight and take its views' spectra, truncated to what a decider can use.

    Returns:
        ``(views, note, skip)``.
    """
    from .decide import rank_ceiling  # (a later stage, as in _energy)

    try:
        arr = data.read(task.tensor)
    except OSError as exc:
        raise ModelError(f"cannot read weight '{task.tensor.name}': {exc}") from None
    cfg, note, skip = task.cfg, task.note, None

    def keep(mode: str, m: int, n: int):
        return lambda s, total: rank_ceiling(cfg, task.is_conv, s, total, m, n, task.break_even[mode])

    if task.is_conv:
        views = {}
        for mode in task.break_even:
            m, n = linalg.conv_matrix_shape(arr.shape, mode)
            try:
                views[mode] = View(mode, m, n, linalg.spectrum(linalg.conv_matrix(arr, mode), energy=_energy(cfg, True), method=cfg.svd,
                                                               keep=keep(mode, m, n)))
            except ValueError as exc:
                views[mode] = View(mode, m, n)
                skip = Skip(SkipCode.NOT_FACTORIZABLE, f"cannot factorize: {exc}", STAGE)
    else:
        try:
            view, extra = _matrix_view(arr, task.gram, task.out_gram, cfg.damping, task.tensor.name, _energy(cfg, False), cfg.svd,
                                       keep(MATRIX, *arr.shape))
            views, note = {MATRIX: view}, extra or note
        except ValueError as exc:
            views = {MATRIX: View(MATRIX, *arr.shape)}
            skip = Skip(SkipCode.NOT_FACTORIZABLE, f"cannot factorize: {exc}", STAGE)
    return views, note, skip


def _skeleton(key: int, group, cfg: CompressConfig, known: shapes.ShapeInfo | None) -> LayerPlan:
    """A weight's plan before its spectra: shape, views (their sizes), Conv uses, and a skip the
    shape alone decides."""
    w = group.weight
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(w.tensor.data_type))
    if not group.layers[0].is_conv:
        m, n = w.shape
        return LayerPlan(key, group, dtype, w.shape, views={MATRIX: View(MATRIX, m, n)})
    nd = len(w.shape) - 2
    modes = ["channel", "spatial"] if cfg.conv_mode == "auto" else [cfg.conv_mode]
    if nd != 2 and "spatial" in modes:
        modes.remove("spatial")  # auto: spatial-wise needs kh x kw
    plan = LayerPlan(key, group, dtype, w.shape, conv_uses=tuple(conv_use(layer, known) for layer in group.layers))
    if not modes:
        skip = Skip(SkipCode.NO_SPATIAL_VIEW, f"spatial-wise decomposition needs a 2-D kernel (kh x kw); this Conv's kernel is {nd}-D "
                    f"{list(w.shape[2:])}; use {option('conv_mode')} channel or auto", STAGE)
        return dataclasses.replace(plan, views={"channel": View("channel", *linalg.conv_matrix_shape(w.shape, "channel"))},
                                   skip=skip)
    return dataclasses.replace(plan, views={mode: View(mode, *linalg.conv_matrix_shape(w.shape, mode)) for mode in modes})


def plan_weight(key: int, group, arr: np.ndarray, cfg: CompressConfig, *, gram=None, out_gram=None, note: str | None = None,
                known: shapes.ShapeInfo | None = None) -> LayerPlan:
    """The plan of one weight given as an array: its view(s) and spectra, truncated to what a
    decider can use (the stage does the same, reading each weight where it lives)."""
    skeleton = _skeleton(key, group, cfg, known)
    if skeleton.skip is not None:
        return skeleton
    tensor = onnx.numpy_helper.from_array(arr, group.weight.name)
    task = WeightTask(key, tensor, skeleton.is_conv, cfg, {mode: skeleton.break_even(mode) for mode in skeleton.views},
                      gram, out_gram, note)
    views, note, skip = take_spectra(io.DataFiles(), task)
    return dataclasses.replace(skeleton, views=views, note=note, skip=skip)


class TakeSpectra(Step):
    """Read each weight discovery left in and take its spectrum, one weight at a time."""

    name = STAGE

    def run(self, ctx: Context) -> Spectra:
        found = ctx.need(Discovery)
        stats = ctx.get(Statistics)
        cap = stats.capture if stats is not None and ctx.config.data_aware else None  # (else for width reduction only)
        # Conv MACs scale with the output size, which only the model's shapes tell.
        known = shapes.value_shapes(ctx.model) if any(l.is_conv for l in found.layers) else None
        plans, tasks = {}, []
        narrowed = ctx.get(Narrowed)
        claimed = narrowed.claimed if narrowed is not None else {}
        for group in found.candidates:
            if group.key in claimed:
                continue  # width-reduced: not factorized (passes/width.py)
            skeleton = plans[group.key] = _skeleton(group.key, group, ctx.config, known)
            if skeleton.skip is not None:
                continue
            tasks.append(WeightTask(group.key, group.weight.tensor, skeleton.is_conv, ctx.config,
                                    {mode: skeleton.break_even(mode) for mode in skeleton.views},
                                    cap.grams.get(group.key) if cap is not None else None,
                                    cap.out_grams.get(group.key) if cap is not None else None,
                                    cap.skipped.get(group.key) if cap is not None else None))
        labels = [found.group(t.key).weight.name for t in tasks]
        # workers read each weight where it lives (external data) or get it with its task
        results = _run(ctx, tasks, labels)
        for task, (views, note, skip) in zip(tasks, results):
            plans[task.key] = dataclasses.replace(plans[task.key], views=views, note=note, skip=skip)
        return Spectra(plans, known)


# Weights up to this many elements (16 MiB of float32) take their spectra side by side, one per
# core; larger ones one after another, with BLAS's threads (their Gram products do use them).
SMALL = 1 << 22


def _run(ctx: Context, tasks: list[WeightTask], labels: list[str]) -> list:
    """Every task's result, in order: on the configured pool or cluster; in this process, small
    weights on the pass's cores (:class:`~onnx_lowrank.runtime.executor.Threads`), the rest here."""
    if ctx.executor is not None and not isinstance(ctx.executor, InProcess):  # --workers N, Ray
        return ctx.executor.run(_setup, take_spectra, ctx.data, tasks, lambda k, n: ctx.progress(k, n, labels[k - 1]))
    small = [k for k, t in enumerate(tasks) if int(np.prod(t.tensor.dims)) <= SMALL]
    large = sorted(set(range(len(tasks))) - set(small))
    results: list = [None] * len(tasks)
    done = 0
    for runner, part in ((Threads(threads.session_threads() or 1), small), (InProcess(), large)):

        def step(k, _n, part=part):
            nonlocal done
            done += 1
            ctx.progress(done, len(tasks), labels[part[k - 1]])

        for k, r in zip(part, runner.run(_setup, take_spectra, ctx.data, [tasks[k] for k in part], step)):
            results[k] = r
    return results


def _setup(data: io.DataFiles) -> io.DataFiles:
    return data
