"""What the integrations share: importing an optional tool, and handing factors over in memory."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

from onnx_lowrank import io
from onnx_lowrank.errors import UsageError

if TYPE_CHECKING:
    from onnx_lowrank.api import CompressResult

__all__ = ["require", "inline_spilled"]


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module``, or say which extra installs it.

    Args:
        module: The module to import (``onnx_graphsurgeon``).
        extra: The extra of this package that installs it (``gs``).
        what: What needs it, for the message (``compress() of a gs.Graph``).

    Raises:
        UsageError: the package is not installed.  A package that is installed but fails to
            import (one of its own dependencies is missing) raises its own ImportError.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != module.split(".")[0]:
            raise
        raise UsageError(f"{what} needs {module.split('.')[0]}, which is not installed; "
                         f"pip install \"onnx-lowrank[{extra}]\".") from None


def inline_spilled(result: "CompressResult") -> None:
    """Move the factors of ``result.model`` out of the pass's spill file into the model itself.

    The factors of a model with external data go to a private spill file while the pass runs
    (:class:`onnx_lowrank.io.Spill`), which is deleted with the result.  A graph handed on to
    another tool must stay readable without the result, so its factors become inline tensors
    (they are smaller than the weights they replace).  Weights left alone keep their references
    to the input's folder, as they had them in the input.
    """
    spill = result.data.spill
    if spill is None:
        return
    for tensor in io.iter_tensors(result.model):
        if tensor.data_location != TensorProto.EXTERNAL or io.external_ref(tensor).location != spill.location:
            continue
        raw = np.ascontiguousarray(result.data.read(tensor)).tobytes()
        del tensor.external_data[:]
        tensor.ClearField("data_location")
        tensor.raw_data = raw
    result.data.spill = None
    spill.close()
