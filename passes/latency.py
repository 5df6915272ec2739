"""Latency-aware decisions: factorize a layer only where its factored form is measured faster.

Approach
--------
Fewer multiply-accumulates do not always mean less time.  A dense product ``x @ W`` with
``x: (rows, k_in)`` and ``W: (k_in, k_out)`` costs ``rows * k_in * k_out`` MACs in one GEMM call;
the factored form ``(x @ A) @ B`` costs ``rows * r * (k_in + k_out)`` in two calls, plus a
``(rows, r)`` intermediate.  At small ``rows`` (batch 1 of an MLP) both are dominated by call
overhead and memory traffic for the weights; near the break-even rank the two GEMMs are no
faster than one; thread counts change which kernels win.  So the decision is measured, not
computed:

* for every planned layer, each (threads, batch) setting the user states gives the layer's
  activation row count (batch x sequence for N-D inputs, from shape inference on the model with
  its inputs fixed, or from one onnxruntime run when inference cannot tell);
* a :class:`LatencyProbe` times the dense and factored forms of that shape; the default,
  :class:`OrtProbe`, builds two tiny models (one MatMul; two chained MatMuls) and runs them in
  onnxruntime, interleaved, with the same thread count (and int8-quantized when the pass
  quantizes), caching results per (shape, rank, rows, threads, quantization) in memory and in a
  JSON file under the user's cache directory;
* a layer keeps its rank only if ``t_dense / t_factored >= min_speedup`` at every setting;
  otherwise it is left alone with the reason ``no latency gain (x1.03 at ...)``;
* after the rewrite, :func:`check_model` times the whole model against the input (interleaved,
  at every setting); a compressed model measured slower anywhere is not returned.

A Gemm is timed as the equivalent MatMul (onnxruntime runs both on the same GEMM kernels); a
weight shared by several nodes is timed once per user and the times summed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank import bench, io
from onnx_lowrank.errors import option
from onnx_lowrank.pipeline import Context, Step
from onnx_lowrank.plan import Decision, Skip, SkipCode
from onnx_lowrank.runtime import capture, session

from .decide import Decided
from .discover import Layer
from .rewrite import Rewritten
from .spectra import Spectra

__all__ = ["TimeLayers", "TimeModel", "Timed", "ModelTimed", "filter_decisions", "latency_batch", "MatMulCase", "LatencyProbe", "OrtProbe", "activation_rows", "layer_io", "check_model",
           "default_cache_dir"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MatMulCase:
    """One layer shape to time: ``x (rows, k_in) @ W (k_in, k_out)`` against its rank-``rank`` factors."""

    k_in: int
    k_out: int
    rank: int
    rows: int
    threads: int
    quantize: str | None = None

    def key(self) -> str:
        return f"{self.k_in}x{self.k_out}|r{self.rank}|rows{self.rows}|t{self.threads}|{self.quantize or 'fp32'}"


class LatencyProbe(Protocol):
    """What latency-aware mode measures with; tests pass a deterministic fake."""

    def layer_times(self, case: MatMulCase) -> tuple[float, float]:
        """Seconds per call of the dense form and of the factored form."""
        ...

    def model_speedup(self, before: str | os.PathLike | onnx.ModelProto, after: str | os.PathLike | onnx.ModelProto,
                      *, threads: int, shapes: Mapping[str, Sequence[int]]) -> float:
        """``t_before / t_after`` for whole models at one setting."""
        ...


def default_cache_dir() -> Path:
    """``$ONNX_LOWRANK_CACHE_DIR``, else ``$XDG_CACHE_HOME/onnx-lowrank``, else ``~/.cache/onnx-lowrank``."""
    env = os.environ.get("ONNX_LOWRANK_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "onnx-lowrank"


def _micro_model(k_in: int, k_out: int, rank: int | None, seed: int = 0) -> onnx.ModelProto:
    #   dense:    x[rows, k_in] --MatMul(W[k_in, k_out])--> y
    #   factored: x[rows, k_in] --MatMul(A[k_in, r])--> t --MatMul(B[r, k_out])--> y
    rng = np.random.default_rng(seed)
    f = TensorProto.FLOAT
    x = helper.make_tensor_value_info("x", f, ["rows", k_in])
    y = helper.make_tensor_value_info("y", f, ["rows", k_out])
    if rank is None:
        inits = [numpy_helper.from_array(rng.standard_normal((k_in, k_out)).astype(np.float32), "W")]
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="dense")]
    else:
        inits = [numpy_helper.from_array(rng.standard_normal((k_in, rank)).astype(np.float32), "A"),
                 numpy_helper.from_array(rng.standard_normal((rank, k_out)).astype(np.float32), "B")]
        nodes = [helper.make_node("MatMul", ["x", "A"], ["t"], name="factor_1"),
                 helper.make_node("MatMul", ["t", "B"], ["y"], name="factor_2")]
    graph = helper.make_graph(nodes, "micro", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class OrtProbe:
    """Times layer shapes and whole models in onnxruntime, interleaved; caches layer timings.

    Args:
        cache_dir: Directory of the on-disk cache (``latency.json``); ``None`` keeps the cache
            in memory only.  The file is keyed by onnxruntime version and CPU, so a cache
            copied to another machine is not reused.
        runs: Minimum interleaved rounds per layer case (each round times both forms).
        min_seconds: Keep adding rounds (up to ``max_runs``) until this much time was measured.
        model_runs: Minimum rounds of the whole-model check.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, *, runs: int = 15, min_seconds: float = 0.3,
                 max_runs: int = 400, warmup: int = 3, model_runs: int = 20, model_seconds: float = 3.0):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.runs, self.min_seconds, self.max_runs, self.warmup = runs, min_seconds, max_runs, warmup
        self.model_runs, self.model_seconds = model_runs, model_seconds
        info = bench.machine_info()
        self.machine_key = hashlib.sha1(f"{info['onnxruntime']}|{info['cpu']}|{info['logical_cpus']}".encode()).hexdigest()[:12]
        self._memory: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._load_disk()

    @property
    def cache_file(self) -> Path | None:
        return self.cache_dir / "latency.json" if self.cache_dir is not None else None

    def _load_disk(self) -> None:
        path = self.cache_file
        if path is None or not path.is_file():
            return
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            for key, (d, f) in doc.get(self.machine_key, {}).items():
                self._memory[key] = (float(d), float(f))
        except (OSError, ValueError, TypeError, AttributeError) as exc:  # (not JSON, or JSON of another shape)
            self._memory.clear()
            log.warning("ignoring the latency cache %s, which is not one this package wrote (%s); it will be rewritten",
                        path, type(exc).__name__)

    def _save_disk(self) -> None:
        path = self.cache_file
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            doc: dict[str, Any] = {}
            if path.is_file():
                try:
                    doc = json.loads(path.read_text(encoding="utf-8"))
                except ValueError:
                    doc = {}
            if not isinstance(doc, dict) or not isinstance(doc.get(self.machine_key, {}), dict):
                doc = {}  # (a file of another shape is replaced whole)
            doc.setdefault(self.machine_key, {}).update({k: list(v) for k, v in self._memory.items()})
            fd, tmp = tempfile.mkstemp(prefix=".latency.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f)
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("could not write latency cache %s: %s", path, exc)

    def layer_times(self, case: MatMulCase) -> tuple[float, float]:
        key = case.key()
        with self._lock:
            if key in self._memory:
                return self._memory[key]
        dense, factored = _micro_model(case.k_in, case.k_out, None), _micro_model(case.k_in, case.k_out, case.rank)
        if case.quantize:
            from .quantize import quantize

            dense, factored = quantize(dense, case.quantize), quantize(factored, case.quantize)
        sessions = [session(m, threads=case.threads) for m in (dense, factored)]
        x = np.random.default_rng(0).standard_normal((case.rows, case.k_in)).astype(np.float32)
        calls = [(lambda s=s: s.run(None, {"x": x})) for s in sessions]
        times = bench.time_interleaved(calls, runs=self.runs, warmup=self.warmup, min_seconds=self.min_seconds,
                                       max_runs=self.max_runs)
        result = (float(np.median(times[0])), float(np.median(times[1])))
        log.debug("timed %s: dense %.1f us, factored %.1f us", key, result[0] * 1e6, result[1] * 1e6)
        with self._lock:
            self._memory[key] = result
            self._save_disk()
        return result

    def model_speedup(self, before, after, *, threads: int, shapes: Mapping[str, Sequence[int]]) -> float:
        proto = before if isinstance(before, onnx.ModelProto) else io.load_model(before).model
        feeds = bench.random_feeds(proto, shapes)
        sessions = [session(m, threads=threads) for m in (before, after)]
        calls = [(lambda s=s: s.run(None, feeds)) for s in sessions]
        times = bench.time_interleaved(calls, runs=self.model_runs, warmup=self.warmup, min_seconds=self.model_seconds,
                                       max_runs=self.max_runs)
        return float(np.median(np.asarray(times[0]) / np.maximum(np.asarray(times[1]), 1e-12)))


def layer_io(layer: Layer, m: int, n: int) -> tuple[int, int]:
    """``(k_in, k_out)`` of a node that uses an ``(m, n)`` weight, as an ``x @ W`` product."""
    attrs = {a.name: helper.get_attribute_value(a) for a in layer.node.attribute}
    if layer.weight_index == 1:
        return (n, m) if layer.op_type == "Gemm" and attrs.get("transB", 0) else (m, n)
    if layer.op_type == "Gemm" and attrs.get("transA", 0):
        return (m, n)
    return (n, m)


def _fixed_inputs_copy(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for v in copy.graph.input:
        if v.name in shapes:
            dims = v.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[v.name]:
                dims.add().dim_value = int(d)
    return copy


def _known_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    g = model.graph
    for v in list(g.input) + list(g.value_info) + list(g.output):
        t = v.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out[v.name] = tuple(int(d.dim_value) for d in t.shape.dim)
    for t in g.initializer:
        out[t.name] = tuple(int(d) for d in t.dims)
    return out


def activation_rows(model: onnx.ModelProto, layers: Sequence[Layer], shapes: Mapping[str, Sequence[int]],
                    base_dir: str | os.PathLike | io.DataFiles | None = None) -> dict[int, int | None]:
    """Activation rows per layer (keyed by its ``index``) with the graph inputs at ``shapes``.

    Shape inference runs on a copy with the inputs fixed; activations it cannot size (dynamic
    reshapes) are read from one onnxruntime run of the copy with them added as outputs.  Layers
    in If/Loop/Scan bodies get ``None``.
    """
    fixed = _fixed_inputs_copy(model, shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception as exc:  # inference gives up on some custom or malformed graphs
        log.debug("shape inference failed (%s); sizing activations with onnxruntime", exc)
        inferred = fixed
    known = _known_shapes(inferred)
    wanted = {layer.index: layer.node.input[1 - layer.weight_index] for layer in layers
              if not layer.scope and layer.weight_index is not None}
    missing = sorted({x for x in wanted.values() if x not in known})
    if missing:
        known.update(_run_for_shapes(fixed, missing, shapes, io.as_data(base_dir)))
    rows: dict[int, int | None] = {}
    for layer in layers:
        x = wanted.get(layer.index)
        shape = known.get(x) if x is not None else None
        if shape is None:
            rows[layer.index] = None
            continue
        m, n = layer.weight.shape
        k_in, _ = layer_io(layer, m, n)
        numel = int(np.prod(shape, dtype=np.int64))
        rows[layer.index] = numel // k_in if k_in and numel % k_in == 0 else None
    return rows


def _run_for_shapes(model: onnx.ModelProto, names: Sequence[str], shapes: Mapping[str, Sequence[int]],
                    data: io.DataFiles | None) -> dict[str, tuple[int, ...]]:
    found: dict[str, tuple[int, ...]] = {}

    def keep(feed, got) -> None:
        found.update({name: tuple(int(d) for d in np.shape(v)) for name, v in got[0].items() if name in names})

    try:
        capture(model, names, [bench.random_feeds(model, shapes)], keep, data=data, threads=1)
    except Exception as exc:
        log.debug("could not size activations with onnxruntime: %s", exc)
        return {}
    return found


class _runnable:
    """A model a probe can time on its own: the proto, or a temporary copy with its external data."""

    def __init__(self, model: onnx.ModelProto, base_dir: str | os.PathLike | None):
        self.model, self.base_dir, self.tmp = model, base_dir, None

    def __enter__(self):
        if not io.uses_external_data(self.model):
            return self.model
        self.tmp = tempfile.TemporaryDirectory(prefix="onnx-lowrank-lat-")
        path = Path(self.tmp.name) / "model.onnx"
        io.save_model(self.model, path, data=io.as_data(self.base_dir))
        return path

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def _setting_label(threads: int, batch: int) -> str:
    return f"{threads} thread{'s' if threads != 1 else ''}, batch {batch}"


def filter_decisions(model: onnx.ModelProto, plans: Mapping[int, Any], decisions: Mapping[int, Decision], *, threads: Sequence[int],
                     batch: Sequence[int], input_shape: Mapping[str, Sequence[int]], min_speedup: float, quantize: str | None,
                     probe: LatencyProbe, data: io.DataFiles | None = None) -> tuple[dict[int, Decision], dict[str, Any]]:
    """Leave alone every planned layer whose factored form is not measured faster at every setting.

    Args:
        model: The model before the rewrite.
        plans: The plans, by key.
        decisions: The decisions so far, by key.
        threads, batch: The settings the model will run at.
        input_shape: Shapes for inputs with dynamic axes other than the batch.
        min_speedup: Required ``t_dense / t_factored`` per layer.
        quantize: The ``quantize`` mode when the factors will be quantized (timed quantized then).
        probe: What measures.

    Returns:
        The new decisions, and the per-layer measurements for the report.
    """
    out = dict(decisions)
    chosen = [(plans[k], d) for k, d in decisions.items() if d.factorize]
    todo = [(p, d) for p, d in chosen if not p.is_conv]
    measured: dict[str, Any] = {}
    for p, d in chosen:
        if p.is_conv:
            # The micro-benchmarks time MatMul shapes; a Conv pair is judged by the whole-model check.
            measured[p.name] = {"rank": d.rank, "settings": [], "kept": True, "note": "Conv: judged by the whole-model check"}
    settings = [(t, b) for t in threads for b in batch]
    rows_at: dict[int, dict[int, int | None]] = {}
    layers = [layer for p, _ in todo for layer in p.group.layers]
    for b in batch:
        shapes = bench.resolve_shapes(model, batch=b, input_shape=input_shape)
        rows_at[b] = activation_rows(model, layers, shapes, data) if layers else {}
    for p, d in todo:
        worst: tuple[float, int, int] | None = None
        per_setting = []
        unknown = None
        v = p.view()
        for t, b in settings:
            dense = factored = 0.0
            for layer in p.group.layers:
                rows = rows_at[b].get(layer.index)
                if rows is None:
                    unknown = layer.display_name
                    break
                k_in, k_out = layer_io(layer, v.m, v.n)
                t_dense, t_factored = probe.layer_times(MatMulCase(k_in, k_out, d.rank, rows, t, quantize))
                dense += t_dense
                factored += t_factored
            if unknown is not None:
                break
            speedup = dense / factored if factored > 0 else float("inf")
            per_setting.append({"threads": t, "batch": b, "dense_us": dense * 1e6, "factored_us": factored * 1e6, "speedup": speedup})
            if worst is None or speedup < worst[0]:
                worst = (speedup, t, b)
        if unknown is not None:
            out[p.key] = d.replace(skip=Skip(SkipCode.NO_LATENCY_ESTIMATE, f"no latency estimate: the input shape of {unknown} "
                                             "is unknown (inside a subgraph or dynamic)", STAGE))
            measured[p.name] = {"rank": d.rank, "settings": [], "kept": False}
            continue
        assert worst is not None
        kept = worst[0] >= min_speedup
        if not kept:
            skip = Skip(SkipCode.NOT_FASTER, f"no latency gain (x{worst[0]:.2f} at {_setting_label(worst[1], worst[2])}; "
                        f"needs x{min_speedup:g})", STAGE)
            out[p.key] = d.replace(skip=skip)
            log.debug("left %s alone: %s", p.name, skip)
        else:
            how = "faster at worst" if worst[0] >= 1 else f"at worst, slower (kept: {option('min_speedup')} {min_speedup:g} allows it)"
            log.info("%s at rank %d: x%.2f %s (%s)", p.name, d.rank, worst[0], how, _setting_label(worst[1], worst[2]))
        measured[p.name] = {"rank": d.rank, "settings": per_setting, "kept": kept}
    return out, measured


def check_model(before: onnx.ModelProto, after: onnx.ModelProto, *, threads: Sequence[int], batch: Sequence[int],
                input_shape: Mapping[str, Sequence[int]], probe: LatencyProbe,
                before_dir: str | os.PathLike | None = None, after_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Whole-model speed-ups ``t_before / t_after`` at every (threads, batch) setting.

    ``before_dir`` and ``after_dir`` are where each model's external data references point.
    """
    out = []
    with _runnable(before, before_dir) as a, _runnable(after, after_dir) as b_src:
        for t in threads:
            for b in batch:
                shapes = bench.resolve_shapes(before, batch=b, input_shape=input_shape)
                s = probe.model_speedup(a, b_src, threads=t, shapes=shapes)
                log.info("whole model at %s: x%.2f", _setting_label(t, b), s)
                out.append({"threads": t, "batch": b, "speedup": s})
    return out


STAGE = "latency"


def latency_batch(model: onnx.ModelProto, batch: Sequence[int]) -> tuple[int, ...]:
    """The batch sizes to time: ``batch``, except that the default (1) on a model whose batch
    axis is fixed to another size times that size, the only one the model runs at."""
    if tuple(batch) == (1,):
        from onnx_lowrank.calibration import fixed_batch, model_inputs

        fixed = fixed_batch(model_inputs(model))
        if fixed is not None:
            return (fixed,)
    return tuple(batch)


def _probe(ctx: Context) -> LatencyProbe:
    return ctx.request.probe if ctx.request.probe is not None else OrtProbe(default_cache_dir())


def _input_shapes(ctx: Context) -> dict[str, tuple[int, ...]]:
    from onnx_lowrank.calibration import parse_input_shapes

    return parse_input_shapes(ctx.config.input_shape)


@dataclass
class Timed(Decided):
    """Decisions with every layer that is not faster factored left alone, and the measurements."""

    section = "latency"
    layers: dict[str, Any] = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers}


class TimeLayers(Step):
    """Keep a layer factored only where onnxruntime runs its factored form faster (``latency_aware``)."""

    name = STAGE
    switch = "latency_aware"

    def run(self, ctx: Context) -> Timed:
        cfg = ctx.config
        decisions, layers = filter_decisions(
            ctx.model, ctx.need(Spectra).plans, ctx.latest(Decided).decisions, threads=cfg.threads,
            batch=latency_batch(ctx.model, cfg.batch), input_shape=_input_shapes(ctx), min_speedup=cfg.min_speedup,
            quantize=cfg.quantize, probe=_probe(ctx), data=ctx.data)
        return Timed(decisions, layers)


@dataclass
class ModelTimed(Decided):
    """The whole model timed against the input; when it is slower anywhere, the input back."""

    section = "latency"
    layers: dict[str, Any] = None  # type: ignore[assignment]
    checks: list[dict[str, Any]] = None  # type: ignore[assignment]
    baseline: str = "input"
    undone: bool = False
    model: onnx.ModelProto | None = None
    data: io.DataFiles | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": self.layers, "model": self.checks, "baseline": self.baseline}
        if self.undone:
            out["undone"] = True
        return out


class TimeModel(Step):
    """Time the rewritten model against the input; undo the factorization if it is slower anywhere.

    With ``quantize``, the baseline is the input quantized the same way, so the check asks
    whether factorization pays on top of int8.
    """

    name = "latency-model"
    changes_model = True

    def applies(self, ctx: Context) -> bool:
        rewritten = ctx.get(Rewritten)
        return ctx.config.latency_aware and rewritten is not None and bool(rewritten.factors)

    def run(self, ctx: Context) -> ModelTimed:
        cfg = ctx.config
        rewritten = ctx.need(Rewritten)
        baseline, base_data = rewritten.before, rewritten.before_data
        if cfg.quantize:
            from .quantize import quantize

            baseline, base_data = quantize(baseline, cfg.quantize, base_dir=base_data), io.DataFiles()
        checks = check_model(baseline, ctx.model, threads=cfg.threads, batch=latency_batch(baseline, cfg.batch),
                             input_shape=_input_shapes(ctx), probe=_probe(ctx), before_dir=base_data, after_dir=ctx.data)
        timed = ctx.need(Timed)
        label = f"input quantized ({cfg.quantize})" if cfg.quantize else "input"
        decisions = ctx.latest(Decided).decisions
        worst = min(checks, key=lambda c: c["speedup"])
        if worst["speedup"] >= 1.0:
            return ModelTimed(decisions, timed.layers, checks, label, False, ctx.model, ctx.data)
        where = f"{worst['threads']} thread{'s' if worst['threads'] != 1 else ''}, batch {worst['batch']}"
        skip = Skip(SkipCode.WHOLE_MODEL_SLOWER, f"no latency gain: the whole model measured x{worst['speedup']:.2f} at {where}; "
                    "factorization undone", "latency-model")
        log.warning("%s", skip)
        undone = {k: d.replace(skip=skip) if d.factorize else d for k, d in decisions.items()}
        return ModelTimed(undone, timed.layers, checks, label, True, baseline, base_data)
