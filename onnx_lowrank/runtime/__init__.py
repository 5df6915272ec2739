"""Everything that runs a model: the one session factory, the one capture loop, input specs."""

from __future__ import annotations

from .run import Feeds, Progress, capture, expose, main_constants, overridable, run_all
from .session import first_line, session
from .threads import available_cores, limit

__all__ = ["session", "first_line", "capture", "expose", "overridable", "main_constants", "run_all", "Feeds", "Progress", "available_cores", "limit"]
