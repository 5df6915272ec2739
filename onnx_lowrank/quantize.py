"""Deprecated: moved to :mod:`onnx_lowrank.passes.quantize`; this name stays for one release."""

from __future__ import annotations

import sys

from .passes import quantize as _moved

sys.modules[__name__] = _moved
