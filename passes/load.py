"""Load: read the model the caller named, or copy the one they passed, and check every tensor.

A path is read without its external data (:func:`onnx_lowrank.io.load_model`: every reference is
confined to the model's folder and checked against its file before anything is read).  An
in-memory ``ModelProto`` is copied, so the caller's object is never touched.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnx_lowrank import io
from onnx_lowrank.errors import UsageError
from onnx_lowrank.pipeline import Context, StageResult, Step

__all__ = ["Load", "Loaded", "count_params", "undefined_ops"]

log = logging.getLogger(__name__)


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
        tensor_bytes: Bytes of its constants by kind (:func:`tensor_bytes`), as loaded.
    """

    model: onnx.ModelProto
    data: io.DataFiles
    path: Path | None
    external: bool
    size: int | None
    params: int
    files: tuple[Path, ...] = ()
    tensor_bytes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tensor_bytes:  # counted before any stage changes the model
            self.tensor_bytes = tensor_bytes(self.model)


#: The kinds :func:`tensor_bytes` sorts a model's constants into, by what finally reads them.
TENSOR_KINDS = ("matmul weights", "conv weights", "embeddings", "other")
_MATMULS = {"MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
            "QLinearMatMul", "FusedMatMul", "GatherBlockQuantized"}
_CONVS = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv"}
#: Operators a weight passes through on its way to the product (dequantization, layout).
_THROUGH = {"DequantizeLinear", "Cast", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten"}


#: Input slots of the products that hold a bias, not the weight: they count as "other".
BIAS_SLOTS = {"Gemm": 2, "MatMulNBits": 5, "DynamicQuantizeMatMul": 4, "MatMulIntegerToFloat": 6, "Conv": 2,
               "ConvTranspose": 2, "QLinearConv": 8}


#: Types of integer codes (``Cast`` then ``Mul`` dequantizes them).
_INTEGER_CODES = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def code_dequantizers(graph: onnx.GraphProto, consts: dict[str, onnx.TensorProto]) -> set[str]:
    """Outputs of the nodes that dequantize integer codes spelled as ``Cast`` then ``Mul`` by
    their scales (how the int4 pass stores low-rank factors): the ``Cast`` of an integer
    constant of ``consts`` (by name), and a ``Mul`` of that ``Cast``'s output."""
    casts = {n.output[0] for n in graph.node if n.op_type == "Cast" and n.input and n.output
             and n.input[0] in consts and consts[n.input[0]].data_type in _INTEGER_CODES}
    return casts | {n.output[0] for n in graph.node if n.op_type == "Mul" and n.output and any(i in casts for i in n.input)}


def _kind(op: str, slot: int) -> str | None:
    if slot == BIAS_SLOTS.get(op, -1):
        return None
    if op in _MATMULS and op != "GatherBlockQuantized":
        return "matmul weights"
    if op in _CONVS:
        return "conv weights"
    if op in ("Gather", "GatherBlockQuantized") and slot == 0:
        return "embeddings"
    return None


def tensor_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of every constant (initializers and ``Constant`` nodes, in every graph), by
    :data:`TENSOR_KINDS`: what reads it, looking through dequantization and layout operators.

    A MatMul's int8 or int4 codes, scales and zero points count as its weight; a vocabulary
    table read by ``Gather`` counts as embeddings (a user sees at once where the bytes are).
    """
    out = dict.fromkeys(TENSOR_KINDS, 0)
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}  # in every graph: a body may read an outer weight
    for graph in io.iter_graphs(model.graph):
        for node in graph.node:
            for slot, name in enumerate(node.input):
                if name:
                    readers.setdefault(name, []).append((node, slot))
    for graph in io.iter_graphs(model.graph):
        consts = [(t.name, t) for t in graph.initializer]
        consts += [(n.output[0], a.t) for n in graph.node if n.op_type == "Constant" and n.output
                   for a in n.attribute if a.name == "value" and a.HasField("t")]
        scaling = code_dequantizers(graph, dict(consts))  # the Mul of Cast-then-Mul passes codes on too
        for name, tensor in consts:
            kind, frontier, seen = None, [name], {name}
            for _ in range(4):  # a few steps through DequantizeLinear, Cast, Transpose, ...
                nxt = []
                for value in frontier:
                    for node, slot in readers.get(value, []):
                        kind = kind or _kind(node.op_type, slot)
                        if (node.op_type in _THROUGH and (slot == 0 or node.op_type == "DequantizeLinear")
                                or node.op_type == "Mul" and node.output and node.output[0] in scaling):
                            nxt += [o for o in node.output if o not in seen]
                            seen.update(node.output)
                if kind or not nxt:
                    break
                frontier = nxt
            out[kind or "other"] += io.tensor_nbytes(tensor)
    return out


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every initializer and Constant value, in every graph."""
    total = 0
    for g in io.iter_graphs(model.graph):
        tensors = list(g.initializer) + [a.t for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        total += sum(int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1 for t in tensors)
    return total


@functools.lru_cache(maxsize=1)
def _runtime_kernels() -> dict[str, list[tuple[int, int]]] | None:
    """The installed onnxruntime's kernels of the default domain: op type -> opset ranges
    (``None`` when this onnxruntime does not list them)."""
    try:
        from onnxruntime.capi._pybind_state import get_all_opkernel_def
    except ImportError:  # pragma: no cover - every onnxruntime wheel this tool supports has it
        return None
    kernels: dict[str, list[tuple[int, int]]] = {}
    for k in get_all_opkernel_def():
        if k.domain in ("", "ai.onnx"):
            kernels.setdefault(k.op_name, []).append(tuple(k.version_range))
    return kernels


def _onnx_defines(op: str, opset: int) -> bool:
    try:
        schema = onnx.defs.get_schema(op, opset, "")
    except onnx.defs.SchemaError:
        return False
    # A deprecated op is gone unless ONNX gives it a function body to expand (GroupNormalization-18).
    return not schema.deprecated or schema.has_function or schema.has_context_dependent_function


def undefined_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op types of the default domain that neither ONNX defines at the model's opset (or only as
    deprecated, with no function body) nor the installed onnxruntime has a kernel for, with their
    node counts; bodies and model-local functions included.  An exporter's mistake (tf2onnx has
    written ``Erfc``) that onnxruntime refuses, and that a compressed copy would carry over."""
    def default(imports) -> int | None:
        return next((o.version for o in imports if o.domain in ("", "ai.onnx")), None)

    counts: dict[tuple[str, int], int] = {}
    scopes = [(model.graph, default(model.opset_import))]
    scopes += [(onnx.GraphProto(node=f.node), default(f.opset_import) or default(model.opset_import)) for f in model.functions]
    for top, opset in scopes:
        if opset is None:
            continue
        for graph in io.iter_graphs(top):
            for node in graph.node:
                if node.domain in ("", "ai.onnx"):
                    counts[node.op_type, opset] = counts.get((node.op_type, opset), 0) + 1
    missing = {key: n for key, n in sorted(counts.items()) if not _onnx_defines(*key)}
    kernels = _runtime_kernels() if missing else None  # (onnxruntime still runs ONNX's old experimental ops: ImageScaler, ...)
    unknown: dict[str, int] = {}
    for (op, opset), n in missing.items():
        if kernels is None or not any(lo <= opset <= hi for lo, hi in kernels.get(op, ())):
            unknown[op] = unknown.get(op, 0) + n
    return unknown


def _warn_undefined(model: onnx.ModelProto) -> None:
    unknown = undefined_ops(model)
    if unknown:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), "?")
        log.warning("the input uses op(s) that neither ONNX (opset %s) nor the installed onnxruntime defines: %s; "
                    "onnxruntime refuses such a model, and the output keeps them (fix the export, or replace them "
                    "before compressing)", opset, ", ".join(f"{op} ({n} node{'s' if n > 1 else ''})" for op, n in unknown.items()))


class Load(Step):
    name = "load"
    changes_model = True

    def run(self, ctx: Context) -> Loaded:
        loaded = self._load(ctx)
        _warn_undefined(loaded.model)
        return loaded

    def _load(self, ctx: Context) -> Loaded:
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
        raise UsageError(f"got a {type(source).__name__} as model; expected a path, an onnx.ModelProto or an onnx_graphsurgeon.Graph.")
