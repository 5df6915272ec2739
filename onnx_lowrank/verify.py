"""Compare a compressed model with its original in onnxruntime.

Metrics, per output, original (``y``) against compressed (``z``), over all samples:

* ``max_abs_error``  ``max |y - z|``
* ``rel_l2_error``   ``||y - z||_2 / ||y||_2`` over the whole output
* ``cosine_mean`` / ``cosine_min``  cosine similarity of each sample's flattened output
* ``top1_agreement`` fraction of samples whose arg-max agrees, when the output looks like class
  scores (2-D ``[samples, classes]`` with at least 2 classes, floating point)
* with labels: ``accuracy`` and ``macro_f1`` of both models, and their drop (original minus
  compressed, in fractions, so 0.01 is one point).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx

__all__ = ["OutputMetrics", "VerifyReport", "make_session", "run_batches", "compare", "accuracy", "macro_f1"]


@dataclass
class OutputMetrics:
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["accuracy_drop"] = self.accuracy_drop
        d["f1_drop"] = self.f1_drop
        return d


@dataclass
class VerifyReport:
    samples: int
    outputs: list[OutputMetrics] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "outputs": [o.to_dict() for o in self.outputs]}


def make_session(model: str | os.PathLike | onnx.ModelProto, *, threads: int | None = None):
    """An onnxruntime CPU session; ``threads`` pins ``intra_op_num_threads``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run_batches(session, feeds: Iterable[Mapping[str, np.ndarray]], output_names: Sequence[str] | None = None) -> list[np.ndarray]:
    """Run every feed and concatenate each output along the first axis."""
    names = list(output_names) if output_names else [o.name for o in session.get_outputs()]
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for feed in feeds:
        outs = session.run(names, dict(feed))
        for i, o in enumerate(outs):
            parts[i].append(np.asarray(o))
    return [np.concatenate(p, axis=0) if p and p[0].ndim > 0 else np.stack(p) for p in parts]


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


def compare(name: str, y: np.ndarray, z: np.ndarray, labels: np.ndarray | None = None) -> OutputMetrics:
    """Metrics for one output; ``y`` from the original, ``z`` from the compressed model."""
    y64 = y.astype(np.float64).reshape(len(y), -1) if y.ndim else y.astype(np.float64).reshape(1, -1)
    z64 = z.astype(np.float64).reshape(y64.shape)
    diff = y64 - z64
    norm = np.linalg.norm(y64)
    ny = np.linalg.norm(y64, axis=1)
    nz = np.linalg.norm(z64, axis=1)
    dots = np.sum(y64 * z64, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((ny == 0) & (nz == 0), 1.0, dots / (ny * nz))
    cos = np.nan_to_num(cos, nan=0.0)
    m = OutputMetrics(
        name=name,
        max_abs_error=float(np.max(np.abs(diff))) if diff.size else 0.0,
        rel_l2_error=float(np.linalg.norm(diff) / norm) if norm > 0 else float(np.linalg.norm(diff)),
        cosine_mean=float(np.mean(cos)) if cos.size else 1.0,
        cosine_min=float(np.min(cos)) if cos.size else 1.0,
    )
    if _looks_like_scores(y):
        py, pz = y.argmax(axis=1), z.argmax(axis=1)
        m.top1_agreement = float(np.mean(py == pz))
        if labels is not None and len(labels) == len(y):
            lab = np.asarray(labels).reshape(-1)
            m.accuracy_before, m.accuracy_after = accuracy(py, lab), accuracy(pz, lab)
            m.f1_before, m.f1_after = macro_f1(py, lab), macro_f1(pz, lab)
    return m
