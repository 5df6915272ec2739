"""The project's errors.  Each says what went wrong and who fixes it how.

The CLI turns them into one line on stderr and an exit code: :class:`UsageError` exits 2 (the
command line must change), every other :class:`LowRankError` exits 1.
"""

from __future__ import annotations

import contextlib
import contextvars
import signal
from pathlib import Path
from typing import Any, Iterator, Sequence

__all__ = ["LowRankError", "UsageError", "ModelError", "CalibrationError", "OutputError", "VerificationFailed", "Interrupted",
           "option", "option_value", "option_style", "flag_names", "recipe_keys"]

# How messages name an option: by its API keyword, unless the command line asked for flags.
_STYLE: contextvars.ContextVar[str] = contextvars.ContextVar("onnx_lowrank_option_names", default="keyword")
# Flags that are not simply ``--`` + the keyword with dashes.
_FLAGS = {"attention_aware": "--no-attention-aware", "output": "-o"}


def option(name: str) -> str:
    """How messages name option ``name``: ``--max-drop`` under the command line, ``max_drop`` in
    Python and in a recipe."""
    if _STYLE.get() == "flag":
        return _FLAGS.get(name, "--" + name.replace("_", "-"))
    return name


def option_value(name: str, value: Any) -> str:
    """An example setting: ``--energy 0.93`` under the command line, ``energy=0.93`` in Python,
    ``energy = 0.93`` in a recipe (TOML)."""
    style = _STYLE.get()
    if style == "flag":
        if isinstance(value, bool):
            return option(name)
        return f"{option(name)} {','.join(map(str, value)) if isinstance(value, tuple) else value}"
    if style == "key":
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (tuple, list)):
            text = "[" + ", ".join(map(str, value)) + "]"
        else:
            text = f'"{value}"' if isinstance(value, str) else str(value)
        return f"{name} = {text}"
    return f"{name}={value!r}" if isinstance(value, str) else f"{name}={value}"


def option_style() -> str:
    """``flag`` (command line), ``key`` (a recipe) or ``keyword`` (Python)."""
    return _STYLE.get()


@contextlib.contextmanager
def _named(style: str) -> Iterator[None]:
    token = _STYLE.set(style)
    try:
        yield
    finally:
        _STYLE.reset(token)


def flag_names() -> contextlib.AbstractContextManager[None]:
    """Within the block, messages name options by their command-line flags."""
    return _named("flag")


def recipe_keys() -> contextlib.AbstractContextManager[None]:
    """Within the block, messages name options as a recipe's keys (``max_drop = 0.01``)."""
    return _named("key")


class LowRankError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1


class UsageError(LowRankError):
    """A flag, config value or path given by the user is wrong; the message names the fix."""

    exit_code = 2


class ModelError(LowRankError):
    """The model cannot be read, or cannot be processed as it is."""


class CalibrationError(LowRankError):
    """Calibration data does not match the model (names, dtypes, ranks, labels)."""

    exit_code = 2


class OutputError(LowRankError):
    """An output could not be written (a full disk, permissions changed during the run); nothing
    was written."""


class VerificationFailed(LowRankError):
    """The compressed model drifted from the original by more than the allowed budget.

    Attributes:
        report: The :class:`~onnx_lowrank.verify.VerifyReport` with the measured numbers.
        result: The :class:`~onnx_lowrank.api.CompressResult` that was refused, when raised by ``compress``.
    """

    def __init__(self, message: str, *, report: Any = None, result: Any = None):
        super().__init__(message)
        self.report = report
        self.result = result


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived.  Raised (rather than dying on the spot) so that temporary files
    are removed on the way out.

    Attributes:
        signum: The signal.
        written: Files that were committed before the signal took effect (the outputs are then
            complete); empty when nothing was written.
    """

    def __init__(self, signum: int = signal.SIGINT, written: Sequence[Path] = ()):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.written = list(written)
