"""The one way this package opens onnxruntime: CPU sessions, pinned threads, confined data.

A model given as a path is loaded by onnxruntime from its file (which resolves and confines its
external data itself).  An in-memory model without external data is handed over as bytes.  An
in-memory model with external data is handed over as bytes too, with the folder its data lives
in; tensors the pass wrote to its private spill file (:class:`~onnx_lowrank.io.Spill`) are put
inline into a copy first, since onnxruntime resolves one folder per model.  Nothing is ever
written beside the user's files.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx

from .. import io
from ..errors import LowRankError, ModelError
from .threads import session_threads

__all__ = ["session", "first_line"]

log = logging.getLogger(__name__)

_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def first_line(exc: BaseException) -> str:
    """``"Type: first line of the message"``: how onnxruntime's long errors are quoted."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _options(threads: int | None, folder: str | None = None, profile_prefix: str | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not threads and session_threads() is not None:
        # the pass's own session, inside its thread budget: no idle spinning against numpy
        threads = session_threads()
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 4  # (a failed run raises with the same message: no second, coloured line)
    if folder is not None:
        opts.add_session_config_entry(_FOLDER_KEY, folder)
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


def _without_spill(model: onnx.ModelProto, data: io.DataFiles) -> onnx.ModelProto:
    """``model``, or a copy with the spilled tensors inline (their bytes read from the spill)."""
    spill = data.spill
    if spill is None or not any(io.external_ref(t).location == spill.location
                                for t in io.iter_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in io.iter_tensors(copy):
        if t.data_location == onnx.TensorProto.EXTERNAL and io.external_ref(t).location == spill.location:
            t.CopyFrom(onnx.numpy_helper.from_array(data.read(t), t.name))
    return copy


def session(model: str | os.PathLike | onnx.ModelProto, *, threads: int | None = None, data: io.DataFiles | None = None,
            profile_prefix: str | None = None) -> Any:
    """An onnxruntime CPU session.

    Args:
        model: A path, or a ``ModelProto``.
        threads: ``intra_op_num_threads`` (with one inter-op thread); ``None``: the pass's thread
            budget when one is set (:func:`~onnx_lowrank.runtime.threads.limit`), else onnxruntime's choice.
        data: Where an in-memory model's external data resolves.
        profile_prefix: Turn on onnxruntime's profiler, writing traces with this prefix.

    Raises:
        ModelError: onnxruntime cannot load the model.
        UsageError: an in-memory model keeps data outside and no folder was given.
    """
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    label = "the model" if isinstance(model, onnx.ModelProto) else str(model)
    tmp = None
    try:
        if not isinstance(model, onnx.ModelProto):
            return ort.InferenceSession(str(model), _options(threads, profile_prefix=profile_prefix), providers=providers)
        data = data or io.DataFiles()
        model = _without_spill(model, data)
        if not io.uses_external_data(model):
            return ort.InferenceSession(model.SerializeToString(), _options(threads, profile_prefix=profile_prefix),
                                        providers=providers)
        data.files(model)  # every reference confined to the model's folder, or refused
        folder = data.base_dir.resolve()
        try:
            return ort.InferenceSession(model.SerializeToString(), _options(threads, str(folder), profile_prefix),
                                        providers=providers)
        except Exception:
            log.debug("onnxruntime could not resolve external data from bytes; using a temporary copy")
        tmp = tempfile.mkdtemp(prefix="onnx-lowrank-session-")
        path = Path(tmp) / "model.onnx"
        io.save_model(model, path, data=data)
        return ort.InferenceSession(str(path), _options(threads, profile_prefix=profile_prefix), providers=providers)
    except LowRankError:
        raise
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load {label}: {first_line(exc)}") from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # the session holds its own copy of the weights by now
