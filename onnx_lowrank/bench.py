"""onnxruntime CPU latency: warm-up, many timed runs, percentiles, and side-by-side ratios.

Approach
--------
Latency on a CPU is noisy (other processes, frequency scaling, caches), so a comparison of two
models is only honest when both are measured under the same conditions at the same time:

* every session pins ``intra_op_num_threads`` to the requested count and
  ``inter_op_num_threads`` to 1 (thread count dominates CPU latency);
* two models run interleaved, one call each per round (A B, then B A, ...), and the speed-up is
  the median over rounds of ``t_A / t_B``; a burst of noise then hits both sides of a pair;
* statistics are medians and percentiles over many runs after a warm-up, never single runs.

Per-node times come from onnxruntime's own profiler (``SessionOptions.enable_profiling``): a
separate session runs the model, its JSON trace is parsed, the first run is dropped, and each
node's kernel time is averaged per run.  Nodes of a factorized layer (``<name>__lowrank_1`` and
``_2``) and its quantized form (``<name>_MatMul_quant`` ...) are also summed under the original
layer's name, so before and after line up.

Inputs: every graph input needs a concrete shape.  Fixed dimensions are taken from the model;
``batch`` fills a dynamic first axis; any other dynamic axis needs ``input_shape``
(``{"input_ids": (1, 128)}``, or on the command line ``--input-shape input_ids:1x128``).  Feeds
are random and seeded: normal floats; integer ids in ``[0, 100)``, except inputs named like a
mask (all ones) or ``token_type`` (all zeros).
"""

from __future__ import annotations

import json
import logging
import operator
import os
import platform
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from .errors import ModelError, UsageError, option, option_value
from .runtime import session
from .calibration import input_type_mismatch, parse_input_shapes, random_feed  # one syntax and one generator for random inputs

__all__ = [
    "Stats",
    "ModelTiming",
    "Setting",
    "NodeTime",
    "Profile",
    "BenchReport",
    "bench",
    "parse_input_shapes",
    "resolve_shapes",
    "random_feeds",
    "machine_info",
    "time_interleaved",
    "layer_key",
]

log = logging.getLogger(__name__)

Timer = Callable[[], float]


# --------------------------------------------------------------------------- shapes and feeds


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in inits]


def _model_dims(v: onnx.ValueInfoProto) -> list[int | str | None]:
    t = v.type.tensor_type
    if not t.HasField("shape"):
        return []
    dims: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    return dims


def resolve_shapes(model: onnx.ModelProto, *, batch: int | None = None,
                   input_shape: Mapping[str, Sequence[int]] | None = None) -> dict[str, tuple[int, ...]]:
    """The concrete shape of every graph input.

    Args:
        model: The model (only its inputs are read).
        batch: Size of every dynamic first axis (default: from ``input_shape``, else 1).
        input_shape: Full shapes for inputs with other dynamic axes.

    Raises:
        UsageError: an unknown input name, a shape that contradicts the model, or a dynamic axis
            nobody gave a size for (the message names the flag that fixes it).
    """
    given = dict(input_shape or {})
    inputs = _graph_inputs(model)
    names = [v.name for v in inputs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise UsageError(f"{option('input_shape')} names {', '.join(unknown)}, which the model does not take; its inputs are {', '.join(names)}.")
    # A named axis given for one input (input_ids' 'sequence') sizes the same axis of the others.
    symbols: dict[str, int] = {}
    for v in inputs:
        if v.name in given:
            for d, size in zip(_model_dims(v), given[v.name]):
                if isinstance(d, str) and d:
                    symbols.setdefault(d, int(size))
    out: dict[str, tuple[int, ...]] = {}
    batched = False
    for v in inputs:
        dims = _model_dims(v)
        if v.name in given:
            shape = list(given[v.name])
            if dims and len(dims) != len(shape):
                raise UsageError(f"{option('input_shape')} {v.name}: got {len(shape)} sizes, but the input has {len(dims)} axes "
                                 f"({_show(dims)}).")
            for i, (d, s) in enumerate(zip(dims, shape)):
                if isinstance(d, int) and d != s:
                    raise UsageError(f"{option('input_shape')} {v.name}: axis {i} is fixed to {d} in the model, got {s}.")
        elif not v.type.tensor_type.HasField("shape"):
            raise UsageError(f"input '{v.name}' has no shape in the model; pass one, e.g. {option_value('input_shape', f'{v.name}:1x128')}.")
        else:
            shape = []
            for i, d in enumerate(dims):
                if isinstance(d, int):
                    shape.append(d)
                elif isinstance(d, str) and d in symbols:
                    shape.append(symbols[d])
                elif i == 0:
                    shape.append(1)
                else:
                    hint = "x".join("1" if k == 0 and not isinstance(x, int) else str(x) if isinstance(x, int) else "N"
                                    for k, x in enumerate(dims))
                    raise UsageError(f"input '{v.name}' has a dynamic axis {i} ('{d or '?'}'); pass its full shape, "
                                     f"e.g. {option_value('input_shape', f'{v.name}:{hint}')} with N the size you run.")
        if batch is not None and dims and not isinstance(dims[0], int):
            shape[0] = int(batch)
            batched = True
        out[v.name] = tuple(int(s) for s in shape)
    if batch is not None and not batched and any(s and s[0] != batch for s in out.values()):
        raise UsageError(f"{option_value('batch', batch)}: no input has a dynamic first axis ({_show_shapes(out)} are fixed); "
                         f"re-export the model with a dynamic batch axis or drop {option('batch')}.")
    return out


def _show(dims: Sequence[int | str | None]) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"


def random_feeds(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs of the given shapes and the model's dtypes (as verification draws them)."""
    return random_feed(model, shapes, seed=seed)


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stats:
    """Latency statistics in milliseconds over ``runs`` timed runs."""

    runs: int
    p50_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float

    @classmethod
    def from_seconds(cls, seconds: Sequence[float]) -> "Stats":
        a = np.asarray(seconds, dtype=np.float64) * 1e3
        return cls(runs=int(a.size), p50_ms=float(np.median(a)), p90_ms=float(np.percentile(a, 90)),
                   mean_ms=float(a.mean()), min_ms=float(a.min()))


def time_interleaved(calls: Sequence[Callable[[], Any]], *, runs: int, warmup: int, timer: Timer = time.perf_counter,
                     min_seconds: float = 0.0, max_runs: int | None = None) -> list[list[float]]:
    """Time several callables in alternating order; returns seconds per call, per callable.

    Round ``i`` calls them in order when ``i`` is even and in reverse when odd, so no callable
    always runs first.  At least ``runs`` rounds run; more (up to ``max_runs``) until
    ``min_seconds`` of timed work has passed.
    """
    for _ in range(warmup):
        for c in calls:
            c()
    times: list[list[float]] = [[] for _ in calls]
    spent = 0.0
    i = 0
    limit = max(runs, max_runs or runs)
    while i < runs or (spent < min_seconds and i < limit):
        order = range(len(calls)) if i % 2 == 0 else range(len(calls) - 1, -1, -1)
        for k in order:
            t0 = timer()
            calls[k]()
            dt = timer() - t0
            times[k].append(dt)
            spent += dt
        i += 1
    return times


# --------------------------------------------------------------------------- profiling


@dataclass(frozen=True)
class NodeTime:
    """Mean kernel time of one node (or one layer, summed over its nodes) per run."""

    name: str
    op_type: str
    mean_us: float


@dataclass
class Profile:
    """Where the time goes in one model, from onnxruntime's profiler."""

    label: str
    threads: int
    runs: int
    nodes: list[NodeTime] = field(default_factory=list)
    op_types: dict[str, float] = field(default_factory=dict)
    layers: dict[str, float] = field(default_factory=dict)

    @property
    def total_us(self) -> float:
        return float(sum(self.op_types.values()))

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "threads": self.threads, "runs": self.runs, "total_us": self.total_us,
                "op_types": self.op_types, "layers": self.layers, "nodes": [asdict(n) for n in self.nodes]}


_KEY_SUFFIXES = re.compile(r"(__lowrank_\d+)?(_MatMul)?(_quant(_scales_mul|_output_scale_mul)?)?$")


def layer_key(node_name: str) -> str:
    """The original layer a node belongs to: factor and quantization suffixes removed."""
    name = node_name[len("fused "):] if node_name.startswith("fused ") else node_name
    name = _KEY_SUFFIXES.sub("", name)
    return re.sub(r"__lowrank_\d+", "", name)


def parse_profile(path: str | os.PathLike, label: str, threads: int) -> Profile:
    """Aggregate an onnxruntime profile trace (JSON) per node, op type and layer; the first run is dropped."""
    with open(path, encoding="utf-8") as f:
        events = json.load(f)
    run_windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = run_windows[1][0] if len(run_windows) > 1 else 0
    runs = max(len(run_windows) - 1, 1) if len(run_windows) > 1 else max(len(run_windows), 1)
    per_node: dict[str, list[Any]] = {}
    for e in events:
        if e.get("cat") != "Node" or e.get("ts", 0) < start or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        entry = per_node.setdefault(name, [op, 0.0])
        entry[1] += float(e.get("dur", 0))
    prof = Profile(label=label, threads=threads, runs=runs)
    for name, (op, total) in per_node.items():
        mean = total / runs
        prof.nodes.append(NodeTime(name=name, op_type=op, mean_us=mean))
        prof.op_types[op] = prof.op_types.get(op, 0.0) + mean
        key = layer_key(name)
        prof.layers[key] = prof.layers.get(key, 0.0) + mean
    prof.nodes.sort(key=lambda n: -n.mean_us)
    return prof


def profile_model(model: str | os.PathLike | onnx.ModelProto, feeds: Mapping[str, np.ndarray], *, threads: int,
                  runs: int = 20, label: str = "model") -> Profile:
    """Run ``model`` ``runs + 1`` times under onnxruntime's profiler and aggregate the trace."""
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-prof-") as tmp:
        sess = session(model, threads=threads, profile_prefix=str(Path(tmp) / "profile"))
        for _ in range(runs + 1):
            sess.run(None, dict(feeds))
        trace = sess.end_profiling()
        return parse_profile(trace, label, threads)


def make_session(model: str | os.PathLike | onnx.ModelProto, threads: int):
    """:func:`onnx_lowrank.runtime.session` with ``threads`` intra-op threads (the seam the timing tests replace)."""
    return session(model, threads=threads)


def machine_info() -> dict[str, Any]:
    """What a latency number depends on: CPU, core count, OS, Python and onnxruntime versions."""
    import onnxruntime as ort

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu or platform.machine(), "logical_cpus": os.cpu_count(), "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "onnxruntime": ort.__version__, "provider": "CPUExecutionProvider"}


# --------------------------------------------------------------------------- the benchmark


@dataclass(frozen=True)
class ModelTiming:
    """One model's latency at one setting."""

    label: str
    stats: Stats


@dataclass
class Setting:
    """All models at one (threads, batch) setting.

    Attributes:
        threads: ``intra_op_num_threads``.
        batch: The batch size asked for (``None``: shapes as resolved without it).
        shapes: Input name -> shape actually run.
        timings: One per model, in the order given.
        speedup: With two models: median over interleaved rounds of ``t_first / t_second``
            (above 1: the second model is faster).
        speedup_p10, speedup_p90: The 10th and 90th percentiles of those per-round ratios.
        profiles: Per-node times, when profiling was asked for.
    """

    threads: int
    batch: int | None
    shapes: dict[str, tuple[int, ...]]
    timings: list[ModelTiming] = field(default_factory=list)
    speedup: float | None = None
    speedup_p10: float | None = None
    speedup_p90: float | None = None
    profiles: list[Profile] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "batch": self.batch,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "models": [{"label": t.label, **asdict(t.stats)} for t in self.timings],
            "speedup": self.speedup,
            "speedup_p10": self.speedup_p10,
            "speedup_p90": self.speedup_p90,
            "profiles": [p.to_dict() for p in self.profiles] or None,
        }


@dataclass
class BenchReport:
    """Everything measured, with what it was measured on."""

    labels: list[str]
    runs: int
    warmup: int
    machine: dict[str, Any]
    settings: list[Setting] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"models": self.labels, "runs": self.runs, "warmup": self.warmup, "machine": self.machine,
                "interleaved": len(self.labels) > 1, "settings": [s.to_dict() for s in self.settings]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _load(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    from .io import load_model

    return load_model(model).model


def _integer(name: str, value: Any) -> int:
    """``value`` as an int (numpy integers too), or a UsageError naming ``name``."""
    if isinstance(value, bool):
        raise UsageError(f"{option(name)} must be an integer, got {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise UsageError(f"{option(name)} must be an integer, got {value!r}.") from None


def _integers(name: str, value: Any) -> list[int]:
    """One integer, a sequence of them, or ``"1,2"`` text, as a list; else a UsageError."""
    if isinstance(value, str):
        try:
            return [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise UsageError(f"{option(name)} must be positive integers, got {value!r}; e.g. "
                             f"{option_value(name, (1, 2))}.") from None
    if not isinstance(value, (list, tuple)) and not hasattr(value, "__iter__"):
        return [_integer(name, value)]
    return [_integer(name, v) for v in value]


def bench(
    models: Sequence[str | os.PathLike | onnx.ModelProto] | str | os.PathLike | onnx.ModelProto,
    *,
    threads: int | Sequence[int] = 1,
    batch: int | Sequence[int] | None = None,
    input_shape: str | Sequence[str] | Mapping[str, Sequence[int]] | None = None,
    runs: int = 100,
    warmup: int = 10,
    profile: bool = False,
    profile_runs: int = 20,
    labels: Sequence[str] | None = None,
    seed: int = 0,
    timer: Timer = time.perf_counter,
) -> BenchReport:
    """Measure onnxruntime CPU latency of one model, or of two side by side.

    Args:
        models: One or two models (paths or ``ModelProto``).  Two models run interleaved and
            must take the same inputs.
        threads: Intra-op thread counts to measure at, e.g. ``(1, 2)``.
        batch: Batch sizes for the dynamic first axis, e.g. ``(1, 64)``.
        input_shape: Shapes for inputs with other dynamic axes (``"input_ids:1x128"``).
        runs: Timed runs per model and setting, after ``warmup`` untimed ones.
        warmup: Untimed runs first.
        profile: Also collect per-node times with onnxruntime's profiler.
        profile_runs: Profiled runs per model and setting.
        labels: Names for the models in the report (default: file names, or ``model0``...).
        seed: Seed of the random feeds.
        timer: Clock returning seconds (injectable for tests).

    Returns:
        A :class:`BenchReport`.

    Raises:
        UsageError: bad counts, more than two models, or missing input shapes.
        ModelError: a model cannot be loaded or run.
    """
    if models is None:
        raise UsageError("bench() got no model; pass a path or an onnx.ModelProto, or a list of two to compare.")
    single = isinstance(models, (str, os.PathLike, onnx.ModelProto)) or not hasattr(models, "__iter__")
    items = [models] if single else list(models)
    if not 1 <= len(items) <= 2:
        raise UsageError(f"got {len(items)} models; bench takes one model, or two to compare.")
    runs, warmup, seed = (_integer(name, value) for name, value in (("runs", runs), ("warmup", warmup), ("seed", seed)))
    if runs < 1 or warmup < 0:
        raise UsageError(f"{option('runs')} must be >= 1 and {option('warmup')} >= 0, got {runs} and {warmup}.")
    thread_list = _integers("threads", threads)
    batch_list: list[int | None] = [None] if batch is None else list(_integers("batch", batch))
    if labels is not None:
        labels = [str(label) for label in ([labels] if isinstance(labels, str) else labels)]
        if len(labels) != len(items):
            raise UsageError(f"got {len(labels)} label(s) for {len(items)} model(s); give one per model, or none.")
    if not thread_list or any(t < 1 for t in thread_list):
        raise UsageError(f"{option('threads')} must be positive integers, got {thread_list}; e.g. {option_value('threads', (1, 2))}.")
    if not batch_list or any(b is not None and b < 1 for b in batch_list):
        raise UsageError(f"{option('batch')} must be positive integers, got {batch_list}; e.g. {option_value('batch', (1, 64))}.")
    shapes_given = parse_input_shapes(input_shape)
    protos = [_load(m) for m in items]
    if labels is None:
        labels = [Path(m).name if isinstance(m, (str, os.PathLike)) else f"model{k}" for k, m in enumerate(items)]
        if len(labels) == 2 and labels[0] == labels[1]:
            labels = [str(m) if isinstance(m, (str, os.PathLike)) else f"model{k}" for k, m in enumerate(items)]
    if len(protos) == 2:
        a, b = ({v.name: v.type.tensor_type.elem_type for v in _graph_inputs(p)} for p in protos)
        if a != b:
            if set(a) == set(b):  # the same names: say which types differ
                name, *types = input_type_mismatch(*protos)
                kinds = [onnx.TensorProto.DataType.Name(t).lower() if t else "not a tensor" for t in types]
                raise UsageError(f"the two models take input '{name}' as different types ({kinds[0]} in {labels[0]}, "
                                 f"{kinds[1]} in {labels[1]}); compare models with the same inputs.")
            raise UsageError(f"the two models take different inputs ({', '.join(sorted(a))} vs {', '.join(sorted(b))}); "
                             f"compare models with the same inputs.")
    report = BenchReport(labels=list(labels), runs=runs, warmup=warmup, machine=machine_info())
    sources = [m if isinstance(m, onnx.ModelProto) else Path(m) for m in items]
    for t in thread_list:
        sessions = [make_session(s, t) for s in sources]
        for b in batch_list:
            shapes = resolve_shapes(protos[0], batch=b, input_shape=shapes_given)
            for label, other in zip(labels[1:], protos[1:]):  # the second model must take the same shapes
                try:
                    resolve_shapes(other, input_shape={**shapes_given, **shapes})
                except UsageError as exc:
                    raise UsageError(f"{label} cannot take the inputs {labels[0]} runs with ({_show_shapes(shapes)}"
                                     f"{', ' + option_value('batch', b) if b is not None else ''}): {exc}") from None
            feeds = random_feeds(protos[0], shapes, seed)
            calls = [_runner(s, feeds) for s in sessions]
            for c in calls:
                try:
                    c()
                except Exception as exc:
                    raise ModelError(f"onnxruntime failed to run the model with inputs {_show_shapes(shapes)}: "
                                     f"{str(exc).splitlines()[0]}") from None
            log.info("timing %s at %d thread(s), shapes %s", " vs ".join(labels), t, _show_shapes(shapes))
            times = time_interleaved(calls, runs=runs, warmup=warmup, timer=timer)
            setting = Setting(threads=t, batch=b, shapes=shapes,
                              timings=[ModelTiming(lbl, Stats.from_seconds(ts)) for lbl, ts in zip(labels, times)])
            if len(times) == 2:
                ratios = np.asarray(times[0]) / np.maximum(np.asarray(times[1]), 1e-12)
                setting.speedup = float(np.median(ratios))
                setting.speedup_p10 = float(np.percentile(ratios, 10))
                setting.speedup_p90 = float(np.percentile(ratios, 90))
            if profile:
                setting.profiles = [profile_model(s, feeds, threads=t, runs=profile_runs, label=lbl)
                                    for s, lbl in zip(sources, labels)]
            report.settings.append(setting)
    return report


def _runner(session, feeds: Mapping[str, np.ndarray]) -> Callable[[], Any]:
    names = [o.name for o in session.get_outputs()]
    fd = dict(feeds)
    return lambda: session.run(names, fd)


def _show_shapes(shapes: Mapping[str, Sequence[int]]) -> str:
    return ", ".join(f"{k}[{'x'.join(str(d) for d in v)}]" for k, v in shapes.items())


# --------------------------------------------------------------------------- text


def render_report(report: BenchReport, *, top: int = 8) -> str:
    """The report as fixed-width text: one block per setting, optional per-node tables."""
    m = report.machine
    lines = [
        f"onnxruntime {m['onnxruntime']} ({m['provider']}), {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['os']}",
        f"{report.runs} timed runs per model after {report.warmup} warm-up"
        + (", interleaved (A B, B A, ...)" if len(report.labels) > 1 else ""),
    ]
    width = max(len("model"), *(len(x) for x in report.labels))
    for s in report.settings:
        lines.append("")
        lines.append(f"threads {s.threads}, batch {s.batch if s.batch is not None else '-'}: {_show_shapes(s.shapes)}")
        lines.append(f"  {'model'.ljust(width)}  {'p50 ms':>9}  {'p90 ms':>9}  {'mean ms':>9}")
        for t in s.timings:
            st = t.stats
            lines.append(f"  {t.label.ljust(width)}  {st.p50_ms:9.3f}  {st.p90_ms:9.3f}  {st.mean_ms:9.3f}")
        if s.speedup is not None:
            a, b = report.labels
            verdict = "faster" if s.speedup >= 1.0 else "slower"
            lines.append(f"  speed-up of {b} over {a}: x{s.speedup:.2f} ({verdict}; median of {report.runs} paired runs, "
                         f"p10-p90 x{s.speedup_p10:.2f}-x{s.speedup_p90:.2f})")
        if s.profiles:
            lines.extend(_render_profiles(s.profiles, top))
    return "\n".join(lines)


def _render_profiles(profiles: list[Profile], top: int) -> list[str]:
    out = ["", f"  where the time goes (onnxruntime profiler, mean us per run over {profiles[0].runs} runs):"]
    labels = [p.label for p in profiles]
    w = max(12, *(len(x) for x in labels))
    ops = sorted({o for p in profiles for o in p.op_types}, key=lambda o: -max(p.op_types.get(o, 0.0) for p in profiles))
    out.append(f"    {'op type':<28}" + "".join(f"  {x[:w]:>{w}}" for x in labels))
    for o in ops[:top]:
        out.append(f"    {o:<28}" + "".join(f"  {p.op_types.get(o, 0.0):>{w}.1f}" for p in profiles))
    out.append(f"    {'total':<28}" + "".join(f"  {p.total_us:>{w}.1f}" for p in profiles))
    keys = sorted({k for p in profiles for k in p.layers}, key=lambda k: -max(p.layers.get(k, 0.0) for p in profiles))
    out.append("")
    out.append(f"    {'layer (node, factor and quantized nodes summed)':<48}" + "".join(f"  {x[:w]:>{w}}" for x in labels))
    for k in keys[:top]:
        name = k if len(k) <= 48 else "..." + k[-45:]
        out.append(f"    {name:<48}" + "".join(f"  {p.layers.get(k, 0.0):>{w}.1f}" for p in profiles))
    return out
