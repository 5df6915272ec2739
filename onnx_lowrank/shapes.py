"""Static tensor shapes, for counting a Conv's real multiply-accumulates.

A Conv's MACs scale with its output size, which the weight alone does not tell.  The shapes come
from the model's own annotations (graph inputs, outputs, ``value_info``) completed by ONNX shape
inference.  Inference needs the whole model as one protobuf, which cannot exceed 2 GB; a bigger
in-memory model (weights inline rather than in external data) keeps only its annotations, and
the report then says which Conv sizes are unknown.
"""

from __future__ import annotations

import logging
from typing import Optional

import onnx

from .io import iter_graphs

__all__ = ["Shape", "ShapeInfo", "value_shapes"]

log = logging.getLogger(__name__)

#: A shape whose unknown (symbolic or missing) dimensions are ``None``.
Shape = tuple[Optional[int], ...]

# Protobuf refuses to serialize 2 GiB; keep a margin for what inference adds.
_INFERENCE_LIMIT = 2**31 - 2**26


class ShapeInfo:
    """Known shapes by value name, and why inference was not used, if it was not.

    Attributes:
        shapes: ``name -> shape``; names are unique along any path of graphs (ONNX forbids a body
            to shadow an outer name), so one table serves every graph (sibling If branches may
            reuse a name: the last one read stands).
        types: ``name -> element type`` (an ``onnx.TensorProto`` data type), constants included.
        note: ``None`` when shape inference ran, else why it did not.
    """

    def __init__(self, shapes: dict[str, Shape], note: str | None = None, types: dict[str, int] | None = None):
        self.shapes = shapes
        self.note = note
        self.types = types if types is not None else {}

    def get(self, name: str) -> Shape | None:
        return self.shapes.get(name)


def _collect(model: onnx.ModelProto, into: dict[str, Shape], types: dict[str, int]) -> None:
    for g in iter_graphs(model.graph):
        for t in g.initializer:
            types[t.name] = t.data_type
        for n in g.node:
            value = next((a.t for a in n.attribute if a.name == "value"), None) if n.op_type == "Constant" and n.output else None
            if value is not None:
                types[n.output[0]] = value.data_type
        for v in (*g.input, *g.output, *g.value_info):
            t = v.type.tensor_type
            if v.type.HasField("tensor_type") and t.elem_type:
                types[v.name] = t.elem_type
            if not v.type.HasField("tensor_type") or not t.HasField("shape"):
                continue
            dims = tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim)
            # An inferred shape never loses what the annotation knew.
            old = into.get(v.name)
            if old is not None and len(old) == len(dims):
                dims = tuple(a if a is not None else b for a, b in zip(dims, old))
            into[v.name] = dims


def value_shapes(model: onnx.ModelProto) -> ShapeInfo:
    """Shapes of the model's values, from its annotations and ONNX shape inference.

    The model is only read.  Inference failures are not errors: the annotations are kept and
    ``note`` says what happened.
    """
    shapes: dict[str, Shape] = {}
    types: dict[str, int] = {}
    _collect(model, shapes, types)
    size = model.ByteSize()
    if size >= _INFERENCE_LIMIT:
        note = f"shape inference skipped: the model is {size / 2**30:.1f} GiB in memory (protobuf's limit is 2 GiB)"
        log.debug(note)
        return ShapeInfo(shapes, note, types)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # a model ORT runs may still trip the checker; sizes are a nicety
        note = f"shape inference failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        log.debug(note)
        return ShapeInfo(shapes, note, types)
    _collect(inferred, shapes, types)
    return ShapeInfo(shapes, types=types)
