"""How many threads the pass's own work may use, and the one place that sets them.

The pass runs numpy (SVDs, Grams) and onnxruntime (calibration runs) in one process, one stage
after the other.  Left alone, both size their thread pools to the machine, and OpenBLAS's
threads busy-wait between calls: on a shared or loaded machine that made SVDs up to 50x slower.
:func:`limit` caps both at the cores the user gives (``cores``; by default the cores this process
may run on): BLAS through threadpoolctl, the pass's onnxruntime sessions through the
:func:`session_threads` they read, with spinning off so that their idle threads do not compete
with the next numpy call.  Sessions that time the model (latency probes, benchmarks) keep the
settings they are given.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

__all__ = ["available_cores", "limit", "limit_blas", "session_threads"]

_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("onnx_lowrank_cores", default=None)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def session_threads() -> int | None:
    """The intra-op threads of the pass's own onnxruntime sessions (``None``: no budget set)."""
    return _BUDGET.get()


@contextlib.contextmanager
def limit(cores: int | None = None) -> Iterator[int]:
    """Within the block, BLAS and the pass's onnxruntime sessions use at most ``cores`` threads.

    Yields:
        The number of cores in force.
    """
    n = int(cores) if cores else available_cores()
    token = _BUDGET.set(n)
    try:
        with limit_blas(n):
            yield n
    finally:
        _BUDGET.reset(token)


@contextlib.contextmanager
def limit_blas(n: int) -> Iterator[None]:
    """Within the block, BLAS uses at most ``n`` threads (the session budget is unchanged)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a core dependency
        yield
        return
    with threadpool_limits(limits=int(n), user_api="blas"):
        yield
