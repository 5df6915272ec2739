"""What the pass intends for each weight, as data that flows one way through the stages.

* :class:`Skip`: why a candidate is left alone: a :class:`SkipCode` (what tools and tests
  check), a message for people, and the stage that decided.
* :class:`LayerPlan`: a factorizable weight's matrix view(s) and their spectra, made by the
  spectra stage and only read after it.  A MatMul/Gemm weight has one view (``matrix``); a
  Conv kernel one or two (``channel``, ``spatial``; :mod:`onnx_lowrank.linalg.conv`).
* :class:`Decision`: what the pass does with one weight group: a view and a rank, or a skip.
  A stage that changes decisions returns a new table of them; it never edits an earlier one.

Everything is keyed by the weight group's :attr:`~onnx_lowrank.passes.discover.WeightGroup.key`,
a handle the discovery stage hands out, never by object identity.

MACs: a MatMul/Gemm costs ``m n`` per activation row dense and ``r (m + n)`` factorized.  A Conv's
cost depends on its output size (and, in spatial mode, on its input width); with both known
from the model's shapes it is counted per sample (batch 1).  When they are unknown (dynamic
spatial dims) it is counted per output pixel, taking the spatial form's intermediate as
``stride_w`` columns per output column (exact for SAME padding), and the report says so.  The
break-even guard of a Conv compares these MAC counts as well as parameters.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import linalg

if TYPE_CHECKING:
    from .passes.discover import Layer, WeightGroup

__all__ = ["SkipCode", "Skip", "View", "ConvUse", "LayerPlan", "Decision", "MATRIX"]

#: The one view of a MatMul/Gemm weight.
MATRIX = "matrix"


class SkipCode(str, enum.Enum):
    """Why a candidate layer is left alone; the value is a stable name for reports and tools."""

    # discover: the graph says no
    CONV_TRANSPOSE = "conv_transpose"
    MALFORMED_NODE = "malformed_node"
    CONSTANT_OPERANDS = "constant_operands"
    NO_CONSTANT_WEIGHT = "no_constant_weight"
    QUANTIZED_WEIGHT = "quantized_weight"
    MALFORMED_CONV = "malformed_conv"
    DEPTHWISE_CONV = "depthwise_conv"
    GROUPED_CONV = "grouped_conv"
    SPARSE_WEIGHT = "sparse_weight"
    NOT_A_MATRIX = "not_a_matrix"
    NOT_FLOAT = "not_float"
    GRAPH_INPUT = "graph_input"
    IN_FUNCTION = "in_function"
    ALREADY_LOW_RANK = "already_low_rank"
    SHARED_AS_OTHER_INPUT = "shared_as_other_input"
    SHARED_WITH_OTHER_USE = "shared_with_other_use"
    SHARED_ACROSS_OP_TYPES = "shared_across_op_types"
    SHARED_WITH_SKIPPED = "shared_with_skipped"
    # discover: the options say no
    TOO_SMALL = "too_small"
    EXCLUDED = "excluded"
    NOT_INCLUDED = "not_included"
    # spectra
    NOT_FACTORIZABLE = "not_factorizable"
    NO_SPATIAL_VIEW = "no_spatial_view"
    # decide, adaptive
    SAVES_NOTHING = "saves_nothing"
    LEFT_DENSE_BY_BUDGET = "left_dense_by_budget"
    NOT_MEASURED = "not_measured"
    # latency
    NO_LATENCY_ESTIMATE = "no_latency_estimate"
    NOT_FASTER = "not_faster"
    WHOLE_MODEL_SLOWER = "whole_model_slower"


@dataclass(frozen=True)
class Skip:
    """Why a layer is left alone, and which stage decided it."""

    code: SkipCode
    message: str
    stage: str

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message, "stage": self.stage}


@dataclass(frozen=True)
class View:
    """One matrix view of a weight: ``matrix`` (MatMul/Gemm), ``channel`` or ``spatial`` (Conv).

    Attributes:
        mode: The view's name.
        m, n: Shape of the matrix factorized.
        spectrum: Its (possibly whitened) SVD; ``None`` when it could not be taken.
    """

    mode: str
    m: int
    n: int
    spectrum: linalg.Spectrum | None = None

    @property
    def whitened(self) -> bool:
        return self.spectrum is not None and self.spectrum.whiten is not None


@dataclass(frozen=True)
class ConvUse:
    """One Conv node that runs a planned weight, and its sizes when the model's shapes tell them.

    Attributes:
        layer: The node (its ``conv`` spec is set).
        in_size: Spatial input size, e.g. ``(H_i, W_i)``; ``None`` when unknown.
        out_size: Spatial output size; ``None`` when unknown.
    """

    layer: "Layer"
    in_size: tuple[int, ...] | None = None
    out_size: tuple[int, ...] | None = None

    @property
    def known(self) -> bool:
        return self.out_size is not None

    def macs(self, w_shape: tuple[int, ...], rank: int | None, mode: str) -> int:
        """MACs per sample, or per output pixel when the sizes are unknown; ``rank=None`` is dense."""
        spec = self.layer.conv
        if self.known:
            out, mid = self.out_size, self.in_size[-1]
        else:
            out, mid = (1,) * spec.ndim, spec.strides[-1]
        return linalg.conv_macs(w_shape, rank, mode, out, mid)


@dataclass(frozen=True)
class LayerPlan:
    """A weight group the pass may factorize, with everything the deciders need to know.

    Attributes:
        key: The weight group's handle.
        group: The weight and its users (discovery's object; read only).
        dtype: The weight's dtype; factors are cast back to it.
        weight_shape: The weight's stored shape.
        views: The matrix view(s) in play, by mode.
        conv_uses: For a Conv, one entry per user node.
        note: A remark for the report (``attention-aware``, or why the plain SVD was used).
        skip: Why no view could be factorized, if so.
    """

    key: int
    group: "WeightGroup"
    dtype: np.dtype
    weight_shape: tuple[int, ...]
    views: dict[str, View] = field(default_factory=dict)
    conv_uses: tuple[ConvUse, ...] = ()
    note: str | None = None
    skip: Skip | None = None

    @property
    def name(self) -> str:
        return self.group.weight.name

    @property
    def is_conv(self) -> bool:
        return self.group.layers[0].is_conv

    @property
    def users(self) -> int:
        return len(self.group.layers)

    @property
    def active(self) -> bool:
        """Whether a spectrum was taken and nothing rules the plan out yet."""
        return self.skip is None and any(v.spectrum is not None for v in self.views.values())

    @property
    def macs_known(self) -> bool:
        """False for a Conv with an unknown spatial size (its MACs are per output pixel)."""
        return all(u.known for u in self.conv_uses)

    @property
    def dense_params(self) -> int:
        return int(np.prod(self.weight_shape))

    @property
    def m(self) -> int:
        """Rows of the default view's matrix."""
        return self.view().m

    @property
    def n(self) -> int:
        """Columns of the default view's matrix."""
        return self.view().n

    def view(self, mode: str | None = None) -> View:
        """The view ``mode``; by default the matrix, or a Conv's channel view when it has one."""
        if mode is not None:
            return self.views[mode]
        return self.views.get(MATRIX) or self.views.get("channel") or next(iter(self.views.values()))

    @functools.cached_property
    def budget_mode(self) -> str:
        """The view a budget allocates: the matrix, or for a Conv, of the views whose factors can
        save something, the one whose spectrum keeps more energy at about half the dense
        parameters (``channel`` on a tie; the default view when none can save)."""
        if not self.is_conv:
            return self.view().mode
        best = None
        for v in self.views.values():
            if v.spectrum is None or self.break_even(v.mode) < 1:
                continue
            half = max(1, (self.dense_params // 2) // max(1, v.m + v.n))
            key = (1.0 - linalg.energy_kept(v.spectrum.s, min(half, len(v.spectrum.s)), v.spectrum.total), v.mode != "channel")
            if best is None or key < best[0]:
                best = (key, v.mode)
        return best[1] if best is not None else self.view().mode

    def params_at(self, rank: int, mode: str | None = None) -> int:
        v = self.view(mode)
        return linalg.lowrank_params(v.m, v.n, rank)

    def macs(self, rank: int | None, mode: str | None = None) -> int:
        """MACs summed over users; ``rank=None`` means dense.

        MatMul/Gemm: per activation row.  Conv: per sample, or per output pixel when the size is
        unknown (:attr:`macs_known`), in view ``mode``.
        """
        if not self.is_conv:
            per_user = self.dense_params if rank is None else self.params_at(rank)
            return per_user * self.users
        mode = self.view(mode).mode
        return sum(u.macs(self.weight_shape, rank, mode) for u in self.conv_uses)

    def break_even(self, mode: str | None = None) -> int:
        """Largest rank that saves both parameters and MACs (both are linear in the rank)."""
        v = self.view(mode)
        by_params = linalg.break_even_rank(v.m, v.n)
        if not self.is_conv:
            return by_params
        return min(by_params, (self.macs(None) - 1) // max(1, self.macs(1, v.mode)))

    def choice(self, rank: int, mode: str | None = None) -> linalg.RankChoice:
        """The :class:`~onnx_lowrank.linalg.RankChoice` for ``rank`` in view ``mode``."""
        v = self.view(mode)
        return linalg.choice_at(v.spectrum.s, v.m, v.n, rank, break_even=self.break_even(mode) if self.is_conv else None,
                                total=v.spectrum.total)


@dataclass(frozen=True)
class Decision:
    """What the pass does with one weight group.

    Attributes:
        key: The weight group's handle.
        mode: The view factorized (``matrix``, ``channel``, ``spatial``).
        choice: The rank and what it keeps; ``None`` when no rank was chosen.
        skip: Why the group is left alone (it may still carry the ``choice`` it was measured at).
        sensitivity: In adaptive mode, the measured drop with only this layer at its rank.
    """

    key: int
    mode: str = MATRIX
    choice: linalg.RankChoice | None = None
    skip: Skip | None = None
    sensitivity: float | None = None

    @property
    def factorize(self) -> bool:
        return self.skip is None and self.choice is not None

    @property
    def rank(self) -> int | None:
        return self.choice.rank if self.choice is not None else None

    def replace(self, **changes: Any) -> "Decision":
        return dataclasses.replace(self, **changes)
