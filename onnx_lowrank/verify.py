"""Compare a compressed model with its original in onnxruntime, and gate on the difference.

Metrics, per output, original (``y``) against compressed (``z``), over all samples:

* ``max_abs_error``  ``max |y - z|``
* ``rel_l2_error``   ``||y - z||_2 / ||y||_2`` over the whole output
* ``cosine_mean`` / ``cosine_min``  cosine similarity of each sample's flattened output
* ``top1_agreement`` fraction of samples whose arg-max agrees, when the output looks like class
  scores (2-D ``[samples, classes]`` with at least 2 classes, floating point); for an integer
  or boolean output (class ids, masks), the fraction of samples whose values all match
* with labels: ``accuracy`` and ``macro_f1`` of both models, and their drop (original minus
  compressed, in fractions, so 0.01 is one point).

The gate (``max_drop``) compares one number per judged output against the budget:

=============  =============================  ===============================
metric         before -> after                drop
=============  =============================  ===============================
``accuracy``   accuracy of each model         ``accuracy_before - accuracy_after``
``f1``         macro-F1 of each model         ``f1_before - f1_after``
``top1``       1 -> top-1 agreement           ``1 - top1_agreement``
``cosine``     1 -> mean cosine similarity    ``1 - cosine_mean``
``rel_l2``     0 -> relative L2 error         ``rel_l2_error``
``max_abs``    0 -> max abs error             ``max_abs_error`` (in the output's units)
=============  =============================  ===============================

Without ``metric`` each output is judged by ``accuracy`` when there are labels and it holds
class scores, else ``top1`` when it holds class scores and its name says so (``logits``,
``scores``, ``probabilities``, ``class...``, ``pred...``) or when it is an integer or boolean
output (on ids a cosine or an L2 error means nothing: one wrong id is wrong), else ``rel_l2``.  The relative L2
error sees every kind of change on every output shape: a cosine is blind to a change of scale,
and with one value per sample each sample's cosine is just the sign agreement (so a regression
head 60 % off would pass a cosine gate).  Pass ``metric="cosine"`` where only the direction
matters, as for sentence embeddings.  Every output is judged unless ``gate_output`` names one;
the check passes when every judged drop is at most ``max_drop``, and the worst drop is the one
reported.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from . import io
from .config import ERROR_METRICS, METRICS, check_max_drop
from .runtime import first_line as _first_line
from .runtime import run_all, session
from .calibration import (CalibrationData, feed_samples, input_type_mismatch, load_calibration, model_inputs, parse_input_ranges,
                          parse_input_shapes)
from .errors import CalibrationError, ModelError, UsageError, VerificationFailed, option, option_value
from .options import check, opt

__all__ = [
    "VerifyConfig",
    "OutputMetrics",
    "Judgement",
    "VerifyReport",
    "METRICS",
    "verify_models",
    "render_verification",
    "require_finite",
    "make_session",
    "run_batches",
    "compare",
    "accuracy",
    "macro_f1",
]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class VerifyConfig:
    """How to check a compressed model; each field is the CLI flag of the same name.

    None of these change the model produced, so they live apart from
    :class:`~onnx_lowrank.config.CompressConfig`.

    Attributes:
        calib: ``--calib``: an ``.npz`` path or a directory of them; in Python also a
            ``CalibrationDataReader``, an iterable of feed dicts, a dict of arrays or an array.
            ``None`` (and no ``calib_script``) compares on random inputs.
        calib_script: ``--calib-script FILE.py:FUNC``: ``FUNC()`` returns an iterable of feed dicts.
        calib_batch: ``--calib-batch``: samples per run when cutting an ``.npz`` or arrays.
        labels: ``--labels``: class ids, a ``.npy`` path or an array (else a ``labels`` key in the ``.npz``).
        samples: ``--samples``: random samples to synthesize when there is no data.
        input_shape: ``--input-shape``: shapes for random inputs, ``"name:1x128,..."`` or ``{name: (1, 128)}``.
        input_range: ``--input-range``: value ranges for random inputs, ``"name:0,30522"`` or ``{name: (0, 30522)}``.
        max_drop: ``--max-drop``: the largest drop of ``metric`` allowed; ``None`` measures without a gate.
        metric: ``--metric``: ``accuracy``, ``f1`` (need labels), ``top1`` or ``cosine``; ``None`` chooses per output.
        gate_output: ``--gate-output``: the one output the gate judges; ``None`` judges all, the worst counts.
        keep_failed: ``--keep-failed``: hand over (and let the CLI write) a model that failed the gate.
        threads: ``--threads``: onnxruntime intra-op threads; ``None`` lets onnxruntime choose.
    """

    calib: Any = opt(None, "any", "calibration data: an .npz (keys = input names, first axis = samples) or a directory of "
                     ".npz files, one feed each", metavar="PATH", exclusive="source")
    calib_script: str | None = opt(None, "text", "a function returning an iterable of feed dicts", metavar="FILE.py:FUNC",
                                   exclusive="source")
    calib_batch: int = opt(32, "positive_int", "samples per onnxruntime run when cutting an .npz (default 32)", metavar="N")
    labels: Any = opt(None, "any", "class ids, one per sample (else a 'labels' array in the .npz)", metavar="NPY")
    samples: int = opt(32, "positive_int", "without --calib: random samples to compare on (default 32)", metavar="N")
    input_shape: Any = opt(None, "shapes", "shape of a random input, e.g. input_ids:1x128 (repeatable, or comma-separated)",
                           metavar="NAME:DIMS")
    input_range: Any = opt(None, "ranges", "values of a random input drawn from [LOW, HIGH), e.g. input_ids:0,30522",
                           metavar="NAME:LOW,HIGH")
    max_drop: float | None = opt(None, "non_negative_float", "fail when the metric drops by more than X (a fraction: 0.01 is "
                                 "one point; for --metric max_abs, in the output's units); with --adaptive also the goal of "
                                 "the rank search", metavar="X", example="0.01 (one point)")
    metric: str | None = opt(None, "choice", "what --max-drop is checked against (default: accuracy with labels, else top1 for "
                             "outputs named like class scores, else rel_l2, the relative L2 error; use cosine for embeddings)",
                             choices=METRICS)
    gate_output: str | None = opt(None, "text", "judge only this model output (default: every output, the worst counts)",
                                  metavar="NAME")
    keep_failed: bool = opt(False, "switch", "write the model even when the check fails (still exit 1)")
    threads: int | None = opt(None, "positive_int", "onnxruntime intra-op threads (default: onnxruntime's choice)", metavar="N",
                              example=4)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name not in ("max_drop", "input_shape", "input_range"):
                check(f.name, f.metadata["opt"], getattr(self, f.name))
        if self.max_drop is not None:
            check_max_drop(self.max_drop, self.metric)
        if self.calib is not None and self.calib_script is not None:
            raise UsageError(f"got both {option('calib')} and {option('calib_script')}; pass only one source of calibration data.")
        calib_rules(self.calib, self.calib_script, self.calib_batch)
        if self.samples != 32 and (self.calib is not None or self.calib_script is not None):
            source = option("calib") if self.calib is not None else option("calib_script")
            raise UsageError(f"{option('samples')} sets how many random samples to compare on without data; {source} gives "
                             f"the samples; drop {option('samples')}.")
        # Normalized once here so that a bad spec fails before any model is loaded.
        object.__setattr__(self, "input_shape", parse_input_shapes(self.input_shape) or None)
        object.__setattr__(self, "input_range", parse_input_ranges(self.input_range) or None)

    def replace(self, **changes: Any) -> "VerifyConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as strings, in-memory data by its type name."""
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (str, os.PathLike)):
                v = str(v)
            elif f.name in ("calib", "labels") and v is not None:
                v = f"<{type(v).__name__}>"
            elif isinstance(v, Mapping):
                v = {k: list(x) for k, x in v.items()}
            d[f.name] = v
        return d


def calib_rules(calib: Any, calib_script: Any, calib_batch: int) -> None:
    """``calib_batch`` cuts an ``.npz`` or arrays (or random samples); a script's feeds, and a
    folder's (one ``.npz`` each), come as they are."""
    if isinstance(calib_batch, bool) or calib_batch == 32:
        return
    if calib_script is not None and calib is None:
        raise UsageError(f"{option('calib_batch')} cuts an .npz or arrays into runs; {option('calib_script')} gives its feeds "
                         f"as they are (batch them in the script); drop {option('calib_batch')}.")
    if isinstance(calib, (str, os.PathLike)) and Path(calib).is_dir():
        raise UsageError(f"{option('calib_batch')} cuts an .npz or arrays into runs; the folder {calib} gives one feed per .npz "
                         f"file as it is; drop {option('calib_batch')}, or pass one .npz to cut.")


@dataclass
class OutputMetrics:
    """Original against compressed, for one output (see the module docstring)."""

    name: str
    max_abs_error: float
    rel_l2_error: float
    cosine_mean: float
    cosine_min: float
    top1_agreement: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    f1_before: float | None = None
    f1_after: float | None = None
    nonfinite: int = 0  # samples whose compressed output holds NaN or Inf
    integer: bool = False  # an integer or boolean output: judged by agreement (top1) only

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy_before is None or self.accuracy_after is None:
            return None
        return self.accuracy_before - self.accuracy_after

    @property
    def f1_drop(self) -> float | None:
        if self.f1_before is None or self.f1_after is None:
            return None
        return self.f1_before - self.f1_after

    def measure(self, metric: str) -> tuple[float, float, float] | None:
        """``(before, after, drop)`` of ``metric``, or ``None`` when this output does not have it."""
        if metric == "accuracy" and self.accuracy_drop is not None:
            return self.accuracy_before, self.accuracy_after, self.accuracy_drop  # type: ignore[return-value]
        if metric == "f1" and self.f1_drop is not None:
            return self.f1_before, self.f1_after, self.f1_drop  # type: ignore[return-value]
        if metric == "top1" and self.top1_agreement is not None:
            return 1.0, self.top1_agreement, 1.0 - self.top1_agreement
        if self.integer:
            return None  # (ids: agreement only)
        if metric == "cosine":
            return 1.0, self.cosine_mean, 1.0 - self.cosine_mean
        if metric == "rel_l2":
            return 0.0, self.rel_l2_error, self.rel_l2_error
        if metric == "max_abs":
            return 0.0, self.max_abs_error, self.max_abs_error
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["accuracy_drop"] = self.accuracy_drop
        d["f1_drop"] = self.f1_drop
        return d


@dataclass(frozen=True)
class Judgement:
    """The gate's verdict on one output.

    Attributes:
        why: Why this metric judged this output (``--metric``, or the default's reason).
        cosine_min: The worst sample's cosine, beside a cosine judgement's mean.
    """

    output: str
    metric: str
    before: float
    after: float
    drop: float
    passed: bool | None
    why: str = ""
    cosine_min: float | None = None
    nonfinite: int = 0  # samples whose compressed output holds NaN or Inf: the output fails, gate or not

    @property
    def broken(self) -> bool:
        return self.nonfinite > 0 or not np.isfinite(self.drop)

    def describe(self, where: str = "") -> str:
        """``cosine drop 0.0288{where} (1.0000 -> 0.9712, min 0.9011)``, or ``rel_l2 0.0412{where}``."""
        if self.metric in ERROR_METRICS:
            return f"{self.metric} {self.after:.4g}{where}"
        worst = f", min {self.cosine_min:.4f}" if self.cosine_min is not None else ""
        return f"{self.metric} drop {self.drop:.4f}{where} ({self.before:.4f} -> {self.after:.4f}{worst})"


@dataclass
class VerifyReport:
    """What the check measured, and the gate's verdict.

    Attributes:
        samples: Samples compared.
        outputs: Metrics for each tensor output.
        judged: The gate's verdict on each judged output (judged even without a gate, so the
            numbers it would use are reported).
        not_judged: Outputs left out of the gate, with the reason.
        max_drop: The budget, or ``None`` when no gate was asked for.
        source: Where the data came from.
        synthetic: True when the data was random.
        labels: True when labels were available.
        threads: onnxruntime intra-op threads (``None``: its default).
        seconds: Wall time of the check (sessions, runs, metrics).
        warnings: Things the user should hear about.
        config: The :class:`VerifyConfig` used, as JSON-ready data.
    """

    samples: int
    outputs: list[OutputMetrics] = field(default_factory=list)
    judged: list[Judgement] = field(default_factory=list)
    not_judged: dict[str, str] = field(default_factory=dict)
    max_drop: float | None = None
    source: str = ""
    synthetic: bool = False
    labels: bool = False
    threads: int | None = None
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def worst(self) -> Judgement | None:
        """The judged output with the largest drop."""
        return max(self.judged, key=lambda j: (j.broken, j.drop if np.isfinite(j.drop) else 0.0), default=None)

    @property
    def passed(self) -> bool:
        """False when a gate was set and some judged output dropped by more than it allows, and
        when the compressed model gave NaN or Inf (gate or not)."""
        return all(j.passed is not False for j in self.judged)

    def summary(self) -> str:
        """One line: the worst drop against the budget, and on what data."""
        w = self.worst
        if w is None:
            return f"nothing to judge on {_samples(self.samples)} from {self.source}"
        if w.broken:
            verdict = "(the compressed model's output holds NaN or Inf)"
        else:
            verdict = "no gate" if self.max_drop is None else f"{'<=' if w.passed else '>'} {option('max_drop')} {self.max_drop:g}"
        return f"{w.describe(f' on output {w.output!r}')} {verdict}; {_samples(self.samples)} from {self.source}"

    def check(self, *, result: Any = None) -> None:
        """Raise :class:`VerificationFailed` carrying this report (and ``result``) when the gate failed."""
        if not self.passed:
            raise VerificationFailed(f"check failed: {self.summary()}", report=self, result=result)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "samples": self.samples,
            "source": self.source,
            "synthetic": self.synthetic,
            "labels": self.labels,
            "max_drop": self.max_drop,
            "worst": asdict(self.worst) if self.worst else None,
            "judged": [asdict(j) for j in self.judged],
            "not_judged": dict(self.not_judged),
            "outputs": [o.to_dict() for o in self.outputs],
            "threads": self.threads,
            "seconds": round(self.seconds, 4),
            "warnings": list(self.warnings),
            "config": dict(self.config),
        }


def make_session(model: str | os.PathLike | onnx.ModelProto, *, threads: int | None = None,
                 base_dir: str | os.PathLike | None = None):
    """Deprecated alias of :func:`onnx_lowrank.runtime.session` (``base_dir``: the model's data folder)."""
    return session(model, threads=threads, data=io.DataFiles(Path(base_dir) if base_dir is not None else None))


#: Deprecated alias of :func:`onnx_lowrank.runtime.run_all`.
run_batches = run_all


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(pred == labels)) if len(labels) else float("nan")


def macro_f1(pred: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    classes = np.union1d(np.unique(labels), np.unique(pred))
    scores = []
    for c in classes:
        tp = np.sum((pred == c) & (labels == c))
        fp = np.sum((pred == c) & (labels != c))
        fn = np.sum((pred != c) & (labels == c))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else float("nan")


def _looks_like_scores(y: np.ndarray) -> bool:
    return y.ndim == 2 and y.shape[1] >= 2 and np.issubdtype(y.dtype, np.floating)


def labels_fit(labels: np.ndarray, classes: int) -> bool:
    """Whether every label is a class index of scores over ``classes`` classes."""
    return labels.size == 0 or (int(labels.min()) >= 0 and int(labels.max()) < classes)


class _Accumulator:
    """The metrics of one output, accumulated batch by batch so no output is held whole."""

    def __init__(self, name: str):
        self.name = name
        self.max_abs = 0.0
        self.sq_diff = 0.0
        self.sq_ref = 0.0
        self.cosines: list[np.ndarray] = []
        self.nonfinite = 0
        self.scores = True
        self.classes = 0
        self.integer = False
        self.same: list[np.ndarray] = []
        self.pred_y: list[np.ndarray] = []
        self.pred_z: list[np.ndarray] = []

    def add(self, y: np.ndarray, z: np.ndarray) -> None:
        y64 = y.astype(np.float64).reshape(len(y), -1) if y.ndim else y.astype(np.float64).reshape(1, -1)
        z64 = z.astype(np.float64).reshape(y64.shape)
        self.nonfinite += int(np.sum(~np.all(np.isfinite(z64), axis=1)))
        self.integer = y.dtype.kind in "iub"
        if self.integer:
            self.same.append(np.all(y64 == z64, axis=1))
        diff = y64 - z64
        if diff.size:
            self.max_abs = float(np.max([self.max_abs, np.max(np.abs(diff))]))  # (NaN stays NaN; max() would drop it)
        self.sq_diff += float(np.sum(diff * diff))
        self.sq_ref += float(np.sum(y64 * y64))
        ny = np.linalg.norm(y64, axis=1)
        nz = np.linalg.norm(z64, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = np.where((ny == 0) & (nz == 0), 1.0, np.sum(y64 * z64, axis=1) / (ny * nz))
        self.cosines.append(np.nan_to_num(cos, nan=0.0))
        self.scores = self.scores and _looks_like_scores(y)
        if self.scores:
            self.classes = int(y.shape[1])
            self.pred_y.append(y.argmax(axis=1))
            self.pred_z.append(z.argmax(axis=1))

    def result(self, labels: np.ndarray | None = None) -> OutputMetrics:
        cos = np.concatenate(self.cosines) if self.cosines else np.ones(0)
        norm = np.sqrt(self.sq_ref)
        m = OutputMetrics(
            name=self.name,
            max_abs_error=self.max_abs,
            rel_l2_error=float(np.sqrt(self.sq_diff) / norm) if norm > 0 else float(np.sqrt(self.sq_diff)),
            cosine_mean=float(np.mean(cos)) if cos.size else 1.0,
            cosine_min=float(np.min(cos)) if cos.size else 1.0,
            nonfinite=self.nonfinite,
            integer=self.integer,
        )
        if self.integer and self.same:
            m.top1_agreement = float(np.mean(np.concatenate(self.same)))
        if self.scores and self.pred_y:
            py, pz = np.concatenate(self.pred_y), np.concatenate(self.pred_z)
            m.top1_agreement = float(np.mean(py == pz))
            lab = np.asarray(labels).reshape(-1) if labels is not None else None
            if lab is not None and len(lab) == len(py) and labels_fit(lab, self.classes):
                m.accuracy_before, m.accuracy_after = accuracy(py, lab), accuracy(pz, lab)
                m.f1_before, m.f1_after = macro_f1(py, lab), macro_f1(pz, lab)
        return m


def compare(name: str, y: np.ndarray, z: np.ndarray, labels: np.ndarray | None = None) -> OutputMetrics:
    """Metrics for one output; ``y`` from the original, ``z`` from the compressed model."""
    acc = _Accumulator(name)
    acc.add(y, z)
    return acc.result(labels)


# Drops within this of the budget pass: accuracy differences are sums of 1/n steps.
_ROUNDING = 1e-9


# Without labels a 2-D float output may be class scores or an embedding; arg-max agreement means
# nothing for an embedding, so top-1 is the default only when the output's name says "scores".
_CLASS_SCORE_NAME = re.compile(r"logit|score|prob|class|pred", re.IGNORECASE)


def default_metric(m: OutputMetrics, have_labels: bool) -> tuple[str, str]:
    """``(metric, why)`` that judges output ``m`` when no metric is given (module docstring)."""
    if m.top1_agreement is not None and have_labels:
        return "accuracy", "default for class scores with labels"
    if m.top1_agreement is not None and _CLASS_SCORE_NAME.search(m.name):
        return "top1", "default for an output named like class scores"
    if m.integer:
        return "top1", "default for an integer output: the share of samples whose values all match"
    return "rel_l2", f"default: sees any change of any output shape (pass {option('metric')} cosine for embeddings)"


def judge(metrics: Sequence[OutputMetrics], *, metric: str | None, max_drop: float | None, have_labels: bool,
          gate_output: str | None = None) -> tuple[list[Judgement], dict[str, str]]:
    """Judge each output by ``metric`` (or its default); ``(judged, not judged with reasons)``.

    Raises:
        UsageError: ``metric`` applies to none of the outputs, or not to ``gate_output``.
    """
    if metric in ("accuracy", "f1") and not have_labels:
        raise UsageError(f"{option('metric')} {metric} needs labels: pass {option_value('labels', 'labels.npy')} or put a "
                         "'labels' array in the .npz.")
    judged: list[Judgement] = []
    skipped: dict[str, str] = {}
    for m in metrics:
        if gate_output is not None and m.name != gate_output:
            skipped[m.name] = f"{option('gate_output')} is '{gate_output}'"
            continue
        used, why = (metric, f"{option('metric')} {metric}") if metric else default_metric(m, have_labels)
        measured = m.measure(used)
        if measured is None:
            if m.integer:
                reason = f"an integer output is judged by agreement ({option('metric')} top1), not {used}"
                if gate_output is not None:
                    raise UsageError(f"output '{m.name}' is an integer output: {reason}; use {option('metric')} top1.")
            else:
                reason = f"{option('metric')} {used} needs class scores [samples, classes]"
                if gate_output is not None:
                    raise UsageError(f"output '{m.name}' does not hold class scores [samples, classes], so {reason}; "
                                     f"use {option('metric')} rel_l2 or cosine.")
            skipped[m.name] = reason
            continue
        before, after, drop = measured
        # NaN or Inf from the compressed model (the original's are refused before) fails with or without a gate
        broken = m.nonfinite > 0 or not np.isfinite(drop)
        passed = False if broken else None if max_drop is None else drop <= max_drop + _ROUNDING
        judged.append(Judgement(m.name, used, before, after, drop, passed, why, m.cosine_min if used == "cosine" else None,
                                m.nonfinite))
    if not judged:
        if all(m.integer for m in metrics):
            raise UsageError(f"{option('metric')} {metric} applies to none of the outputs ({', '.join(m.name for m in metrics)}): "
                             f"they are integer outputs, judged by agreement; use {option('metric')} top1.")
        raise UsageError(f"{option('metric')} {metric} applies to none of the outputs ({', '.join(m.name for m in metrics)}): "
                         f"none holds class scores [samples, classes]; use {option('metric')} rel_l2 or cosine.")
    return judged, skipped


def _header(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        return io.load_model(model).model
    raise UsageError(f"got a {type(model).__name__} as model; expected a path or an onnx.ModelProto.")


def _check_same_interface(ref: onnx.ModelProto, new: onnx.ModelProto) -> None:
    ref_in, new_in = [s.name for s in model_inputs(ref)], [s.name for s in model_inputs(new)]
    if sorted(ref_in) != sorted(new_in):
        raise ModelError(f"the models take different inputs: {', '.join(ref_in)} (original) vs {', '.join(new_in)} (compressed); "
                         "they can only be compared on the same feeds.")
    mismatch = input_type_mismatch(ref, new)
    if mismatch is not None and all(mismatch[1:]):
        name, a, b = mismatch
        kinds = [np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)) for t in (a, b)]
        raise ModelError(f"input '{name}' is {kinds[0]} in the original and {kinds[1]} in the compressed model; "
                         "they can only be compared on the same feeds (compare a model with its own compressed copy).")
    new_out = {o.name for o in new.graph.output}
    missing = [o.name for o in ref.graph.output if o.name not in new_out]
    if missing:
        raise ModelError(f"output(s) {', '.join(repr(m) for m in missing)} of the original are missing from the compressed model.")


def _run(session, names: list[str], feed: dict[str, np.ndarray], which: str, index: int, data: CalibrationData) -> list[np.ndarray]:
    try:
        return session.run(names, feed)
    except Exception as exc:
        if which == "compressed":
            raise ModelError(f"onnxruntime failed to run the compressed model on feed {index} of {data.description} "
                             f"although the original ran: {_first_line(exc)}") from exc
        hint = ""
        if data.synthetic and any(s.dtype is not None and s.dtype.kind in "iu" for s in data.specs):
            hint = (f"; random integer inputs may be out of range for it (token ids past the vocabulary?): pass or narrow "
                    f"{option_value('input_range', 'NAME:LOW,HIGH')}")
        raise CalibrationError(f"onnxruntime failed to run the original model on feed {index} of {data.description}: "
                               f"{_first_line(exc)}{hint}") from exc


def verify_models(
    original: str | os.PathLike | onnx.ModelProto,
    compressed: str | os.PathLike | onnx.ModelProto,
    config: VerifyConfig | None = None,
    *,
    base_dir: str | os.PathLike | None = None,
    compressed_data: io.DataFiles | None = None,
    **options: Any,
) -> VerifyReport:
    """Run both models on the same calibration data and measure how far the second drifts.

    Each model gets one onnxruntime session; every feed runs through both before the next is
    read, so a source that can be read only once (an iterator, a reader) is enough.

    Args:
        original: The reference model (path or ``ModelProto``).
        compressed: The model to check; it must take the same inputs and have the same outputs.
        config: A :class:`VerifyConfig`; its fields can also be given as keywords
            (``calib="data.npz", max_drop=0.01``), which override it.
        base_dir: Where external data of in-memory models lives.
        compressed_data: Where the compressed model's external data lives, when not ``base_dir``.

    Returns:
        A :class:`VerifyReport`; call :meth:`VerifyReport.check` to raise when the gate failed.

    Raises:
        UsageError: bad options (an unknown ``gate_output``, ``metric="accuracy"`` without labels).
        CalibrationError: the data does not fit the models.
        ModelError: a model cannot be loaded or run, or the two do not match.
    """
    if config is not None and not isinstance(config, VerifyConfig):
        raise UsageError(f"config= takes a VerifyConfig, got a {type(config).__name__}; pass the options as keywords "
                         "(verify_models(a, b, calib='data.npz')) or VerifyConfig(**options).")
    known = {f.name for f in dataclasses.fields(VerifyConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"verify_models() got an unknown option {unknown[0]}=; its options are {', '.join(sorted(known))}.")
    cfg = (config or VerifyConfig()).replace(**options) if options else (config or VerifyConfig())
    start = time.perf_counter()
    ref_proto, new_proto = _header(original), _header(compressed)
    _check_same_interface(ref_proto, new_proto)
    out_names = [o.name for o in ref_proto.graph.output]
    if cfg.gate_output is not None and cfg.gate_output not in out_names:
        raise UsageError(f"{option('gate_output')} '{cfg.gate_output}' is not an output of the model; its outputs are {', '.join(out_names)}.")
    data = load_calibration(ref_proto, cfg.calib, calib_script=cfg.calib_script, calib_batch=cfg.calib_batch, labels=cfg.labels,
                            samples=cfg.samples, input_shape=cfg.input_shape, input_range=cfg.input_range)
    if cfg.metric in ("accuracy", "f1") and data.labels is None:
        raise UsageError(f"{option('metric')} {cfg.metric} needs labels: pass {option_value('labels', 'labels.npy')} or put a 'labels' array in the .npz.")

    ref = session(original, threads=cfg.threads, data=io.DataFiles(Path(base_dir) if base_dir is not None else None))
    new = session(compressed, threads=cfg.threads,
                  data=compressed_data or io.DataFiles(Path(base_dir) if base_dir is not None else None))
    names = [o.name for o in ref.get_outputs() if o.type.startswith("tensor")]
    not_tensors = {o.name: "not a tensor" for o in ref.get_outputs() if o.name not in names}
    accs = [_Accumulator(n) for n in names]
    samples = 0
    for index, feed in enumerate(data, start=1):
        ys = _run(ref, names, feed, "original", index, data)
        zs = _run(new, names, feed, "compressed", index, data)
        for acc, y, z in zip(accs, ys, zs):
            y, z = np.asarray(y), np.asarray(z)
            require_finite(acc.name, y, f"on feed {index} of {data.description}", "nothing can be compared")
            if y.shape != z.shape:
                raise ModelError(f"output '{acc.name}' has shape {list(y.shape)} from the original but {list(z.shape)} from the compressed model.")
            acc.add(y, z)
        samples += feed_samples(feed, data.flags)
    metrics = [a.result(data.labels) for a in accs]
    scored = [a for a in accs if a.scores and a.pred_y]
    if data.labels is not None and scored and not any(labels_fit(np.asarray(data.labels).reshape(-1), a.classes) for a in scored):
        lab = np.asarray(data.labels).reshape(-1)
        raise CalibrationError(f"the labels run from {int(lab.min())} to {int(lab.max())}, outside the class indices of every "
                               f"class-score output ({', '.join(f'{a.name!r}: 0 to {a.classes - 1}' for a in scored)}); "
                               f"check the {option('labels')} file (ids counted from 1?).")
    judged, skipped = judge(metrics, metric=cfg.metric, max_drop=cfg.max_drop, have_labels=data.labels is not None,
                            gate_output=cfg.gate_output)
    report = VerifyReport(
        samples=samples, outputs=metrics, judged=judged, not_judged={**skipped, **not_tensors},
        max_drop=None if cfg.max_drop is None else float(cfg.max_drop), source=data.description, synthetic=data.synthetic,
        labels=data.labels is not None, threads=cfg.threads, seconds=time.perf_counter() - start, warnings=list(data.warnings),
        config=cfg.to_dict(),
    )
    log.info("verified on %d samples from %s: %s", samples, data.description, report.summary())
    return report


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render_verification(report: VerifyReport) -> str:
    """The verification section of the text report: one row per output, then the gate's verdict."""
    lines = [f"verification: {_samples(report.samples)} from {report.source}"
             + (", with labels" if report.labels else "") + (" (fidelity to the original only, not task accuracy)" if report.synthetic else "")]
    headers = ["output", "max|diff|", "rel.L2", "cos.mean", "cos.min", "top-1", "accuracy", "macro-F1"]
    rows = []
    for m in report.outputs:
        acc = f"{m.accuracy_before:.4f} -> {m.accuracy_after:.4f}" if m.accuracy_drop is not None else "-"
        f1 = f"{m.f1_before:.4f} -> {m.f1_after:.4f}" if m.f1_drop is not None else "-"
        if m.integer:  # (ids: only the agreement means something)
            rows.append([m.name, f"{m.max_abs_error:.4g}", "-", "-", "-", _f(m.top1_agreement), acc, f1])
            continue
        rows.append([m.name, f"{m.max_abs_error:.4g}", f"{m.rel_l2_error:.4g}", _f(m.cosine_mean, 5), _f(m.cosine_min, 5),
                     _f(m.top1_agreement), acc, f1])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for j in report.judged:
        if j.broken:
            verdict = ("FAILED: the compressed model's output holds NaN or Inf where the original's is finite"
                       + (f" ({_samples(j.nonfinite)})" if j.nonfinite else ""))
        elif report.max_drop is None:
            verdict = f"measured (no gate: pass {option('max_drop')} to enforce one)"
        else:
            verdict = f"{'<=' if j.passed else '>'} {report.max_drop:g}: {'passed' if j.passed else 'FAILED'}"
        lines.append(f"gate: {j.output}: {j.describe()} {verdict} [{j.why}]")
    for name, reason in report.not_judged.items():
        lines.append(f"gate: {name}: not judged ({reason})")
    return "\n".join(lines)


def _samples(n: int) -> str:
    return f"{n} sample" + ("" if n == 1 else "s")


def require_finite(name: str, y: Any, where: str, consequence: str) -> None:
    """Raise :class:`CalibrationError` when the original model's float output ``name`` holds NaN
    or Inf (``where``: on which data; ``consequence``: what cannot be done then)."""
    y = np.asarray(y)
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise CalibrationError(f"the original model's output '{name}' holds NaN or Inf {where}, so {consequence}; check the "
                               f"calibration values (NaN inputs, scaling) or pass other {option('calib')} data.")
