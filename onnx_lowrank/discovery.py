"""Deprecated: moved to :mod:`onnx_lowrank.passes.discover`; this name stays for one release."""

from __future__ import annotations

import sys

from .passes import discover as _moved

sys.modules[__name__] = _moved
