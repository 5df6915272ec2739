"""Deprecated: moved to :mod:`onnx_lowrank.passes.latency`; this name stays for one release."""

from __future__ import annotations

import sys

from .passes import latency as _moved

sys.modules[__name__] = _moved
