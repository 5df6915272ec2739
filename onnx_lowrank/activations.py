"""Deprecated: activation statistics moved to :mod:`onnx_lowrank.passes.statistics` and
:mod:`onnx_lowrank.passes.refit`; this name stays for one release."""

from __future__ import annotations

from .passes.refit import RefitStats, capture_refit_stats, refit_factors, refit_levels  # noqa: F401
from .passes.statistics import Capture, _score_operands, capture_grams, layer_side  # noqa: F401
from .runtime import Feeds, overridable  # noqa: F401

__all__ = ["layer_side", "Capture", "capture_grams", "overridable", "RefitStats", "capture_refit_stats", "refit_factors",
           "refit_levels", "Feeds"]
