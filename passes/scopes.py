"""Names as ONNX scopes them, over every graph of a model: each constant's definition and the
readers of every value.  A body (If/Loop/Scan) sees its own names first, then its enclosing
graphs', so a weight of the main graph read inside a body is one constant with readers in
several graphs (an optimum merged decoder reads every weight from its If's two branches)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto

from onnx_lowrank.io import node_bodies

__all__ = ["Const", "Site", "Scopes"]


@dataclass
class Const:
    """A constant weight: an initializer or a Constant node's output, of graph ``graph``
    (the number :class:`Scopes` gives it; 0 is the main graph)."""

    name: str
    tensor: TensorProto
    node: onnx.NodeProto | None  # the Constant node, if any
    graph: int = 0

    @property
    def key(self) -> tuple[int, str]:
        return self.graph, self.name


@dataclass(frozen=True)
class Site:
    """Where a value is read: input ``slot`` of node ``node`` of graph ``graph``; ``node = -1``
    for an output of that graph."""

    graph: int
    node: int
    slot: int


class Scopes:
    """Every graph of the model (the main one is number 0, then the If/Loop/Scan bodies depth
    first, as :func:`onnx_lowrank.io.iter_graphs` walks them), each constant's definition, and
    the readers of every value, by ``(graph, name)`` of its definition (module docstring)."""

    def __init__(self, graph: onnx.GraphProto):
        self.graphs: list[onnx.GraphProto] = []
        self.parent: list[int] = []
        self.defined: set[tuple[int, str]] = set()
        self.consts: dict[tuple[int, str], Const] = {}
        self.readers: dict[tuple[int, str], list[Site]] = {}
        self._walk(graph, -1)

    def _walk(self, graph: onnx.GraphProto, parent: int) -> None:
        g = len(self.graphs)
        self.graphs.append(graph)
        self.parent.append(parent)
        for t in graph.initializer:
            self.consts[g, t.name] = Const(t.name, t, None, g)
        names = [t.name for t in graph.initializer] + [v.name for v in graph.input] + \
            [s.values.name for s in graph.sparse_initializer]
        self.defined.update((g, n) for n in names)
        for i, node in enumerate(graph.node):
            for k, name in enumerate(node.input):
                if name:
                    self._read(g, name, Site(g, i, k))
            for sub in node_bodies(node):
                self._walk(sub, g)
            self.defined.update((g, out) for out in node.output if out)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
                value = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
                if value is not None:
                    self.consts[g, node.output[0]] = Const(node.output[0], value, node, g)
        for v in graph.output:
            self._read(g, v.name, Site(g, -1, -1))

    def _read(self, g: int, name: str, site: Site) -> None:
        key = self.resolve(g, name)
        if key is not None:
            self.readers.setdefault(key, []).append(site)

    def resolve(self, g: int, name: str) -> tuple[int, str] | None:
        """The definition that ``name`` read in graph ``g`` refers to, as ``(graph, name)``."""
        while g >= 0:
            if (g, name) in self.defined:
                return g, name
            g = self.parent[g]
        return None

    def const(self, g: int, name: str | None) -> Const | None:
        """The constant ``name`` read in graph ``g`` refers to, if it is one."""
        key = self.resolve(g, name) if name else None
        return self.consts.get(key) if key is not None else None

    def node(self, site: Site) -> onnx.NodeProto:
        return self.graphs[site.graph].node[site.node]
