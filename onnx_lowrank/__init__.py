"""onnx-lowrank: make ONNX models smaller and faster with low-rank factors of their weights.

Each MatMul/Gemm whose weight ``W`` (m x n) is a constant becomes two chained products with
factors ``A`` (m x r) and ``B`` (r x n) from the truncated SVD of ``W``, the rank ``r`` chosen per
layer from its singular-value energy.  Start with :func:`compress`.

The public names load on first use, so that ``import onnx_lowrank`` (and the command line's
start) stays quick and does not pull in onnx and onnxruntime before they are needed.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "compress": "api",
    "CompressResult": "api",
    "CompressConfig": "config",
    "VerifyConfig": "verify",
    "VerifyReport": "verify",
    "verify_models": "verify",
    "LayerDecision": "report",
    "Totals": "report",
    "LowRankError": "errors",
    "UsageError": "errors",
    "ModelError": "errors",
    "CalibrationError": "errors",
    "OutputError": "errors",
    "VerificationFailed": "errors",
    "Interrupted": "errors",
}

__all__ = [*_EXPORTS, "__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from .api import CompressResult, compress
    from .config import CompressConfig
    from .errors import CalibrationError, Interrupted, LowRankError, ModelError, OutputError, UsageError, VerificationFailed
    from .report import LayerDecision, Totals
    from .verify import VerifyConfig, VerifyReport, verify_models


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        # submodules (onnx_lowrank.latency, ...) load on attribute access too
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
