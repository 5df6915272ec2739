"""The project's errors.  Each says what went wrong and who fixes it how.

The CLI turns them into one line on stderr and an exit code: :class:`UsageError` exits 2 (the
command line must change), every other :class:`LowRankError` exits 1.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LowRankError", "UsageError", "ModelError", "CalibrationError", "VerificationFailed"]


class LowRankError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1


class UsageError(LowRankError):
    """A flag, config value or path given by the user is wrong; the message names the fix."""

    exit_code = 2


class ModelError(LowRankError):
    """The model cannot be read, or cannot be processed as it is."""


class CalibrationError(LowRankError):
    """Calibration data does not match the model (names, dtypes, ranks, labels)."""

    exit_code = 2


class VerificationFailed(LowRankError):
    """The compressed model drifted from the original by more than the allowed budget.

    Attributes:
        report: The :class:`~onnx_lowrank.verify.VerifyReport` with the measured numbers.
        result: The :class:`~onnx_lowrank.api.CompressResult` that was refused, when raised by ``compress``.
    """

    def __init__(self, message: str, *, report: Any = None, result: Any = None):
        super().__init__(message)
        self.report = report
        self.result = result
