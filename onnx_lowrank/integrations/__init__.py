"""Bridges to the tools people already chain their models through.

* :mod:`~onnx_lowrank.integrations.graphsurgeon`: :func:`onnx_lowrank.compress` takes an
  ``onnx_graphsurgeon.Graph`` and hands the compressed graph back (``pip install "onnx-lowrank[gs]"``).
* :mod:`~onnx_lowrank.integrations.ir`: :class:`~onnx_lowrank.integrations.ir.LowRankPass`, a pass
  on onnx-ir's pass infrastructure (``pip install "onnx-lowrank[ir]"``).
* :mod:`~onnx_lowrank.integrations.olive`:
  :class:`~onnx_lowrank.integrations.olive.LowRankFactorization`, a pass for Olive workflows
  (``pip install "onnx-lowrank[olive]"``).

Each runs :func:`onnx_lowrank.compress` underneath, with the same options and the same report,
and imports its tool only when it is used: ``import onnx_lowrank`` needs none of them, and a
missing one is a :class:`~onnx_lowrank.errors.UsageError` that says what to install.
"""

from __future__ import annotations

__all__: list[str] = []
