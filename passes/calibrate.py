"""Calibrate: read the calibration data that data-aware, adaptive and refit stages run on.

The data is checked against the model's inputs before any long work starts
(:func:`onnx_lowrank.calibration.load_calibration`): wrong names, dtypes or shapes fail here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass


from onnx_lowrank.calibration import CalibrationData, load_calibration
from onnx_lowrank.errors import UsageError, option, option_value
from onnx_lowrank.pipeline import Context, StageResult, Step

__all__ = ["Calibrate", "Calibration"]

log = logging.getLogger(__name__)


@dataclass
class Calibration(StageResult):
    """The calibration feeds (re-iterable) and their labels, if any."""

    feeds: CalibrationData

    def sensitivity_feeds(self, samples: int | None) -> CalibrationData:
        """The feeds adaptive mode measures sensitivities on: about ``samples`` spread evenly over
        the set (:meth:`~onnx_lowrank.calibration.CalibrationData.spread`), or all."""
        return self.feeds.spread(samples) if samples is not None else self.feeds


class Calibrate(Step):
    name = "calibrate"

    def applies(self, ctx: Context) -> bool:
        req = ctx.request
        if not ctx.config.needs_calibration:
            if req.calib is not None or req.calib_script is not None:
                log.info("calibration data given but unused by rank selection: it serves %s and %s", option("data_aware"),
                         option("adaptive"))
            return False
        return True

    def run(self, ctx: Context) -> Calibration:
        req, cfg = ctx.request, ctx.config
        if req.calib is None and req.calib_script is None:
            flag = option("data_aware" if cfg.data_aware else "ffn_keep" if cfg.ffn_keep is not None else
                          "adaptive" if cfg.adaptive else "refine")
            raise UsageError(f"{flag} needs calibration data: pass {option_value('calib', 'data.npz')} (keys = the model's "
                             f"input names) or {option_value('calib_script', 'file.py:func')}.")
        return Calibration(load_calibration(ctx.model, req.calib, calib_script=req.calib_script, calib_batch=req.calib_batch,
                                            labels=req.labels))
