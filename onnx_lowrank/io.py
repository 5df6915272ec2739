"""Loading and saving models, with external data and atomic writes.

Loading never pulls external tensor data into memory: tensors stored in external files keep their
references, and :func:`read_tensor` reads only the weights the pass factorizes.  Saving writes
the whole model next to the output path:

* the model and its data go to temporary files in the target directory first and are renamed
  into place, so a failure never leaves a partial output and never touches the input;
* when the input used external data, or the output would pass protobuf's 2 GiB limit, every
  tensor of 1 KiB or more is written to ``<output>.data`` beside the output; tensors that lived
  in the input's data files are streamed across in chunks, never held in memory.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import ModelError, UsageError

__all__ = [
    "LoadedModel",
    "load_model",
    "read_tensor",
    "iter_graphs",
    "uses_external_data",
    "save_model",
    "model_size_on_disk",
    "check_output_path",
]

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
# Tensors at least this large go to the data file when saving with external data.
EXTERNAL_MIN_BYTES = 1024
_ALIGN = 4096
_CHUNK = 64 * 2**20


@dataclass
class LoadedModel:
    """A model read from disk.  ``base_dir`` resolves its external data references."""

    model: onnx.ModelProto
    path: Path | None
    base_dir: Path


def check_input_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file; pass the path of an existing .onnx model.")
    if p.is_dir():
        raise UsageError(f"{p}: is a directory; pass the path of an .onnx file inside it.")
    return p


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Read an ONNX model without loading its external data.

    Raises:
        UsageError: the path does not exist or is a directory.
        ModelError: the file is empty, truncated, not ONNX, or its external data is missing.
    """
    p = check_input_path(path)
    size = p.stat().st_size
    if size == 0:
        raise ModelError(f"{p}: file is empty; re-export the model or pass the right file.")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, onnx may raise others
        raise ModelError(
            f"{p}: not a readable ONNX model ({type(exc).__name__}); the file is truncated or of another format."
        ) from None
    if model.ir_version <= 0 or len(model.opset_import) == 0 or not model.HasField("graph"):
        raise ModelError(
            f"{p}: not an ONNX model (no IR version, opset or graph); the file is truncated or of another format."
        )
    base_dir = p.resolve().parent
    for tensor in _iter_all_tensors(model):
        if _is_external(tensor):
            info = _external_info(tensor)
            data_path = base_dir / info["location"]
            if not data_path.is_file():
                raise ModelError(
                    f"{p}: external data file '{info['location']}' of tensor '{tensor.name}' is missing; "
                    f"keep it next to the model."
                )
            need = int(info.get("offset", 0)) + int(info.get("length", 0))
            if need > data_path.stat().st_size:
                raise ModelError(
                    f"{p}: external data file '{info['location']}' is shorter than tensor '{tensor.name}' needs "
                    f"({need} bytes); the data file is truncated."
                )
    return LoadedModel(model=model, path=p, base_dir=base_dir)


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def _iter_all_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    for g in iter_graphs(model.graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t


def _is_external(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def _external_info(tensor: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(_is_external(t) for t in _iter_all_tensors(model))


def _np_dtype(data_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))


def read_tensor(tensor: TensorProto, base_dir: str | os.PathLike | None) -> np.ndarray:
    """The values of ``tensor`` as an array; external data is read from ``base_dir``."""
    if not _is_external(tensor):
        return onnx.numpy_helper.to_array(tensor)
    info = _external_info(tensor)
    path = Path(base_dir or ".") / info["location"]
    offset = int(info.get("offset", 0))
    dtype = _np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    with open(path, "rb") as f:
        f.seek(offset)
        buf = f.read(count * dtype.itemsize)
    if len(buf) != count * dtype.itemsize:
        raise ModelError(f"external data of tensor '{tensor.name}' in '{path}' is truncated.")
    return np.frombuffer(buf, dtype=dtype).reshape(tuple(tensor.dims)).copy()


def tensor_nbytes(tensor: TensorProto) -> int:
    if _is_external(tensor):
        return int(_external_info(tensor).get("length", 0))
    if tensor.HasField("raw_data") or tensor.raw_data:
        return len(tensor.raw_data)
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    try:
        return count * _np_dtype(tensor.data_type).itemsize
    except Exception:
        return 0


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike | None = None, *, flag: str = "-o",
                      keep: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Validate where an output goes before any work is done.

    Args:
        output: The path to write.
        input_path: The input model, which is never overwritten.
        flag: The flag that names ``output``, for the error message.
        keep: Other files this command reads or writes (a second model, ``-o`` and its data file),
            which ``output`` must not replace either.

    Raises:
        UsageError: the directory is missing, the path is a directory, or it is one of the files above.
    """
    out = Path(output)
    if out.is_dir():
        example = "report.json" if flag == "--report" or flag == "--json" else "model.lowrank.onnx"
        raise UsageError(f"{flag} {out}: is a directory; pass a file path such as {out / example}.")
    if out.exists() and not out.is_file():
        raise UsageError(f"{flag} {out}: is not a regular file (a device, pipe or socket); pass a file path to write to.")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {out}: directory '{parent}' does not exist; create it first or choose another {flag}.")
    if input_path is not None and _same_file(out, Path(input_path)):
        raise UsageError(f"{flag} {out}: is the input model; choose a different {flag} (the input is never overwritten).")
    if input_path is not None and out.exists():
        for data in external_files(input_path):
            if _same_file(out, data):
                raise UsageError(f"{flag} {out}: is the input's external data file; choose a different {flag} "
                                 "(the input is never overwritten).")
    for other in keep:
        if other is not None and _same_file(out, Path(other)):
            raise UsageError(f"{flag} {out}: is also {other}, which this command reads or writes; choose a different {flag}.")
    return out


def external_files(path: str | os.PathLike) -> list[Path]:
    """The external data files the model at ``path`` references (none when it cannot be read)."""
    p = Path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception:  # an unreadable input is reported by the loader, not here
        return []
    return sorted({p.parent / _external_info(t)["location"] for t in _iter_all_tensors(model) if _is_external(t)})


def model_size_on_disk(path: str | os.PathLike, model: onnx.ModelProto | None = None) -> int:
    """Bytes of the model file plus every external data file it references.

    Pass ``model`` when it is already loaded (without external data) to avoid parsing it again.
    """
    p = Path(path)
    total = p.stat().st_size
    if model is None:
        try:
            model = onnx.load(str(p), load_external_data=False)
        except Exception:
            return total
    seen: set[str] = set()
    for t in _iter_all_tensors(model):
        if _is_external(t):
            loc = _external_info(t)["location"]
            if loc not in seen:
                seen.add(loc)
                f = p.parent / loc
                if f.is_file():
                    total += f.stat().st_size
    return total


def _inline_bytes(model: onnx.ModelProto) -> int:
    return sum(tensor_nbytes(t) for t in _iter_all_tensors(model) if not _is_external(t))


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    base_dir: str | os.PathLike | None = None,
    external: bool | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` atomically, with its data beside it.

    Args:
        model: The model.  It is left exactly as it was (external references included).
        path: Output ``.onnx`` path; its directory must exist.
        base_dir: Where ``model``'s existing external references point (the input's folder).
        external: Force external data on or off; by default it is on when the model already
            references external data or the inline tensors exceed 2 GiB.

    Returns:
        The files written: the model, then the data file when there is one.
    """
    out = Path(path)
    out_dir = out.resolve().parent
    has_external = uses_external_data(model)
    if external is None:
        external = has_external or _inline_bytes(model) + 16 * 2**20 > PROTOBUF_LIMIT
    if has_external and not external:
        raise ModelError("model references external data; it can only be saved with external data.")

    data_name = out.name + ".data"
    if has_external:
        target = (out_dir / data_name).resolve()
        for t in _iter_all_tensors(model):
            if not _is_external(t):
                continue
            source = (Path(base_dir or ".") / _external_info(t)["location"]).resolve()
            if source == out.resolve():
                raise UsageError(f"{out}: is the input's external data file; choose another -o (the input is never overwritten).")
            if external and source == target:
                raise UsageError(
                    f"{out}: its data file '{data_name}' would overwrite the input's external data; choose another -o."
                )
    fd, tmp_model = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out_dir)
    os.close(fd)
    tmp_data = None
    restore: list[tuple[TensorProto, TensorProto]] = []
    try:
        if external:
            fd, tmp_data = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=out_dir)
            with os.fdopen(fd, "wb") as data_file:
                _write_external(model, data_file, data_name, Path(base_dir or "."), restore)
        try:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString())
        finally:
            for tensor, original in restore:
                tensor.CopyFrom(original)
        written = [out]
        new_file_mode(tmp_model)
        if tmp_data is not None:
            new_file_mode(tmp_data)
            os.replace(tmp_data, out_dir / data_name)
            tmp_data = None
            written.append(out_dir / data_name)
        os.replace(tmp_model, out)
        tmp_model = None
        return written
    finally:
        for leftover in (tmp_model, tmp_data):
            if leftover is not None and os.path.exists(leftover):
                os.unlink(leftover)


def _write_external(
    model: onnx.ModelProto,
    data_file,
    data_name: str,
    base_dir: Path,
    restore: list[tuple[TensorProto, TensorProto]],
) -> None:
    """Move tensor data into ``data_file``, recording each tensor's original form in ``restore``.

    The original of an inline tensor keeps its bytes only in ``restore`` (the model's copy is
    cleared), so nothing is held twice while the model is serialized.
    """
    offset = 0
    sources: dict[str, object] = {}
    initializers = {id(t) for t in model_initializers(model)}
    try:
        # Constant-node tensors too: those the input kept outside must be copied, or the output
        # would point at a file beside the input (inline ones stay inline)
        for tensor in _iter_all_tensors(model):
            if id(tensor) not in initializers and not _is_external(tensor):
                continue
            if _is_external(tensor):
                info = _external_info(tensor)
                src_path = base_dir / info["location"]
                length = int(info.get("length", 0)) or tensor_nbytes(tensor)
                src_off = int(info.get("offset", 0))
                src = sources.get(str(src_path))
                if src is None:
                    src = sources[str(src_path)] = open(src_path, "rb")
                offset = _pad(data_file, offset)
                src.seek(src_off)
                left = length
                while left > 0:
                    chunk = src.read(min(_CHUNK, left))
                    if not chunk:
                        raise ModelError(f"external data of tensor '{tensor.name}' in '{src_path}' is truncated.")
                    data_file.write(chunk)
                    left -= len(chunk)
                original = TensorProto()
                original.CopyFrom(tensor)
            else:
                if tensor_nbytes(tensor) < EXTERNAL_MIN_BYTES:
                    continue
                if not tensor.raw_data:
                    # typed fields (float_data, ...): normalise to raw bytes first
                    arr = onnx.numpy_helper.to_array(tensor)
                    raw = onnx.numpy_helper.from_array(arr, tensor.name).raw_data
                else:
                    raw = tensor.raw_data
                offset = _pad(data_file, offset)
                data_file.write(raw)
                length = len(raw)
                original = TensorProto()
                original.CopyFrom(tensor)
            restore.append((tensor, original))
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                tensor.ClearField(field)
            del tensor.external_data[:]
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key = key
                entry.value = value
            offset += length
    finally:
        for src in sources.values():
            src.close()


def new_file_mode(path: str | os.PathLike) -> None:
    """Give a temporary file the mode a plain ``open(path, "w")`` would have.

    ``mkstemp`` creates files readable by the owner only; an output renamed into place from one
    would be unreadable to the other users of a deploy pipeline.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def model_initializers(model: onnx.ModelProto) -> Iterator[TensorProto]:
    for g in iter_graphs(model.graph):
        yield from g.initializer


def _pad(f, offset: int) -> int:
    aligned = -(-offset // _ALIGN) * _ALIGN
    if aligned > offset:
        f.write(b"\0" * (aligned - offset))
    return aligned
