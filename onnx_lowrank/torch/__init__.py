"""SVD training for PyTorch models, ending in the ONNX form the pass emits (arXiv 2004.09031).

Train each layer as ``W = U diag(s) V^T``, keep ``U`` and ``V`` orthonormal with a regularizer,
push ``s`` towards sparsity (L1, Hoyer or Hoyer-square), prune singular values by energy,
fine-tune, and export two chained products per layer::

    from onnx_lowrank.torch import to_svd, svd_regularizer, prune, export_onnx

    model = to_svd(model)                                   # same outputs as before
    loss = task_loss + svd_regularizer(model, orth=1.0, sparsity="hoyer", strength=1e-3)
    ...
    prune(model, energy=0.99)                               # shrinks U, s, V per layer
    ...                                                     # fine-tune with a new optimizer
    export_onnx(model, "model.onnx", example_inputs)

Installed with the extra ``onnx-lowrank[torch]``.  No other module of the package imports torch.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ImportError as exc:  # one clear line instead of a bare "No module named 'torch'"
    raise ImportError(
        "onnx_lowrank.torch needs PyTorch: install it first (the CPU build from PyTorch's CPU-only "
        "package index, or 'pip install torch==2.13.0' where that pin is a CPU wheel), then "
        "'pip install onnx-lowrank[torch]'."
    ) from exc

from onnx_lowrank.torch.convert import svd_layers, to_svd
from onnx_lowrank.torch.export import ExportedLayer, ExportResult, export_onnx
from onnx_lowrank.torch.layers import SVDConv2d, SVDLayer, SVDLinear
from onnx_lowrank.torch.prune import PruneDecision, prune
from onnx_lowrank.torch.regularizers import orthogonality_loss, sparsity_loss, svd_regularizer

__all__ = [
    "to_svd",
    "svd_layers",
    "svd_regularizer",
    "orthogonality_loss",
    "sparsity_loss",
    "prune",
    "PruneDecision",
    "export_onnx",
    "ExportResult",
    "ExportedLayer",
    "SVDLayer",
    "SVDLinear",
    "SVDConv2d",
]
