"""Singular-value pruning of SVD layers.

Per layer, the singular values are ordered by ``|s_i|`` (training may leave them unordered or
negative) and the layer keeps

* with ``energy=E``: the smallest ``r`` with ``sum_{i<=r} s_i^2 >= E * sum_i s_i^2``, the same
  rule as the ONNX pass's ``--energy`` (so ``sqrt(1 - E(r))`` bounds the relative Frobenius error
  while ``U`` and ``V`` stay orthonormal);
* with ``threshold=t``: every ``s_i`` with ``|s_i| > t``;

never fewer than ``min_rank``.  ``U``, ``s`` and ``V`` are replaced by smaller parameters holding
the kept triplets, so fine-tuning afterwards trains the pruned shapes: create the optimizer
after pruning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from onnx_lowrank.decompose import energy_kept, energy_rank
from onnx_lowrank.errors import UsageError
from onnx_lowrank.torch.convert import number, svd_layers

__all__ = ["PruneDecision", "prune"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneDecision:
    """What :func:`prune` did to one layer.

    Attributes:
        name: Qualified module name.
        rank_before: Rank before pruning.
        rank_after: Rank kept.
        energy: Fraction of ``sum s_i^2`` kept.
        params_after: Weight parameters of the factors at the kept rank, ``r (m + n)``.
        dense_params: Weight parameters of the dense layer, ``m n``.
    """

    name: str
    rank_before: int
    rank_after: int
    energy: float
    params_after: int
    dense_params: int


def prune(model: nn.Module, energy: float | None = None, threshold: float | None = None, *, min_rank: int = 1) -> list[PruneDecision]:
    """Shrink every SVD layer of ``model`` to the rank the rule gives, in place.

    Args:
        model: A model prepared with :func:`onnx_lowrank.torch.to_svd`.
        energy: Keep the smallest rank holding this fraction of ``sum s_i^2``, in ``(0, 1]``.
        threshold: Keep the singular values with ``|s_i| > threshold`` (``>= 0``).
        min_rank: Never keep fewer than this many singular values.

    Returns:
        One :class:`PruneDecision` per SVD layer, in module order.

    Raises:
        UsageError: neither or both of ``energy`` and ``threshold``, or a value out of range.
    """
    energy = number("energy", energy) if energy is not None else None
    threshold = number("threshold", threshold) if threshold is not None else None
    min_rank = number("min_rank", min_rank, integer=True)
    if (energy is None) == (threshold is None):
        raise UsageError(f"got energy={energy!r} and threshold={threshold!r}; pass exactly one of them.")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UsageError(f"got energy={energy!r}; expected a number in (0, 1].")
    if threshold is not None and threshold < 0:
        raise UsageError(f"got threshold={threshold!r}; expected a number >= 0.")
    if int(min_rank) < 1:
        raise UsageError(f"got min_rank={min_rank!r}; expected an integer >= 1.")
    decisions = []
    for name, layer in svd_layers(model):
        mags = layer.s.detach().abs().to(torch.float64).cpu()
        order = torch.argsort(mags, descending=True, stable=True)
        sorted_mags = mags[order].numpy()
        if energy is not None:
            r = energy_rank(sorted_mags, energy)
        else:
            r = int(np.sum(sorted_mags > threshold))
        r = min(max(r, int(min_rank)), layer.rank)
        before = layer.rank
        layer.keep(order[:r])
        m, n = layer.matrix_shape
        d = PruneDecision(name=name, rank_before=before, rank_after=r, energy=energy_kept(sorted_mags, r),
                          params_after=r * (m + n), dense_params=m * n)
        decisions.append(d)
        log.info("pruned %s: rank %d -> %d (energy kept %.4f)", name, before, r, d.energy)
    return decisions
