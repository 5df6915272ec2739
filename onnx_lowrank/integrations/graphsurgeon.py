"""onnx-graphsurgeon: ``compress()`` of a ``gs.Graph`` gives the compressed ``gs.Graph`` back.

TensorRT users hold a model as an ``onnx_graphsurgeon.Graph`` and chain surgery steps on it.
:func:`onnx_lowrank.compress` accepts such a graph, with every option it takes for a file, and
returns a :class:`GraphCompressResult`: a :class:`~onnx_lowrank.api.CompressResult` whose
``model`` is the compressed ``gs.Graph``, with the same report (``layers``, ``totals``,
``to_json()``) and a ``save()`` that writes the model, its data and the report all or nothing.

The graph given is left as it is (as everywhere in this package, the input is never modified):
it is exported with ``gs.export_onnx``, compressed like any in-memory ``onnx.ModelProto``, and
the result is imported with ``gs.import_onnx`` into a new graph.  Node names, the opsets, the IR
version, graph inputs and outputs come through unchanged.

Lazy constants stay lazy.  A ``gs.Constant`` whose values were never read exports the
``TensorProto`` it was imported from, so a weight kept in external data is read only if it is
factorized, from ``base_dir`` (the folder of the model file, as for a ``ModelProto``; without it
such a model is refused with a message that asks for it).  In the returned graph, weights left
alone keep those external references, exactly as in the input; the factors are held in memory.

Why the rewrite itself does not use graphsurgeon: the pass's own rewrite (on the ``ModelProto``)
already covers everything discovery accepts (weights in Constant nodes, weights shared by
several nodes, If/Loop/Scan bodies using outer-scope weights, Gemm attributes, Conv), and it
writes the factors of an external-data model to a spill file on disk instead of memory.  A
second rewrite on ``gs.Graph`` would duplicate that logic, and graphsurgeon keeps every new
constant as a NumPy array in memory.  Exporting and importing the graph only moves protobuf
messages; no weight is converted to NumPy on the way.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from onnx_lowrank.api import CompressResult, compress
from onnx_lowrank.errors import VerificationFailed

from ._common import inline_spilled, require

__all__ = ["GraphCompressResult", "is_graph", "compress_graph"]


def _gs() -> Any:
    return require("onnx_graphsurgeon", "gs", "compress() of a gs.Graph")


def is_graph(model: Any) -> bool:
    """Whether ``model`` is an ``onnx_graphsurgeon`` Graph (checked without importing graphsurgeon)."""
    return any(c.__name__ == "Graph" and c.__module__.split(".")[0] == "onnx_graphsurgeon" for c in type(model).__mro__)


@dataclass
class GraphCompressResult(CompressResult):
    """A :class:`~onnx_lowrank.api.CompressResult` whose :attr:`model` is an ``onnx_graphsurgeon.Graph``.

    Attributes:
        model: The compressed graph, a new ``gs.Graph`` (the input graph is left as it is).
        proto: The same compressed model as an ``onnx.ModelProto``; :meth:`save` writes it.
    """

    proto: onnx.ModelProto | None = None

    def save(self, path: str | os.PathLike, *, external: bool | None = None,
             report: str | os.PathLike | None = None) -> list[Path]:
        """Write the compressed model as ``compress()`` returned it (:attr:`proto`), as
        :meth:`CompressResult.save <onnx_lowrank.api.CompressResult.save>` does.

        Changes made to :attr:`model` afterwards are not in it: save an edited graph with
        ``onnx.save(gs.export_onnx(graph), ...)``, into the input's folder when it keeps
        external data (its references are relative to that folder).
        """
        return CompressResult.save(dataclasses.replace(self, model=self.proto), path, external=external, report=report)


def _graph_result(result: CompressResult) -> GraphCompressResult:
    """``result`` with its model imported as a ``gs.Graph`` (factors moved out of the spill file)."""
    inline_spilled(result)
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(CompressResult)}
    fields["model"] = _gs().import_onnx(result.model)
    return GraphCompressResult(**fields, proto=result.model)


def compress_graph(graph: Any, *args: Any, **kwargs: Any) -> GraphCompressResult:
    """:func:`onnx_lowrank.compress` of ``graph`` exported to a ``ModelProto``, its result as a graph.

    Args:
        graph: The ``gs.Graph`` (left unmodified).
        *args, **kwargs: Everything else ``compress`` takes (``base_dir`` for external data).

    Raises:
        VerificationFailed: as ``compress`` does; its ``result`` is a :class:`GraphCompressResult`.
    """
    gs = _gs()
    # do_type_check=False: factorizing needs no dtypes on the graph's inputs and outputs, so a
    # graph graphsurgeon holds without them is not refused here.
    proto = gs.export_onnx(graph, do_type_check=False)
    try:
        result = compress(proto, *args, **kwargs)
    except VerificationFailed as exc:
        if isinstance(exc.result, CompressResult):
            exc.result = _graph_result(exc.result)
        raise
    return _graph_result(result)
