"""Verify: compare the rewritten model with the original in onnxruntime (``verify=``).

The comparison itself is :func:`onnx_lowrank.verify.verify_models`; this stage runs it on the
pipeline's model before anything is handed over or written.  A failed gate does not raise
here: the caller gets the whole result with the report (``compress`` raises
:class:`~onnx_lowrank.errors.VerificationFailed` carrying both unless ``keep_failed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onnx_lowrank.pipeline import Context, StageResult, Step
from onnx_lowrank.verify import VerifyReport, verify_models

from .load import Loaded

__all__ = ["Verify", "Verified"]


@dataclass
class Verified(StageResult):
    section = "verification"
    report: VerifyReport

    def to_dict(self) -> dict[str, Any]:
        return self.report.to_dict()


class Verify(Step):
    name = "verify"

    def applies(self, ctx: Context) -> bool:
        return ctx.request.verify is not None

    def run(self, ctx: Context) -> Verified:
        loaded = ctx.need(Loaded)
        # the caller's ModelProto was copied by the load stage, so it still is the original
        report = verify_models(ctx.request.source, ctx.model, ctx.request.verify, base_dir=loaded.data.base_dir,
                               compressed_data=ctx.data)
        return Verified(report)
