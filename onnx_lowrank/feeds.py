"""Calibration feeds for rank selection: the small adapter between a user's data and the pass.

Accepted: an ``.npz`` path (keys = input names, first axis = samples, an optional ``labels``
key), a list of feed dicts, a callable returning an iterator of feed dicts (called once per
pass), or any other iterable of feed dicts (read once and kept).  Everything downstream only
needs a re-iterable of ``{input name: array}``; a fuller loader (directories, scripts,
``CalibrationDataReader``) can replace :func:`as_feeds` without touching the callers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from .errors import CalibrationError

__all__ = ["as_feeds"]

LABELS_KEY = "labels"


class _Repeat:
    """Re-iterable view of a callable that returns a fresh iterator of feeds."""

    def __init__(self, make: Callable[[], Any]):
        self.make = make

    def __iter__(self) -> Iterator[Mapping[str, np.ndarray]]:
        return iter(self.make())


def as_feeds(calib: Any, input_names: Sequence[str], batch: int = 32) -> tuple[Any, np.ndarray | None]:
    """Calibration data as a re-iterable of feed dicts, and labels when the data has them.

    Args:
        calib: See the module docstring.
        input_names: The inputs the model needs; ``.npz`` keys outside them (and ``labels``)
            are ignored, missing ones are an error.
        batch: Samples per feed when cutting an ``.npz``.

    Raises:
        CalibrationError: the file is missing or lacks an input.
    """
    if isinstance(calib, (str, os.PathLike)):
        path = Path(calib)
        if not path.is_file() or path.suffix != ".npz":
            raise CalibrationError(f"--calib {path}: expected an existing .npz file whose keys are the model's input names.")
        with np.load(path) as data:
            missing = [n for n in input_names if n not in data.files]
            if missing:
                raise CalibrationError(f"--calib {path}: no array for input(s) {', '.join(missing)}; it holds {', '.join(data.files)}.")
            arrays = {n: data[n] for n in input_names}
            labels = data[LABELS_KEY] if LABELS_KEY in data.files else None
        total = len(next(iter(arrays.values())))
        feeds = [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, total, batch)]
        return feeds, labels
    if callable(calib):
        return _Repeat(calib), None
    if isinstance(calib, Mapping):
        raise CalibrationError("calib: got one dict; pass a list of feed dicts (one per onnxruntime run).")
    return list(calib), None
