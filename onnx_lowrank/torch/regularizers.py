"""Regularizers of SVD training, added to the task loss (arXiv 2004.09031).

For a layer ``M = U diag(s) V^T`` of rank ``r``:

* orthogonality  ``L_o = (||U^T U - I||_F^2 + ||V^T V - I||_F^2) / r^2``, zero exactly when the
  columns of ``U`` and ``V`` are orthonormal, so that ``s`` stays the spectrum of ``M`` and
  pruning small ``s_i`` removes little of ``M``;
* sparsity on ``s``:

  - ``"l1"``            ``||s||_1 = sum_i |s_i|``: shrinks every singular value by the same step;
  - ``"hoyer"``         ``||s||_1 / ||s||_2``, in ``[1, sqrt(r)]``: scale-invariant, so it moves
    energy into the few largest values rather than shrinking all; minimal (1) for a one-hot ``s``;
  - ``"hoyer_square"``  ``||s||_1^2 / ||s||_2^2``, in ``[1, r]``: the same minimizers, a smoother
    gradient near them.

:func:`svd_regularizer` returns ``orth * sum_l L_o(l) + strength * sum_l L_s(l)`` over the SVD
layers of a model.
"""

from __future__ import annotations

import torch
from torch import nn

from onnx_lowrank.errors import UsageError
from onnx_lowrank.torch.convert import number, svd_layers
from onnx_lowrank.torch.layers import SVDLayer

__all__ = ["SPARSITY", "orthogonality_loss", "sparsity_loss", "svd_regularizer"]

SPARSITY = ("l1", "hoyer", "hoyer_square")

# Guards the Hoyer ratios against a layer whose singular values were all driven to zero.
_EPS = 1e-12


def _orth(mat: torch.Tensor) -> torch.Tensor:
    r = mat.shape[1]
    gram = mat.T @ mat
    eye = torch.eye(r, dtype=mat.dtype, device=mat.device)
    return (gram - eye).pow(2).sum() / (r * r)


def orthogonality_loss(layer: SVDLayer) -> torch.Tensor:
    """``(||U^T U - I||_F^2 + ||V^T V - I||_F^2) / r^2`` for one layer."""
    return _orth(layer.U) + _orth(layer.V)


def sparsity_loss(s: torch.Tensor, kind: str = "hoyer") -> torch.Tensor:
    """The sparsity measure of a vector of singular values.

    Args:
        s: Singular values, shape ``(r,)``; signs are ignored.
        kind: ``"l1"``, ``"hoyer"`` or ``"hoyer_square"``.
    """
    if kind not in SPARSITY:
        raise UsageError(f"got sparsity={kind!r}; expected one of {', '.join(repr(k) for k in SPARSITY)}.")
    l1 = s.abs().sum()
    if kind == "l1":
        return l1
    sq = s.pow(2).sum()
    if kind == "hoyer":
        return l1 / (sq.sqrt() + _EPS)
    return l1.pow(2) / (sq + _EPS)


def svd_regularizer(model: nn.Module, orth: float = 1.0, sparsity: str | None = "hoyer", strength: float = 1e-3) -> torch.Tensor:
    """The regularization term of SVD training, summed over every SVD layer of ``model``.

    Args:
        model: A model prepared with :func:`onnx_lowrank.torch.to_svd`.
        orth: Weight of the orthogonality loss; 0 turns it off.
        sparsity: ``"l1"``, ``"hoyer"``, ``"hoyer_square"``, or ``None`` for no sparsity term.
        strength: Weight of the sparsity loss.

    Returns:
        A scalar tensor to add to the task loss (zero when the model has no SVD layers).

    Raises:
        UsageError: unknown ``sparsity``, or a negative weight.
    """
    if sparsity is not None and sparsity not in SPARSITY:
        raise UsageError(f"got sparsity={sparsity!r}; expected one of {', '.join(repr(k) for k in SPARSITY)} or None.")
    orth, strength = number("orth", orth), number("strength", strength)
    if orth < 0 or strength < 0:
        raise UsageError(f"got orth={orth!r}, strength={strength!r}; expected weights >= 0.")
    total: torch.Tensor | None = None
    for _, layer in svd_layers(model):
        term = layer.s.new_zeros(())
        if orth:
            term = term + orth * orthogonality_loss(layer)
        if sparsity is not None and strength:
            term = term + strength * sparsity_loss(layer.s, sparsity)
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total
