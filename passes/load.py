"""Load: read the model the caller named, or copy the one they passed, and check every tensor.

A path is read without its external data (:func:`onnx_lowrank.io.load_model`: every reference is
confined to the model's folder and checked against its file before anything is read).  An
in-memory ``ModelProto`` is copied, so the caller's object is never touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_lowrank import io
from onnx_lowrank.errors import UsageError
from onnx_lowrank.pipeline import Context, StageResult, Step

__all__ = ["Load", "Loaded", "count_params"]


@dataclass
class Loaded(StageResult):
    """The working copy of the model.

    Attributes:
        model: The copy every later stage starts from.
        data: Where its external data lives.
        path: The input file (never overwritten), when a path was given.
        external: Whether the input kept tensors in external data files.
        size: Bytes of the input on disk, its data files included (``None`` in memory).
        params: Parameters of every initializer and Constant node.
        files: The input's external data files (never overwritten).
    """

    model: onnx.ModelProto
    data: io.DataFiles
    path: Path | None
    external: bool
    size: int | None
    params: int
    files: tuple[Path, ...] = ()


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every initializer and Constant value, in every graph."""
    total = 0
    for g in io.iter_graphs(model.graph):
        tensors = list(g.initializer) + [a.t for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        total += sum(int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1 for t in tensors)
    return total


class Load(Step):
    name = "load"
    changes_model = True

    def run(self, ctx: Context) -> Loaded:
        source: Any = ctx.request.source
        if isinstance(source, onnx.ModelProto):
            io.check_tensors(source)
            copy = onnx.ModelProto()
            copy.CopyFrom(source)
            base = ctx.request.base_dir
            data = io.DataFiles(Path(base) if base is not None else None)
            return Loaded(copy, data, None, io.uses_external_data(copy), None, count_params(copy))
        if isinstance(source, (str, os.PathLike)):
            loaded = io.load_model(source)
            return Loaded(loaded.model, loaded.data, loaded.path, io.uses_external_data(loaded.model),
                          io.model_size_on_disk(loaded.path, loaded.model), count_params(loaded.model),
                          tuple(loaded.data.files(loaded.model)))
        raise UsageError(f"got a {type(source).__name__} as model; expected a path or an onnx.ModelProto.")
