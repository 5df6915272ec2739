"""onnx-lowrank: make ONNX models smaller and faster with low-rank factors of their weights.

Each MatMul/Gemm whose weight ``W`` (m x n) is a constant becomes two chained products with
factors ``A`` (m x r) and ``B`` (r x n) from the truncated SVD of ``W``, the rank ``r`` chosen per
layer from its singular-value energy.  Start with :func:`compress`.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

from .api import CompressResult, compress  # noqa: E402
from .config import CompressConfig  # noqa: E402
from .errors import CalibrationError, LowRankError, ModelError, UsageError, VerificationFailed  # noqa: E402
from .report import LayerDecision, Totals  # noqa: E402
from .verify import VerifyConfig, VerifyReport, verify_models  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "compress",
    "CompressConfig",
    "CompressResult",
    "VerifyConfig",
    "VerifyReport",
    "verify_models",
    "LayerDecision",
    "Totals",
    "LowRankError",
    "UsageError",
    "ModelError",
    "CalibrationError",
    "VerificationFailed",
    "__version__",
]
