"""Deprecated: moved to :mod:`onnx_lowrank.passes.adaptive`; this name stays for one release."""

from __future__ import annotations

import sys

from .passes import adaptive as _moved

sys.modules[__name__] = _moved
