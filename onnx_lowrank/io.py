"""Loading and saving models: external data confined to the model's folder, outputs all or nothing.

What this module promises (``docs/safety.md`` says how each promise is tested):

* **Confinement.**  Every external-data location of a model is resolved, after following
  symlinks, inside the model's own folder; an absolute path, a ``..`` that climbs out, or a
  symlink that points out is refused with one line naming the tensor, before a byte is read.
* **Nothing read twice, nothing held twice.**  Loading never pulls external data into memory;
  :meth:`DataFiles.read` reads one tensor when the pass needs it.  Factors made while the pass
  runs on a model with external data go to a private spill file (:class:`Spill`), so the model
  in memory stays small.  Saving streams every external tensor into the output's data file in
  chunks.
* **All or nothing.**  :class:`OutputSet` stages every output file (model, data, report) as a
  hidden temporary beside its target, then commits them with renames while SIGINT and SIGTERM
  wait; an error rolls back what was already renamed, so every exit leaves either the complete
  previous outputs or the complete new ones, and never a temporary file.
* **Generations never mix.**  The data file is named after its content
  (``OUT.onnx.<16 hex digits of its SHA-256>.data``), and the model file is renamed last: after
  a crash or power loss at any point, ``OUT.onnx`` still names the data file it was written
  with.  Data files of the replaced generation are deleted after the commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import re
import signal
import tempfile
import threading
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import Interrupted, ModelError, OutputError, UsageError

__all__ = [
    "LoadedModel",
    "DataFiles",
    "Spill",
    "ExternalRef",
    "OutputSet",
    "load_model",
    "read_tensor",
    "as_data",
    "iter_graphs",
    "body_owners",
    "NameScope",
    "iter_tensors",
    "uses_external_data",
    "external_ref",
    "save_model",
    "stage_model",
    "model_size_on_disk",
    "check_input_path",
    "check_output_path",
    "check_tensors",
    "deferred_signals",
    "terminate_raises",
]

log = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2**31 - 1
# Tensors at least this large go to the data file when saving with external data.
EXTERNAL_MIN_BYTES = 1024
_ALIGN = 4096
_CHUNK = 64 * 2**20
_DIGEST_HEX = 16
# Sub-byte element types are packed: their storage is ceil(count * bits / 8) bytes.
_BITS = {getattr(TensorProto, n): b for n, b in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
         if hasattr(TensorProto, n)}


# --------------------------------------------------------------------------------------------
# Walking a model's tensors
# --------------------------------------------------------------------------------------------

def node_bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs ``node`` holds directly (If branches, Loop and Scan bodies)."""
    out: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def body_owners(graph: onnx.GraphProto) -> list[tuple[onnx.GraphProto, list[tuple[onnx.GraphProto, onnx.NodeProto, str]]]]:
    """Every body graph below ``graph``, with the nodes that hold it, outermost first, each as
    ``(the graph the node is in, the node, the attribute holding the next graph)``."""
    out: list[tuple[onnx.GraphProto, list[tuple[onnx.GraphProto, onnx.NodeProto, str]]]] = []

    def walk(g: onnx.GraphProto, chain: list) -> None:
        for node in g.node:
            for a in node.attribute:
                for body in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                             list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                    out.append((body, chain + [(g, node, a.name)]))
                    walk(body, out[-1][1])

    walk(graph, [])
    return out


class NameScope:
    """Hands out tensor and node names that are unused anywhere in the model."""

    def __init__(self, model: onnx.ModelProto):
        self.used: set[str] = set()
        for g in iter_graphs(model.graph):
            self.used.update(t.name for t in g.initializer)
            self.used.update(v.name for v in g.input)
            self.used.update(v.name for v in g.output)
            self.used.update(v.name for v in g.value_info)
            for n in g.node:
                self.used.update(n.input)
                self.used.update(n.output)
                if n.name:
                    self.used.add(n.name)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name = f"{base}_{k}"
            k += 1
        self.used.add(name)
        return name


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        yield from _node_subgraphs(node)


def _node_subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield from iter_graphs(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            for g in attr.graphs:
                yield from iter_graphs(g)


def _node_tensors(nodes) -> Iterator[tuple[TensorProto, bool]]:
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t, False
            elif attr.type == onnx.AttributeProto.TENSORS:
                for t in attr.tensors:
                    yield t, False
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield attr.sparse_tensor.values, True
                yield attr.sparse_tensor.indices, True


def _tensor_slots(model: onnx.ModelProto) -> Iterator[tuple[TensorProto, bool]]:
    """``(tensor, part of a sparse tensor)`` for every tensor that can hold data."""
    graphs = list(iter_graphs(model.graph))
    for f in model.functions:
        for node in f.node:
            graphs.extend(_node_subgraphs(node))
    for g in graphs:
        for t in g.initializer:
            yield t, False
        for s in g.sparse_initializer:
            yield s.values, True
            yield s.indices, True
        yield from _node_tensors(g.node)
    for f in model.functions:
        yield from _node_tensors(f.node)


def iter_tensors(model: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every tensor that can hold data: initializers (sparse ones too) and attribute tensors of
    every graph, subgraph and model-local function."""
    for t, _ in _tensor_slots(model):
        yield t


def is_external(tensor: TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(is_external(t) for t in iter_tensors(model))


# --------------------------------------------------------------------------------------------
# One tensor's external reference, validated
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExternalRef:
    """Where an external tensor's bytes are: ``length`` bytes at ``offset`` of ``location``."""

    location: str
    offset: int
    length: int


def _element_type(tensor: TensorProto, where: str) -> np.dtype:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, TypeError, ValueError):
        raise ModelError(f"{where}tensor '{tensor.name}' has data_type {tensor.data_type}, which is not an ONNX element type "
                         f"this onnx {onnx.__version__} knows; re-export the model or upgrade onnx.") from None


def _element_count(tensor: TensorProto, where: str) -> int:
    if any(d < 0 for d in tensor.dims):
        raise ModelError(f"{where}tensor '{tensor.name}' has negative dims {list(tensor.dims)}; the file is corrupt.")
    return int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1


def storage_bytes(tensor: TensorProto, where: str = "") -> int:
    """Bytes the tensor's values take in raw form (packed for 4- and 2-bit types)."""
    count = _element_count(tensor, where)
    if tensor.data_type in _BITS:
        return -(-count * _BITS[tensor.data_type] // 8)
    dtype = _element_type(tensor, where)
    if dtype.kind == "O":
        raise ModelError(f"{where}tensor '{tensor.name}' holds strings, which cannot live in external data; re-export the model.")
    return count * dtype.itemsize


def _non_negative(value: str, key: str, tensor: TensorProto, where: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise ModelError(f"{where}tensor '{tensor.name}' has external-data {key} '{value}'; expected a non-negative integer. "
                         "The file is corrupt: re-export the model.")
    return n


def external_ref(tensor: TensorProto, where: str = "") -> ExternalRef:
    """The validated external reference of ``tensor``.

    Args:
        where: A prefix for messages naming the model (``"model.onnx: "``).

    Raises:
        ModelError: no location, a malformed offset or length, or a length that does not fit
            the tensor's type and shape.
    """
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    if not all(isinstance(x, str) for kv in entries.items() for x in kv):
        raise ModelError(f"{where}tensor '{tensor.name}' has an external-data entry that is not valid UTF-8 text "
                         f"({entries!r}); the file is corrupt: re-export the model.")
    if not location:
        raise ModelError(f"{where}tensor '{tensor.name}' is marked as external data but names no data file (no 'location'); "
                         "re-export the model.")
    offset = _non_negative(entries.get("offset", "0"), "offset", tensor, where)
    need = storage_bytes(tensor, where)
    length = _non_negative(entries["length"], "length", tensor, where) if "length" in entries else need
    if length != need:
        raise ModelError(f"{where}tensor '{tensor.name}' declares {length} bytes of external data, but its type and shape "
                         f"{list(tensor.dims)} need {need}; the file is corrupt: re-export the model.")
    return ExternalRef(location, offset, length)


def confine(base_dir: Path, location: str, tensor_name: str, where: str = "") -> Path:
    """The file ``location`` names, which must lie inside ``base_dir`` after following symlinks.

    Raises:
        ModelError: the location is absolute, climbs out of the folder, or is a symlink that
            points out of it.
    """
    why = None
    if "\x00" in location:
        why = "holds a NUL byte"
    elif Path(location).is_absolute() or PureWindowsPath(location).is_absolute() or PureWindowsPath(location).drive:
        why = "is an absolute path"
    if why is None:
        base = base_dir.resolve()
        target = (base / location).resolve()
        try:
            target.relative_to(base)
        except ValueError:
            why = f"resolves to {target}, outside the model's folder {base}"
        else:
            if target == base:
                why = "names the model's folder itself"
    if why is not None:
        raise ModelError(f"{where}tensor '{tensor_name}' keeps its data at '{location}', which {why}; external data must "
                         "lie inside the model's own folder (onnx and onnxruntime refuse it too): move the file there "
                         "and give its location relative to the model.")
    return target


# --------------------------------------------------------------------------------------------
# Where a working model's external data lives
# --------------------------------------------------------------------------------------------

class Spill:
    """A private file for tensors made while the pass runs (the factors of a big model).

    It lives in its own temporary folder, which is removed by :meth:`close`, when the object is
    collected, or at interpreter exit, whichever comes first.
    """

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="onnx-lowrank-"))
        self.location = f"onnx-lowrank-spill-{uuid.uuid4().hex}.bin"
        self.path = self.folder / self.location
        self._file: BinaryIO | None = open(self.path, "wb")
        self._offset = 0
        self._cleanup = weakref.finalize(self, _remove_tree, self.folder, self._file)

    def add(self, name: str, array: np.ndarray, data_type: int) -> TensorProto:
        """Write ``array`` and return a tensor that references it (external, in this spill)."""
        if self._file is None:
            raise ValueError("the spill file is closed")
        raw = np.ascontiguousarray(array).tobytes()
        self._offset = _pad(self._file, self._offset)
        self._file.write(raw)
        self._file.flush()
        tensor = TensorProto(name=name, data_type=data_type, dims=list(array.shape))
        _set_external(tensor, self.location, self._offset, len(raw))
        self._offset += len(raw)
        return tensor

    def close(self) -> None:
        self._file = None
        self._cleanup()


def _remove_tree(folder: Path, handle: BinaryIO | None) -> None:
    if handle is not None:
        handle.close()
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


@dataclass
class DataFiles:
    """Resolves the external data of one working model.

    Attributes:
        base_dir: The input model's folder; ``None`` for a model with no external data.
        label: How messages name the model (its path).
        spill: Where factors made by the pass went, if anywhere.
    """

    base_dir: Path | None = None
    label: str = "the model"
    spill: Spill | None = None

    @property
    def where(self) -> str:
        return f"{self.label}: "

    def path(self, tensor: TensorProto) -> tuple[Path, ExternalRef]:
        """The confined file and reference of an external tensor."""
        ref = external_ref(tensor, self.where)
        if self.spill is not None and ref.location == self.spill.location:
            return self.spill.path, ref
        if self.base_dir is None:
            raise UsageError(f"{self.where}tensor '{tensor.name}' keeps its data in '{ref.location}', but no folder was given "
                             "to find it; pass base_dir= (the folder of the model file).")
        return confine(self.base_dir, ref.location, tensor.name, self.where), ref

    def read(self, tensor: TensorProto) -> np.ndarray:
        """The values of ``tensor``; external data is read from its confined file."""
        if not is_external(tensor):
            try:
                return onnx.numpy_helper.to_array(tensor)
            except Exception as exc:
                raise ModelError(f"{self.where}tensor '{tensor.name}' cannot be read ({type(exc).__name__}: {exc}); "
                                 "the file is corrupt: re-export the model.") from None
        path, ref = self.path(tensor)
        dtype = _element_type(tensor, self.where)
        packed = tensor.data_type in _BITS
        out = np.empty(ref.length, np.uint8) if packed else np.empty(tuple(tensor.dims), dtype)
        try:
            with open(path, "rb") as f:
                f.seek(ref.offset)
                got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))  # straight into the array: no second copy
        except OSError as exc:
            raise ModelError(f"{self.where}cannot read the external data of tensor '{tensor.name}' from {path}: {exc.strerror}.") from None
        if got != ref.length:
            raise ModelError(f"{self.where}external data of tensor '{tensor.name}' in '{path.name}' is truncated "
                             f"({got} of {ref.length} bytes).")
        return onnx.numpy_helper.to_array(_inline_copy(tensor, out.tobytes())) if packed else out

    def files(self, model: onnx.ModelProto) -> list[Path]:
        """The input data files ``model`` references (not the spill), confined."""
        out = set()
        for t in iter_tensors(model):
            if is_external(t):
                p, _ = self.path(t)
                if self.spill is None or p != self.spill.path:
                    out.add(p)
        return sorted(out)


def _inline_copy(tensor: TensorProto, raw: bytes) -> TensorProto:
    t = TensorProto()
    t.CopyFrom(tensor)
    del t.external_data[:]
    t.ClearField("data_location")
    t.raw_data = raw
    return t


def as_data(data: DataFiles | str | os.PathLike | None) -> DataFiles:
    """``data`` itself, or the :class:`DataFiles` of a model in that folder (``None``: no external data)."""
    return data if isinstance(data, DataFiles) else DataFiles(Path(data) if data is not None else None)


def read_tensor(tensor: TensorProto, data: DataFiles | str | os.PathLike | None) -> np.ndarray:
    """The values of ``tensor``; ``data`` is the model's :class:`DataFiles` or its folder."""
    return as_data(data).read(tensor)


def tensor_nbytes(tensor: TensorProto) -> int:
    """Bytes of ``tensor``'s values (0 when its type is unknown)."""
    try:
        if is_external(tensor):
            return external_ref(tensor).length
        # from the type and shape: len(tensor.raw_data) would copy the bytes out of protobuf
        return storage_bytes(tensor)
    except ModelError:
        return 0


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model read from disk.  ``data`` resolves its external data references."""

    model: onnx.ModelProto
    path: Path | None
    data: DataFiles

    @property
    def base_dir(self) -> Path | None:
        return self.data.base_dir


def check_input_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file; pass the path of an existing .onnx model.")
    if p.is_dir():
        raise UsageError(f"{p}: is a directory; pass the path of an .onnx file inside it.")
    return p


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Read an ONNX model without loading its external data, and check every data reference.

    Raises:
        UsageError: the path does not exist or is a directory.
        ModelError: the file is empty, truncated or not ONNX; an external-data reference is
            malformed, points outside the model's folder, or its file is missing or short.
    """
    p = check_input_path(path)
    try:
        size = p.stat().st_size
        if size == 0:
            raise ModelError(f"{p}: file is empty; re-export the model or pass the right file.")
        model = onnx.load(str(p), load_external_data=False)
    except ModelError:
        raise
    except OSError as exc:
        raise ModelError(f"{p}: cannot be read ({exc.strerror}).") from None
    except Exception as exc:  # protobuf raises DecodeError, onnx may raise others
        raise ModelError(
            f"{p}: not a readable ONNX model ({type(exc).__name__}); the file is truncated or of another format."
        ) from None
    if model.ir_version <= 0 or len(model.opset_import) == 0 or not model.HasField("graph"):
        raise ModelError(
            f"{p}: not an ONNX model (no IR version, opset or graph); the file is truncated or of another format."
        )
    data = DataFiles(base_dir=p.resolve().parent, label=str(p))
    check_tensors(model, data.where)
    for tensor in iter_tensors(model):
        if not is_external(tensor):
            continue
        file, ref = data.path(tensor)
        if not file.is_file():
            raise ModelError(f"{p}: external data file '{ref.location}' of tensor '{tensor.name}' is missing"
                             f"{' (or not a regular file)' if file.exists() else ''}; keep it next to the model.")
        if ref.offset + ref.length > file.stat().st_size:
            raise ModelError(f"{p}: external data file '{ref.location}' is shorter than tensor '{tensor.name}' needs "
                             f"({ref.offset + ref.length} bytes); the data file is truncated.")
    return LoadedModel(model=model, path=p, data=data)


def _names_of(graph) -> Iterator[tuple[str, Any]]:
    """``(what, value)`` for every name a graph or function holds (values as protobuf gives them)."""
    for v in (*getattr(graph, "input", ()), *getattr(graph, "output", ()), *getattr(graph, "value_info", ())):
        yield "a value name", getattr(v, "name", v)
    for t in getattr(graph, "initializer", ()):
        yield "an initializer name", t.name
    for node in graph.node:
        yield "a node name", node.name
        yield "an op type", node.op_type
        yield "a domain", node.domain
        for name in (*node.input, *node.output):
            yield f"an input or output of node '{node.name if isinstance(node.name, str) else '?'}'", name


def check_tensors(model: onnx.ModelProto, where: str = "") -> None:
    """Every name is text, every tensor has a known element type, and every external reference
    is well formed.

    Raises:
        ModelError: naming the first one that is not.
    """
    graphs: list[Any] = list(iter_graphs(model.graph)) + list(model.functions)
    for f in model.functions:
        for node in f.node:
            graphs.extend(_node_subgraphs(node))
    for g in graphs:
        for what, value in _names_of(g):
            if not isinstance(value, str):
                raise ModelError(f"{where}{what} is not valid UTF-8 text ({value!r}); the file is corrupt: re-export the model.")
    for tensor in iter_tensors(model):
        if tensor.data_type == TensorProto.UNDEFINED and not tensor.dims and not is_external(tensor):
            continue  # an empty placeholder (e.g. a sparse tensor's missing part)
        _element_type(tensor, where)
        if is_external(tensor):
            external_ref(tensor, where)


def external_files(path: str | os.PathLike) -> list[Path]:
    """The data files the model at ``path`` references inside its folder (none when it cannot be read)."""
    try:
        loaded = load_model(path)
        return loaded.data.files(loaded.model)
    except Exception:  # an unreadable input is reported by the loader, not here
        return []


def model_size_on_disk(path: str | os.PathLike, model: onnx.ModelProto | None = None) -> int:
    """Bytes of the model file plus every external data file it references inside its folder.

    Pass ``model`` when it is already loaded (without external data) to avoid parsing it again.
    """
    p = Path(path)
    total = p.stat().st_size
    if model is None:
        try:
            model = onnx.load(str(p), load_external_data=False)
        except Exception:
            return total
    data = DataFiles(base_dir=p.resolve().parent, label=str(p))
    seen: set[Path] = set()
    for t in iter_tensors(model):
        if is_external(t):
            try:
                f, _ = data.path(t)
            except ModelError:
                continue
            if f not in seen and f.is_file():
                seen.add(f)
                total += f.stat().st_size
    return total


# --------------------------------------------------------------------------------------------
# Output paths
# --------------------------------------------------------------------------------------------

def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(output: str | os.PathLike, input_path: str | os.PathLike | None = None, *, flag: str = "-o",
                      keep: tuple[str | os.PathLike | None, ...] = (), input_files: Iterable[Path] | None = None) -> Path:
    """Validate where an output goes before any work is done.

    Args:
        output: The path to write.
        input_path: The input model, which is never overwritten (nor its data files).
        flag: The flag (or keyword) that names ``output``, for the error message.
        keep: Other files this command reads or writes, which ``output`` must not replace either.
        input_files: The input's external data files, when known (else read from the input).

    Raises:
        UsageError: the directory is missing, the path is a directory, or it is one of the files above.
    """
    out = Path(output)
    if out.is_dir():
        example = "report.json" if flag in ("--report", "--json", "report") else "model.lowrank.onnx"
        raise UsageError(f"{flag} {out}: is a directory; pass a file path such as {out / example}.")
    if out.exists() and not out.is_file():
        raise UsageError(f"{flag} {out}: is not a regular file (a device, pipe or socket); pass a file path to write to.")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {out}: directory '{parent}' does not exist; create it first or choose another {flag}.")
    try:  # the files are staged beside the target: find out now, not after the work, that this fails
        with tempfile.TemporaryFile(dir=parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {out}: cannot write in directory '{parent}' ({exc.strerror or exc}); choose another {flag} "
                         "or make the directory writable.") from None
    if input_path is not None and _same_file(out, Path(input_path)):
        raise UsageError(f"{flag} {out}: is the input model; choose a different {flag} (the input is never overwritten).")
    if input_path is not None and out.exists():
        for data in (external_files(input_path) if input_files is None else input_files):
            if _same_file(out, data):
                raise UsageError(f"{flag} {out}: is the input's external data file; choose a different {flag} "
                                 "(the input is never overwritten).")
    for other in keep:
        if other is not None and _same_file(out, Path(other)):
            raise UsageError(f"{flag} {out}: is also {other}, which this command reads or writes; choose a different {flag}.")
    return out


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------

def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`~onnx_lowrank.errors.Interrupted` (a
    ``KeyboardInterrupt``) instead of killing the process, so cleanup code runs.

    Only where SIGTERM still has its default action, and only in the main thread (where Python
    handles signals); elsewhere a no-op.
    """
    if not _in_main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT and SIGTERM received inside the block take effect when it ends.

    The block runs to its end; a signal that arrived meanwhile is then raised again, so its
    usual handler runs (``KeyboardInterrupt`` for SIGINT).  In a thread other than the main
    one, Python delivers no signals anyway, and this is a no-op.
    """
    if not _in_main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame) -> None:
        received.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            signal.raise_signal(received[0])


# --------------------------------------------------------------------------------------------
# Writing: staged files committed together
# --------------------------------------------------------------------------------------------

def new_file_mode(path: str | os.PathLike) -> None:
    """Give a temporary file the mode a plain ``open(path, "w")`` would have.

    ``mkstemp`` creates files readable by the owner only; an output renamed into place from one
    would be unreadable to the other users of a deploy pipeline.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class OutputSet:
    """Files written together, all or nothing.

    :meth:`stage` writes each file to a hidden temporary beside its target (``.NAME.*.tmp``).
    :meth:`commit` renames them into place in the order staged, while SIGINT and SIGTERM wait
    (:func:`deferred_signals`).  If a rename fails, the targets already replaced get their
    previous content back and new ones are removed.  Leaving the ``with`` block without a commit
    removes every temporary.  After a commit, :meth:`retire` files (an older generation's data)
    are deleted.

    Put the file that the others hang on last: the model after its data file, so that a crash
    between two renames leaves the old model with the old data.
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temporary, target)
        self._retire: list[Path] = []
        self.committed = False

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            self.abort()

    def stage(self, target: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
        """Write ``target``'s content with ``write(file)`` into a temporary beside it."""
        target = Path(target)
        folder = target.resolve().parent
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
            tmp = Path(tmp_name)
            self._staged.append((tmp, target))
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # (the temporaries go when the set is left uncommitted)
            raise OutputError(f"cannot write {target}: {exc.strerror or exc}; nothing was written (check the free space "
                              f"and permissions of '{folder}').") from exc
        new_file_mode(tmp)
        return tmp

    def retarget(self, tmp: Path, target: Path) -> None:
        """Change where a staged file goes (a data file named after its content once written)."""
        self._staged = [(t, target if t == tmp else g) for t, g in self._staged]

    def pending(self, target: Path) -> Path:
        """The temporary currently staged for ``target``."""
        return next(t for t, g in reversed(self._staged) if g == target)

    def unstage(self, tmp: Path) -> None:
        """Drop a staged file (it turned out empty)."""
        with contextlib.suppress(OSError):
            tmp.unlink()
        self._staged = [(t, g) for t, g in self._staged if t != tmp]

    def retire(self, path: Path) -> None:
        """Delete ``path`` after a successful commit (not if it is one of the targets)."""
        self._retire.append(path)

    def staged_size(self, target: Path) -> int:
        """Bytes of the file staged for ``target``."""
        return next(t.stat().st_size for t, g in self._staged if g == target)

    @property
    def targets(self) -> list[Path]:
        return [g for _, g in self._staged]

    def abort(self) -> None:
        """Remove every temporary not yet renamed into place."""
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def commit_reporting(self, written: list[Path]) -> None:
        """:meth:`commit`; a signal that waited for it then raises
        :class:`~onnx_lowrank.errors.Interrupted` naming ``written``, which are complete."""
        try:
            self.commit()
        except KeyboardInterrupt as exc:
            if self.committed:
                raise Interrupted(getattr(exc, "signum", signal.SIGINT), written) from None
            raise

    def commit(self) -> None:
        with deferred_signals():
            self._commit()
            targets = {t.resolve() for t in self.targets}
            for path in self._retire:
                if path.resolve() not in targets:
                    with contextlib.suppress(OSError):
                        path.unlink()
                        log.debug("removed %s of the previous output", path)

    def _commit(self) -> None:
        backups: list[tuple[Path, Path | None]] = []  # (target, its previous content or None)
        try:
            for _, target in self._staged:
                backups.append((target, _backup(target)))
            done = []
            try:
                for tmp, target in self._staged:
                    os.replace(tmp, target)
                    done.append(target)
                for folder in {t.resolve().parent for t in done}:
                    _fsync_dir(folder)
            except BaseException:
                for target, backup in backups:
                    if target not in done:
                        continue
                    if backup is not None:
                        os.replace(backup, target)
                    else:
                        with contextlib.suppress(OSError):
                            target.unlink()
                raise
            self.committed = True
        finally:
            for _, backup in backups:
                if backup is not None:
                    with contextlib.suppress(OSError):
                        backup.unlink()
            self.abort()


def _backup(target: Path) -> Path | None:
    """A hard link to ``target``'s current content, to put back if the commit fails."""
    if not target.is_file() or target.is_symlink():
        return None
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".old", dir=target.resolve().parent)
    os.close(fd)
    os.unlink(name)
    try:
        os.link(target, name)
    except OSError:  # no hard links here: a copy serves the same purpose
        import shutil

        shutil.copy2(target, name)
    return Path(name)


def _pad(f: BinaryIO, offset: int) -> int:
    aligned = -(-offset // _ALIGN) * _ALIGN
    if aligned > offset:
        f.write(b"\0" * (aligned - offset))
    return aligned


def _set_external(tensor: TensorProto, location: str, offset: int, length: int) -> None:
    for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(name)
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def _inline_bytes(model: onnx.ModelProto) -> int:
    return sum(tensor_nbytes(t) for t in iter_tensors(model) if not is_external(t))


_DATA_NAME = re.compile(r"\.[0-9a-f]{%d}\.data$" % _DIGEST_HEX)


def data_file_name(output: Path, digest: str) -> str:
    """``OUT.onnx.<digest>.data``: named after its content, so a model is never paired with
    another generation's data."""
    return f"{output.name}.{digest[:_DIGEST_HEX]}.data"


def _previous_data_files(out: Path) -> list[Path]:
    """Data files an earlier output at ``out`` left: content-named ones by their name, any
    other by the old model's own references (read only when it is small)."""
    folder = out.resolve().parent
    prefix = out.name
    found = [p for p in folder.glob(f"{glob_escape(prefix)}.*.data") if _DATA_NAME.search(p.name[len(prefix):])]
    if out.is_file() and out.stat().st_size < 256 * 2**20 and _mentions(out, b"location"):
        with contextlib.suppress(Exception):
            old = onnx.load(str(out), load_external_data=False)
            old_files = DataFiles(base_dir=folder, label=str(out))
            for t in iter_tensors(old):
                if is_external(t):
                    with contextlib.suppress(ModelError):
                        found.append(old_files.path(t)[0])
    return sorted(set(found))


def _mentions(path: Path, needle: bytes) -> bool:
    """Whether the file's bytes contain ``needle`` (a model with no external reference has no
    ``location`` key, and then is not parsed at all); ``True`` when it cannot be read."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return view.find(needle) >= 0
    except (OSError, ValueError):
        return True


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def stage_model(
    files: OutputSet,
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    data: DataFiles | None = None,
    external: bool | None = None,
    protect: tuple[Path, ...] = (),
) -> list[Path]:
    """Stage ``model`` at ``path`` in ``files`` (data file first), without changing ``model``.

    Args:
        files: The :class:`OutputSet` to stage into; nothing is on disk until it commits.
        model: The model; it is left exactly as it was.
        path: Output ``.onnx`` path; its directory must exist.
        data: Where ``model``'s external references resolve.
        external: Force external data on or off (off reads the external tensors into the one
            file); by default it is on when the model references external data or its inline
            tensors would pass protobuf's 2 GiB limit.
        protect: Files never to delete (the input's data files).

    Returns:
        The files the commit will write: the model, then its data file when there is one.
    """
    out = Path(path)
    data = data or DataFiles()
    has_external = uses_external_data(model)
    if external is None:
        external = has_external or _inline_bytes(model) + 16 * 2**20 > PROTOBUF_LIMIT
    sources = set(data.files(model)) | {p.resolve() for p in protect}
    if has_external and not external:  # one self-contained file: the external tensors read in
        model = inlined(model, data)
    if out.resolve() in sources:
        raise UsageError(f"{out}: is the input's external data file; choose another output path (the input is never overwritten).")
    for old in _previous_data_files(out):
        if old.resolve() not in sources:
            files.retire(old)
    written: list[Path] = [out]
    moved: list[_Moved] = []
    data_tmp: Path | None = None
    try:
        if external:
            data_target = out.with_name(out.name + ".data")
            data_tmp = files.stage(data_target, lambda f: _write_data(model, data, f, moved, files.pending(data_target)))
            if moved:
                name = data_file_name(out, _file_digest(data_tmp))
                if (out.resolve().parent / name).resolve() in sources:
                    raise UsageError(f"{out}: its data file '{name}' would overwrite the input's external data; "
                                     "choose another output path.")
                files.retarget(data_tmp, out.with_name(name))
                for m in moved:
                    m.tensor.external_data[0].value = name
                written.append(out.with_name(name))
            else:  # nothing goes outside: no empty data file
                files.unstage(data_tmp)
        files.stage(out, lambda f: f.write(model.SerializeToString()))
    finally:
        _restore(moved)
    return written


def inlined(model: onnx.ModelProto, data: DataFiles) -> onnx.ModelProto:
    """A copy of ``model`` with every external tensor read in (``model`` is left as it is).

    Raises:
        ModelError: the tensors would pass protobuf's 2 GiB limit in one file.
    """
    outside = sum(tensor_nbytes(t) for t in iter_tensors(model) if t.data_location == TensorProto.EXTERNAL)
    if _inline_bytes(model) + outside + 16 * 2**20 > PROTOBUF_LIMIT:
        raise ModelError(f"the model's tensors ({(_inline_bytes(model) + outside) / 2**30:.2f} GiB) pass protobuf's 2 GiB limit "
                         "for one file; save it with external data (external=True or the default).")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    read_in(out, data)
    return out


def read_in(model: onnx.ModelProto, data: DataFiles) -> None:
    """In place: every external tensor of ``model`` read into it (through ``data``, so only
    files inside the model's folder are read)."""
    for t in iter_tensors(model):
        if t.data_location == TensorProto.EXTERNAL:
            fresh = onnx.numpy_helper.from_array(data.read(t), t.name)
            fresh.data_type = t.data_type  # (bfloat16 and the like are read as their raw integers)
            t.CopyFrom(fresh)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class _Moved:
    """A tensor :func:`_write_data` pointed at the new data file, and how to put it back."""

    tensor: TensorProto
    typed: TensorProto | None = None  # an inline original with typed fields, kept whole
    ref: ExternalRef | None = None  # an external original's reference
    written_to: Path | None = None  # an inline original with raw bytes: read back from this file


def _write_data(model: onnx.ModelProto, data: DataFiles, out: BinaryIO, moved: list[_Moved], out_path: Path) -> None:
    """Move into ``out`` every tensor's data that belongs outside, pointing the tensor at it.

    Each moved tensor is recorded in ``moved`` as it goes, for :func:`_restore`: an inline
    tensor's raw bytes are read back from ``out`` rather than kept, so they are never held twice.
    """
    offset = 0
    handles: dict[Path, BinaryIO] = {}
    try:
        # Sparse tensors keep their parts inline, as onnx.save does (the checker reads them
        # there); parts the input kept outside are copied like any external tensor.
        for tensor, sparse_part in _tensor_slots(model):
            if is_external(tensor):
                src, ref = data.path(tensor)
                f = handles.get(src)
                if f is None:
                    f = handles[src] = open(src, "rb")
                offset = _pad(out, offset)
                f.seek(ref.offset)
                left = ref.length
                while left > 0:
                    chunk = f.read(min(_CHUNK, left))
                    if not chunk:
                        raise ModelError(f"{data.where}external data of tensor '{tensor.name}' in '{src.name}' is truncated.")
                    out.write(chunk)
                    left -= len(chunk)
                moved.append(_Moved(tensor, ref=ref))
                _set_external(tensor, "", offset, ref.length)
                offset += ref.length
                continue
            if sparse_part or tensor_nbytes(tensor) < EXTERNAL_MIN_BYTES:
                continue
            typed = None
            if tensor.raw_data:
                raw = tensor.raw_data
            else:  # typed fields (float_data, ...): kept as they were, written as raw bytes
                typed = TensorProto()
                typed.CopyFrom(tensor)
                raw = onnx.numpy_helper.from_array(data.read(tensor), tensor.name).raw_data
            offset = _pad(out, offset)
            out.write(raw)
            moved.append(_Moved(tensor, typed=typed, written_to=None if typed is not None else out_path))
            _set_external(tensor, "", offset, len(raw))
            offset += len(raw)
            del raw
    finally:
        for f in handles.values():
            f.close()
        out.flush()


def _restore(moved: list[_Moved]) -> None:
    """Undo :func:`_write_data` on the model, tensor by tensor."""
    reader = None
    try:
        for m in moved:
            if m.ref is not None:
                _set_external(m.tensor, m.ref.location, m.ref.offset, m.ref.length)
            elif m.typed is not None:
                m.tensor.CopyFrom(m.typed)
            else:
                entries = {e.key: e.value for e in m.tensor.external_data}
                if reader is None:
                    reader = open(m.written_to, "rb")
                reader.seek(int(entries["offset"]))
                raw = reader.read(int(entries["length"]))
                del m.tensor.external_data[:]
                m.tensor.ClearField("data_location")
                m.tensor.raw_data = raw
    finally:
        if reader is not None:
            reader.close()
        moved.clear()


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    data: DataFiles | None = None,
    base_dir: str | os.PathLike | None = None,
    external: bool | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` (its data file beside it), all or nothing.

    Returns:
        The files written: the model, then its data file when there is one.
    """
    if data is None:
        data = DataFiles(Path(base_dir) if base_dir is not None else None)
    with terminate_raises(), OutputSet() as files:
        written = stage_model(files, model, path, data=data, external=external)
        files.commit_reporting(written)
    return written


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write one text file (a report) all or nothing."""
    with terminate_raises(), OutputSet() as files:
        files.stage(path, lambda f: f.write(text.encode("utf-8")))
        files.commit_reporting([Path(path)])
    return Path(path)
