"""Deprecated: the math moved to :mod:`onnx_lowrank.linalg`; this name stays for one release."""

from __future__ import annotations

from .linalg import *  # noqa: F401,F403
from .linalg import __all__  # noqa: F401
from .linalg.svd import _svd  # noqa: F401
