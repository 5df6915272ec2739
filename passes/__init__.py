"""The stages of the pass, one module each, in the order they run (:data:`PIPELINE`).

Data flows one way::

    load -> fold -> discover -> blocks -> calibrate -> statistics -> width -> spectra -> decide | adaptive -> latency
         -> refine -> rewrite -> quantize -> adaptive-check -> latency-model -> report -> verify

Each stage reads the request and what earlier stages returned, and returns a typed result
(:mod:`onnx_lowrank.pipeline`); stages that do not apply to a request are skipped.  The pass
recipes (TOML) are in ``recipes/`` beside these modules.
"""

from __future__ import annotations

from .adaptive import Adapt, CheckAdaptive
from .calibrate import Calibrate
from .decide import Decide
from .discover import Discover
from .fold import Fold
from .latency import TimeLayers, TimeModel
from .load import Load
from .quantize import Quantize
from .refit import Refine
from .report import Report
from .rewrite import Rewrite
from .spectra import TakeSpectra
from .statistics import CaptureStatistics
from .width import FindBlocks, Narrow
from .verify import Verify

__all__ = ["PIPELINE"]

#: The stages of ``compress()``, in order.
PIPELINE = (
    Load(), Fold(), Discover(), FindBlocks(), Calibrate(), CaptureStatistics(), Narrow(), TakeSpectra(), Decide(), Adapt(), TimeLayers(),
    Refine(),
    Rewrite(), Quantize(), CheckAdaptive(), TimeModel(), Report(), Verify(),
)
