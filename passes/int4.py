"""int4: 4-bit block-quantized weights (onnxruntime's ``MatMulNBits``) with a low-rank correction.

Approach
--------
Every constant MatMul/Gemm weight that the factorization left dense becomes a
``com.microsoft.MatMulNBits`` node: 4-bit codes in blocks of ``int4_block`` rows per column,
one scale and one zero point per block (:mod:`onnx_lowrank.linalg.quant`).  Its error
``R = W - Q(W)``, taken against the weight *as the runtime dequantizes it*, is repaired by a
rank-``r`` branch fitted in the space whitened by the layer's input Gram (LQER, QERA)::

    MatMul(x, W)       ->  Add(MatMulNBits(x), MatMul(MatMul(x, A), B))
    Gemm(x, W, C)      ->  the same, then Mul(., alpha) and Add(., C) (or Add(., Mul(C, beta)))

A bias goes into ``MatMulNBits``'s own bias input when it is a float32 constant of shape
``(N,)``: the ``Add`` of one after a MatMul (the MatMul's only reader), or a Gemm's ``C`` with
``alpha = beta = 1``.  That ``Add`` leaves the graph, one full pass over the output less per
layer (MiniLM at batch 64: about 5 % of the run).

Stacked branches (``int4_branch="auto"``, the default): on a layer at least as wide as its input
(``N >= K``) the branch's second factor becomes extra 4-bit rows below the weight's blocks
(:func:`~onnx_lowrank.linalg.quant.stacked`, ``A`` refitted to the 4-bit ``B``), and the layer one
product::

    MatMul(x, W)       ->  MatMulNBits(Concat(x, MatMul(x, A)), [Q(W); Q(B)])    (K + p + r rows)

(``p = -K mod block``: when ``K`` is not a multiple of the block, ``A`` starts with ``p`` zero
columns that meet the zero-padded rows of ``W``'s last block, so ``B`` starts a block of its own.)

The ``(x A) B`` product and the ``Add`` of its output leave the graph (about three passes over
the output) for one copy of the input: worth it where the output is at least as wide as the
input, so narrower layers (a feed-forward block's second projection) keep the separate branch.
MiniLM with rank-32 branches (block 64, 30 of 36 layers stacked): x1.06 at batch 64, x1.01 at
batch 1, at the same quality (``benchmarks/int4.py --branch-pair``).  ``B`` in 4 bits costs a padded
block per column, more than int8 factors when ``r`` is well below the block size: a branch is
stacked only when that costs at most :data:`STACK_BYTES` times the separate branch's bytes (about
``r >= block / 2``).  The byte budget counts each form as written.

With input statistics the blocks are rounded with error feedback by the layer's input Gram
(``int4_rounding="gptq"``, :mod:`~onnx_lowrank.linalg.quant`, "Error feedback"): the same
layout, bytes and speed, far less output error (MiniLM, block 32: held-out cosine 0.9796 with
nearest rounding, 0.9921 with feedback, no branch).  Then ``int4_correction="auto"`` adds no
branch; with nearest rounding it keeps half the whitened residual's energy.

``Gemm`` maps when the weight is its second input and ``transA = 0`` (a ``transB = 1`` weight is
quantized transposed); ``alpha``, ``beta`` and ``C`` stay in the graph unchanged (but a ``C``
folded into the bias input, below).  Anything else
(``MatMul(W, x)``, ``Gemm`` with ``transA = 1`` or the weight first, weights that are not
float32 2-D matrices, weights that something other than a supported product also reads) stays
float, with the reason in the report.  The float weight leaves the file: only the codes, scales
and zero points (and the branch) remain.

Weights read inside If/Loop/Scan bodies are quantized too (an optimum merged decoder reads every
weight from its If's two branches): each reader in any graph is rewritten where it is, and the
new initializers go into the main graph, which every body sees.  Input statistics reach the
main graph and If branches (:mod:`.statistics`); a weight read only in a Loop/Scan body gets
plain rounding and, when asked, the plain residual's branch (the report says which).

Mean correction: with input statistics, a MatMul weight read by one node is fitted in the space
whitened by the *centred* input covariance ``G - n mu mu^T`` (``mu`` the mean input row), and
the error's mean part, ``mu (W - W^)`` for the weight ``W^`` the 4-bit blocks and branch compute,
goes into ``MatMulNBits``'s bias (the folded bias plus this shift, or a new one).  Then what the
layer gets wrong on the calibration rows is exactly the centred error the fit minimized: the
branch spends no rank on the mean direction, which the bias repairs for free (MiniLM, block 32,
no branch: held-out cosine 0.9763 -> 0.9796).  A Gemm user takes it when ``alpha = 1`` and its
``C`` is absent or the bias it folds (``beta = 1``).  Not for weights several nodes read or a
runtime without the bias input.  Adaptive mode measures the corrected form where it can feed the
shift (:func:`mean_biases`: a bias only the layer reads; both projections of a feed-forward block
it sizes too, :func:`emulated_block`) and the uncorrected one elsewhere; the quantize stage then
corrects exactly the layers measured corrected.

The rank per layer comes from the energy of the whitened residual (``int4_correction``: an
energy, or a fixed rank, at most ``int4_max_rank``), whitened by the input Gram the statistics
stage captured (``data_aware`` with calibration data).  Without statistics the plain residual
is fitted, which removes little; the report says which.

Low-rank factors (the correction branches, and the factor pairs the factorization produced)
are stored per ``int4_factors``: ``int8`` (symmetric, one scale per singular direction, read by
``Cast`` and ``Mul``, which onnxruntime folds into a float factor at session start) or ``float``.  Factor pairs are not
quantized to 4 bits: their ranks were chosen for float factors, 4-bit codes on both factors
compound, and at ``r (m + n)`` weights they are already a small part of the bytes.

``MatMulNBits`` is a contrib op: before any work, :func:`require_runtime` checks that the
installed onnxruntime creates and runs a one-node model in exactly the layout written here, and
refuses otherwise.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank import io, linalg
from onnx_lowrank.errors import UsageError, option, option_value
from onnx_lowrank.linalg import quant
from onnx_lowrank.pipeline import Context, StageResult

from .rewrite import NameScope, opset_version, remove_constant
from .scopes import Const, Scopes, Site

__all__ = ["DOMAIN", "Int4Options", "Int4Layer", "Int4Pair", "Int4Summary", "Int4Quantized", "quantize_int4",
           "runtime_problem", "require_runtime", "run_stage", "weight_bytes", "emulated_weight", "emulated_corrected",
           "MeanBias", "mean_biases", "float_pairs", "input_mean", "stored_factor", "unit_candidates", "emulated_block"]

log = logging.getLogger(__name__)

DOMAIN = "com.microsoft"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
#: A branch is stacked only when that stores at most this many times the separate branch's bytes
#: (``B``'s 4-bit rows fill whole blocks: a rank well below the block size would cost more).
STACK_BYTES = 1.125
FACTOR_STORAGE = ("int8", "float")


@dataclass(frozen=True)
class Int4Options:
    """How :func:`quantize_int4` quantizes (the ``int4_*`` options of ``compress()``).

    Attributes:
        block: Rows per block (``int4_block``).
        accuracy_level: ``MatMulNBits``'s compute type (``int4_accuracy_level``; 0: unset).
        energy: Correction rank per layer: the smallest holding this share of the residual's
            energy; or ``rank``, a fixed rank.  Both ``None`` (or ``rank=0``): no correction.
        max_rank: The most any correction gets.
        factors: How low-rank factors are stored: ``int8`` or ``float``.
        damping: Relative damping of the input Grams.
        rounds: Alternations of blocks and branch (:func:`~onnx_lowrank.linalg.quant.fit`).
        branch: Where a branch's second factor goes (``auto``: stacked where it pays; ``separate``).
        rounding: ``gptq`` (error feedback in the metric of the input Gram, where there is one)
            or ``nearest``.
    """

    block: int = 32
    accuracy_level: int = 0
    energy: float | None = None
    rank: int | None = None
    max_rank: int = 64
    factors: str = "int8"
    damping: float = linalg.DEFAULT_DAMPING
    rounds: int = 2
    branch: str = "auto"
    rounding: str = "gptq"

    @property
    def corrects(self) -> bool:
        return self.energy is not None or bool(self.rank)

    def stacks(self, k: int, n: int, rank: int, opset: int) -> bool:
        """Whether a rank-``rank`` branch of a ``(k, n)`` weight goes inside the blocks (module
        docstring, "Stacked branches"): ``branch="auto"``, int8 factors, ``n >= k``, at most
        :data:`STACK_BYTES` times the separate branch's bytes, a ``Concat`` that takes axis -1
        (opset 11), and a runtime that reads a partial last block."""
        return (self.branch == "auto" and rank > 0 and self.factors == "int8" and n >= k and opset >= 11
                and quant.stacked_bytes(k, n, rank, self.block) <= STACK_BYTES * quant.branch_bytes(k, n, rank, "int8")
                and runtime_problem(self.block, self.accuracy_level, partial=True) is None)

    def branch_bytes(self, k: int, n: int, rank: int, opset: int) -> int:
        """Bytes of a rank-``rank`` branch of a ``(k, n)`` weight in the form it will take."""
        if self.stacks(k, n, rank, opset):
            return quant.stacked_bytes(k, n, rank, self.block)
        return quant.branch_bytes(k, n, rank, self.factors)

    def describe(self) -> str:
        if self.energy is not None:
            return f"energy {self.energy:g} (at most rank {self.max_rank})"
        return f"rank {self.rank}" if self.rank else "off"


# --------------------------------------------------------------------------------------------
# Whether the runtime has the op
# --------------------------------------------------------------------------------------------

def _nbits_node(x: str, names: tuple[str, str, str], out: str, k: int, n: int, opts: Int4Options, name: str = "",
                bias: str | None = None) -> onnx.NodeProto:
    kw: dict[str, Any] = {"K": k, "N": n, "bits": 4, "block_size": opts.block}
    if opts.accuracy_level:
        kw["accuracy_level"] = opts.accuracy_level
    inputs = [x, *names] + (["", bias] if bias else [])  # (no g_idx; bias is input 5)
    return helper.make_node("MatMulNBits", inputs, [out], name=name, domain=DOMAIN, **kw)


@functools.lru_cache(maxsize=None)
def runtime_problem(block: int = 32, accuracy_level: int = 0, bias: bool = False, partial: bool = False) -> str | None:
    """Why the installed onnxruntime cannot run the ``MatMulNBits`` this module writes (``None``: it can).

    A one-node model in exactly the written layout is created and run on the CPU, and its
    output checked against ``x @ dequantize(...)`` (``+ bias`` with ``bias``, the optional input
    the pass folds a bias into when the runtime takes it): a runtime that reads the layout
    differently is refused too.  ``partial``: ``K`` not a multiple of the block (a stacked
    branch's rows end in a padded block).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
        return f"onnxruntime is not importable ({exc})"
    k, n = 2 * block + (3 if partial else 0), 8
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    q = quant.quantize_blocks(w, block)
    opts = Int4Options(block=block, accuracy_level=accuracy_level)
    inits = [numpy_helper.from_array(q.packed, "B"), numpy_helper.from_array(q.scales, "S"),
             numpy_helper.from_array(q.zero_points, "Z")]
    b = rng.standard_normal(n).astype(np.float32) if bias else np.zeros(n, np.float32)
    if bias:
        inits.append(numpy_helper.from_array(b, "C"))
    graph = helper.make_graph([_nbits_node("x", ("B", "S", "Z"), "y", k, n, opts, bias="C" if bias else None)], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = min(model.ir_version, 8)
    x = rng.standard_normal((2, k)).astype(np.float32)
    try:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 4
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": x})[0]
    except Exception as exc:  # onnxruntime raises its own exception types
        text = str(exc).strip().splitlines()
        return f"onnxruntime {getattr(ort, '__version__', '?')} cannot run it ({text[0] if text else type(exc).__name__})"
    ref = x.astype(np.float64) @ quant.dequantize(q).astype(np.float64) + b
    tol = 0.05 if accuracy_level == 4 else 1e-4  # level 4 rounds x to int8
    if y.shape != ref.shape or not np.allclose(y, ref, rtol=tol, atol=tol * float(np.abs(ref).max())):
        return f"onnxruntime {ort.__version__} reads the weight layout differently than written"
    return None


def require_runtime(block: int = 32, accuracy_level: int = 0) -> None:
    """Refuse (one line) when the runtime cannot run ``MatMulNBits`` as written.

    Raises:
        UsageError: naming the problem, and what to do instead.
    """
    problem = runtime_problem(block, accuracy_level)
    if problem is not None:
        raise UsageError(f"{option_value('quantize', 'int4')} needs onnxruntime's MatMulNBits (block {block}, accuracy level "
                         f"{accuracy_level}), but {problem}; upgrade onnxruntime (pip install -U onnxruntime), or use "
                         f"{option_value('quantize', 'int8-per-channel')}.")


# --------------------------------------------------------------------------------------------
# What the report says
# --------------------------------------------------------------------------------------------

@dataclass
class Int4Layer:
    """One weight quantized to int4.

    Attributes:
        weight: The weight's name; ``nodes`` the nodes that used it.
        shape: ``(K, N)`` as multiplied (``x @ W``).
        rank: The correction's rank (0: none); ``energy`` the residual share it holds.
        whitened: Whether the correction was fitted in the whitened space.
        bytes_before, bytes_after: The float weight; the codes, scales, zero points and branch.
        error_int4, error_corrected: ``||L^T (W - Q(W))|| / ||L^T W||`` before and after the
            branch (``L`` the whitening factor; the plain Frobenius ratio without statistics).
        stacked: The branch's second factor rides in the 4-bit blocks (module docstring).
        mean_corrected: Fitted on centred inputs, the error's mean part in the bias (module docstring).
        rounding: How the blocks were rounded: ``gptq`` (error feedback by the input Gram) or
            ``nearest`` (asked for, or no Gram to feed the error by).
        mean_shared: Its mean input was known but several nodes read it (both branches of a
            merged decoder's If, say), so no one bias can take the mean correction.
    """

    weight: str
    nodes: list[str]
    shape: tuple[int, int]
    block: int
    rank: int
    energy: float
    whitened: bool
    bytes_before: int
    bytes_after: int
    error_int4: float
    error_corrected: float
    stacked: bool = False
    mean_corrected: bool = False
    rounding: str = "nearest"
    mean_shared: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"weight": self.weight, "nodes": self.nodes, "shape": list(self.shape), "block": self.block, "rank": self.rank,
                "branch": ("stacked" if self.stacked else "separate") if self.rank else None,
                "whitened": self.whitened if self.rank else None,  # (of the branch: none at rank 0)
                "mean_corrected": self.mean_corrected, "mean_shared": self.mean_shared, "rounding": self.rounding, "energy": round(self.energy, 4),
                "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "error_int4": round(self.error_int4, 5),
                "error_corrected": round(self.error_corrected, 5)}


@dataclass
class Int4Pair:
    """A factor (of the factorization) stored per ``int4_factors``."""

    factor: str
    storage: str
    bytes_before: int
    bytes_after: int

    def to_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "storage": self.storage, "bytes_before": self.bytes_before, "bytes_after": self.bytes_after}


@dataclass
class Int4Summary:
    """What :func:`quantize_int4` did: per weight, per factor, and what it left float and why."""

    options: Int4Options
    layers: list[Int4Layer] = field(default_factory=list)
    factors: list[Int4Pair] = field(default_factory=list)
    left_float: dict[str, str] = field(default_factory=dict)
    statistics: str = "plain"
    auto: bool = False
    budget: bool = False

    def to_dict(self) -> dict[str, Any]:
        o = self.options
        before = sum(l.bytes_before for l in self.layers) + sum(p.bytes_before for p in self.factors)
        after = sum(l.bytes_after for l in self.layers) + sum(p.bytes_after for p in self.factors)
        correction = ("ranks chosen by the byte budget" if self.budget else f"auto: {o.describe()}" if self.auto
                      else o.describe())
        used = sorted({l.rank for l in self.layers if l.rank > 0})
        if used and not self.budget and (o.energy is not None or max(used) < o.rank):  # what was asked is not what ran
            correction += f"; ranks used {used[0]}" + (f"-{used[-1]}" if len(used) > 1 else "")
        return {
            "mode": "int4", "block": o.block, "accuracy_level": o.accuracy_level,
            "correction": correction,
            "factor_storage": o.factors, "branch": o.branch, "statistics": self.statistics,
            "weights_quantized": len(self.layers), "corrected": sum(l.rank > 0 for l in self.layers),
            "stacked": sum(l.stacked for l in self.layers), "mean_corrected": sum(l.mean_corrected for l in self.layers),
            "rounding": o.rounding, "gptq_rounded": sum(l.rounding == "gptq" for l in self.layers),
            "whitened": sum(l.whitened and l.rank > 0 for l in self.layers),
            "correction_ranks": sum(l.rank for l in self.layers),
            "matmul_weight_bytes_before": before, "matmul_weight_bytes_after": after,
            "layers": [l.to_dict() for l in self.layers], "factors": [p.to_dict() for p in self.factors],
            "left_float": dict(self.left_float),
        }


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------

def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _orientation(sc: Scopes, users: list[Site], opset: int) -> tuple[bool | None, str | None]:
    """Whether the weight is multiplied transposed (a ``transB`` Gemm), or why it cannot map."""
    transposed: set[bool] = set()
    for site in users:
        if site.node < 0:
            return None, ("the float weight is also a graph output" if site.graph == 0 else
                          "the float weight is also an output of an If/Loop/Scan body")
        node = sc.node(site)
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
            return None, f"the float weight is also read by {node.op_type} '{node.name}'"
        if site.slot == 0:
            return None, f"{node.op_type} '{node.name}' takes the weight as its first input (W @ x); MatMulNBits computes x @ W"
        if site.slot != 1:
            return None, f"{node.op_type} '{node.name}' also reads it as input {site.slot} (not the weight of x @ W)"
        if node.op_type == "Gemm":
            if opset < 7:
                return None, f"Gemm '{node.name}' is at opset {opset} (its bias broadcasts by attribute before opset 7)"
            if int(_attr(node, "transA", 0)):
                return None, f"Gemm '{node.name}' transposes its input (transA=1)"
            transposed.add(bool(int(_attr(node, "transB", 0))))
        else:
            transposed.add(False)
    if len(transposed) != 1:
        return None, "its users multiply it in different orientations"
    return transposed.pop(), None


def _add_init(graph: onnx.GraphProto, ir_version: int, arr: np.ndarray, name: str) -> str:
    t = numpy_helper.from_array(arr, name)
    graph.initializer.append(t)
    if ir_version < 4:  # IR < 4 lists every initializer as a graph input
        graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    return name


class _Builder:
    """Collects the nodes that go before every other node of the main graph (dequantized
    factors) and the replacement nodes of each rewritten user, by ``(graph, node index)``.  New
    initializers go into the main graph, which every body sees."""

    def __init__(self, model: onnx.ModelProto, opts: Int4Options, sc: Scopes, overridable: set[str], data: io.DataFiles):
        self.model, self.graph, self.opts, self.data = model, model.graph, opts, data
        self.names = NameScope(model)
        self.opset = opset_version(model)
        self.head: list[onnx.NodeProto] = []
        self.replace: dict[tuple[int, int], list[onnx.NodeProto]] = {}
        self.sc, self.overridable = sc, overridable  # (of the model as read; overridable: the main graph's inputs)
        self.takes_bias = runtime_problem(opts.block, opts.accuracy_level, bias=True) is None
        self.gone: set[tuple[int, str]] = set()  # outputs of products whose bias Add was folded (no longer computed)
        self.corrected_readers: dict[tuple[int, str], int] = {}  # per bias constant: its readers a corrected copy took

    def bias(self, g: int, name: str | None, n: int) -> bool:
        """Whether ``name``, read in graph ``g``, is a constant ``MatMulNBits`` can take as its
        bias: float32, ``(n,)``."""
        c = self.sc.const(g, name) if self.takes_bias else None
        return (c is not None and not (c.graph == 0 and c.name in self.overridable)
                and c.tensor.data_type == TensorProto.FLOAT and list(c.tensor.dims) == [n])

    def bias_add(self, site: Site, n: int) -> tuple[int, str] | None:
        """The ``Add`` of a bias after the MatMul at ``site`` (its only reader, in the same
        graph), as ``(node index, bias name)``; ``None`` when there is none to fold."""
        g, node = site.graph, self.sc.node(site)
        if node.op_type != "MatMul":
            return None
        readers = self.sc.readers.get((g, node.output[0]), [])
        if len(readers) != 1 or readers[0].node < 0 or readers[0].graph != g:
            return None
        j = readers[0].node
        add = self.sc.graphs[g].node[j]
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2 or (g, j) in self.replace:
            return None
        other = add.input[1 - readers[0].slot]
        return (j, other) if other != node.output[0] and self.bias(g, other, n) else None

    def init(self, arr: np.ndarray, base: str) -> str:
        return _add_init(self.graph, self.model.ir_version, arr, self.names.fresh(base))

    def factor(self, arr: np.ndarray, base: str, axis: int) -> tuple[str, int]:
        """A factor as the graph reads it: an initializer, or int8 codes dequantized by a node.
        ``axis``: the factor's rank axis (one scale per singular direction).  Returns the value
        name and the bytes stored."""
        arr = np.asarray(arr, np.float32)
        if self.opts.factors == "float" or self.opset < 7:  # before opset 7 Mul broadcasts only by attribute
            return self.init(arr, base), arr.nbytes
        moved = np.moveaxis(arr, axis, 1) if arr.ndim == 2 else arr
        q, scale = quant.quantize_columns(moved)
        q = np.ascontiguousarray(np.moveaxis(q, 1, axis))
        qn = self.init(q, f"{base}_int8")
        out = self.names.fresh(base)
        # Cast and Mul, not DequantizeLinear: onnxruntime folds Cast and Mul of constants into one
        # float factor when the session starts, which the MatMul then pre-packs; it keeps a
        # DequantizeLinear (for its QDQ fusions), so the MatMul would unpack the factor on every
        # run (the thin x @ A product ran 2.4x slower that way on MiniLM at batch 64).
        cast = self.names.fresh(f"{base}_float")
        shape = [1, 1]
        shape[axis] = scale.size
        sn = self.init(scale.reshape(shape), f"{base}_scale_{'row' if axis == 1 else 'col'}")
        self.head.append(helper.make_node("Cast", [qn], [cast], name=self.names.fresh(f"{base}_cast"), to=TensorProto.FLOAT))
        self.head.append(helper.make_node("Mul", [cast, sn], [out], name=self.names.fresh(f"{base}_dequantize")))
        return out, q.nbytes + scale.nbytes

    def finish(self) -> None:
        # Bodies before the graphs that hold them: writing a graph's node list copies its nodes,
        # so a body changed after its parent would be a detached copy.
        for g in reversed(range(len(self.sc.graphs))):
            graph = self.sc.graphs[g]
            if g and not any(key[0] == g for key in self.replace):
                continue
            nodes = list(self.head) if g == 0 else []
            for i, node in enumerate(graph.node):
                nodes.extend(self.replace.get((g, i), [node]))
            del graph.node[:]
            graph.node.extend(nodes)
            kept = [v for v in graph.value_info if (g, v.name) not in self.gone]
            if len(kept) < len(graph.value_info):
                del graph.value_info[:]
                graph.value_info.extend(kept)
        if not any(o.domain == DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
        graphs = list(io.iter_graphs(self.model.graph))  # (the same walk, so the same numbers)
        assert len(graphs) == len(self.sc.graphs)
        self.sc.graphs = graphs


def _user_nodes(b: _Builder, g: int, node: onnx.NodeProto, packed: tuple[str, str, str], k: int, n: int,
                branch: tuple[str, str] | None, bias: str | None = None, out: str | None = None,
                stacked: tuple[str, int] | None = None) -> list[onnx.NodeProto]:
    """The nodes that replace one MatMul/Gemm user, of graph ``g`` (module docstring); ``bias``: a folded bias
    Add's constant, ``out`` that Add's output (what the nodes then compute); ``stacked``: the
    first factor of a branch whose second factor is in ``packed`` (``branch`` is then ``None``)
    and its columns (the rank and the zero columns before it), the rows ``packed`` gains."""
    x, out = node.input[0], out or node.output[0]
    base = node.name or out
    nodes = []
    if stacked is not None:
        a, rank = stacked
        mid = b.names.fresh(f"{out}_lqer_mid")
        nodes.append(helper.make_node("MatMul", [x, a], [mid], name=b.names.fresh(f"{base}_lqer_a")))
        cat = b.names.fresh(f"{out}_lqer_in")
        nodes.append(helper.make_node("Concat", [x, mid], [cat], name=b.names.fresh(f"{base}_lqer_in"), axis=-1))
        x, k = cat, k + rank
    is_gemm = node.op_type == "Gemm"
    alpha = float(_attr(node, "alpha", 1.0)) if is_gemm else 1.0
    beta = float(_attr(node, "beta", 1.0)) if is_gemm else 1.0
    c = node.input[2] if is_gemm and len(node.input) > 2 and node.input[2] else None
    if c is not None and alpha == 1.0 and beta == 1.0 and b.bias(g, c, n):
        bias, c = bias or c, None  # Gemm's C is the bias (or inside the mean-corrected one passed)
    has_c = c is not None and beta != 0.0
    last_is_nbits = branch is None and alpha == 1.0 and not has_c
    y = out if last_is_nbits else b.names.fresh(f"{out}_q4")
    nodes.append(_nbits_node(x, packed, y, k, n, b.opts, name=b.names.fresh(f"{base}_q4"), bias=bias))
    steps: list[tuple[str, list[str], dict[str, Any]]] = []
    if branch is not None:
        mid = b.names.fresh(f"{out}_lqer_mid")
        nodes.append(helper.make_node("MatMul", [x, branch[0]], [mid], name=b.names.fresh(f"{base}_lqer_a")))
        corr = b.names.fresh(f"{out}_lqer")
        nodes.append(helper.make_node("MatMul", [mid, branch[1]], [corr], name=b.names.fresh(f"{base}_lqer_b")))
        steps.append(("Add", [corr], {}))
    if alpha != 1.0:
        steps.append(("Mul", [b.init(np.array(alpha, np.float32), f"{base}_alpha")], {}))
    if has_c:
        if beta != 1.0:
            scaled = b.names.fresh(f"{c}_beta")
            nodes.append(helper.make_node("Mul", [c, b.init(np.array(beta, np.float32), f"{base}_beta")], [scaled],
                                          name=b.names.fresh(f"{base}_beta")))
            c = scaled
        steps.append(("Add", [c], {}))
    for j, (op, args, kw) in enumerate(steps):
        nxt = out if j == len(steps) - 1 else b.names.fresh(f"{out}_{op.lower()}")
        nodes.append(helper.make_node(op, [y, *args], [nxt], name=b.names.fresh(f"{base}_{op.lower()}"), **kw))
        y = nxt
    return nodes


def weight_bytes(model: onnx.ModelProto, op_types: Iterable[str] = ("MatMul", "Gemm", "MatMulNBits", "DequantizeLinear",
                                                                      "MatMulInteger", "DynamicQuantizeMatMul")) -> int:
    """Bytes of the main graph's constants read by ``op_types`` nodes (MatMul weights and their
    codes, scales and zero points; int8 factors through their ``Cast`` and the ``Mul`` by their
    scales), their bias inputs aside (as the report's ``tensor bytes`` counts them)."""
    from .load import BIAS_SLOTS, code_dequantizers

    sc = Scopes(model.graph)
    wanted = set(op_types)
    dequantizers = code_dequantizers(model.graph, {key[1]: c.tensor for key, c in sc.consts.items() if key[0] == 0})
    seen: set[tuple[int, str]] = set()
    total = 0
    for g, graph in enumerate(sc.graphs):
        for node in graph.node:
            if node.op_type in wanted or (g == 0 and node.output and node.output[0] in dequantizers):
                for slot, name in enumerate(node.input):
                    c = sc.const(g, name)
                    if c is not None and c.key not in seen and slot != BIAS_SLOTS.get(node.op_type, -1):
                        seen.add(c.key)
                        total += io.tensor_nbytes(c.tensor)
    return total


def quantize_int4(model: onnx.ModelProto, *, base_dir: str | io.DataFiles | None = None, options: Int4Options = Int4Options(),
                  weights: Iterable[str] | None = None, grams: Mapping[str, np.ndarray] | None = None,
                  factors: Iterable[str] = (), inline: bool = True, skipped: Mapping[str, str] | None = None,
                  ranks: Mapping[str, int] | None = None,
                  means: Mapping[str, tuple[np.ndarray, int]] | None = None) -> tuple[onnx.ModelProto, Int4Summary]:
    """Quantize constant MatMul/Gemm weights to int4 ``MatMulNBits``, with a correction branch.

    Args:
        model: The model; left unmodified.
        base_dir: Where its external data references point.
        options: Block size, accuracy level, correction rule, factor storage.
        weights: Names of the weights to quantize; ``None``: every main-graph constant that
            only MatMul/Gemm nodes read (``factors`` aside).
        grams: Per weight name, its input Gram ``X^T X`` (K, K); a weight without one gets the
            plain residual SVD.
        factors: Names of low-rank factors (of the factorization) to store per ``options.factors``.
        inline: Read external data into the result (else unchanged tensors keep their references).
        skipped: Per weight name, why it has no statistics (for the report).
        ranks: Per weight name, its branch's rank (a byte budget's choice), instead of ``options``'s rule.
        means: Per weight name, its mean input row and the rows behind it (with ``grams``): the
            mean correction (module docstring).

    Returns:
        The new model and what was done.
    """
    from .quantize import _check_float32

    _check_float32(model)
    require_runtime(options.block, options.accuracy_level)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    data = io.as_data(base_dir)
    grams = dict(grams or {})
    factor_names = [f for f in factors]
    summary = Int4Summary(options)
    sc = Scopes(out.graph)
    consts = sc.consts

    def keys(name: str) -> list[tuple[int, str]]:  # (a name may be defined in several bodies)
        return [key for key in consts if key[1] == name]

    if weights is None:
        skip = set(factor_names)
        todo = [key for key, c in consts.items() if c.name not in skip and len(c.tensor.dims) == 2
                and any(u.node >= 0 and u.slot == 1 and sc.node(u).op_type in ("MatMul", "Gemm") for u in sc.readers.get(key, []))]
    else:
        todo = []
        for name in dict.fromkeys(weights):
            found = keys(name)
            if not found:
                summary.left_float[name] = "not a constant of the model"
            todo.extend(found)
    inputs = {v.name for v in out.graph.input}
    b = _Builder(out, options, sc, inputs, data)
    means = dict(means or {})
    done: list[Const] = []
    for key in todo:
        c, name = consts[key], key[1]
        users = sc.readers.get(key, [])
        why = _why_not(c, users, inputs, out)
        if why is None:
            transposed, why = _orientation(sc, users, b.opset)
        if why is not None:
            summary.left_float[name] = why
            log.debug("int4: %s stays float: %s", name, why)
            continue
        w = data.read(c.tensor).astype(np.float32)
        wk = np.ascontiguousarray(w.T) if transposed else w
        try:
            layer = _quantize_one(b, name, wk, grams.get(name), users, None if ranks is None else ranks.get(name, 0),
                                  means.get(name))
        except ValueError as exc:
            summary.left_float[name] = f"cannot quantize: {exc}"
            continue
        summary.layers.append(layer)
        done.append(c)
    for key in [key for name in dict.fromkeys(factor_names) for key in keys(name)]:
        c, name = consts[key], key[1]
        users = sc.readers.get(key, [])
        if options.factors == "float":
            n_bytes = io.tensor_nbytes(c.tensor)
            summary.factors.append(Int4Pair(name, "float", n_bytes, n_bytes))
            continue
        why = _factor_why_not(c, users, inputs, out, sc)
        if why is not None:
            n_bytes = io.tensor_nbytes(c.tensor)
            summary.factors.append(Int4Pair(name, "float", n_bytes, n_bytes))
            summary.left_float[name] = why
            continue
        arr = data.read(c.tensor).astype(np.float32)
        value, n_bytes = b.factor(arr, f"{name}_q", axis=int(np.argmin(arr.shape)))
        for u in users:
            sc.node(u).input[u.slot] = value
        summary.factors.append(Int4Pair(name, "int8", arr.nbytes, n_bytes))
        done.append(c)
    b.finish()
    for key, taken in b.corrected_readers.items():  # a bias whose corrected copies took every reader
        if taken == len(sc.readers.get(key, [])):
            remove_constant(sc.graphs[key[0]], key[1], constant=consts[key].node is not None)
    for c in done:
        remove_constant(sc.graphs[c.graph], c.name, constant=c.node is not None)
    if inline:
        io.read_in(out, data)
    summary.statistics = _statistics_note(summary, skipped or {})
    log.info("int4: %d weight(s) as MatMulNBits (block %d), %d with a correction branch (%d whitened); %d left float",
             len(summary.layers), options.block, sum(l.rank > 0 for l in summary.layers),
             sum(l.rank > 0 and l.whitened for l in summary.layers), len(summary.left_float))
    return out, summary


def _statistics_note(summary: Int4Summary, skipped: Mapping[str, str]) -> str:
    note = _statistics_note_body(summary, skipped)
    shared = sum(l.mean_shared for l in summary.layers)
    if shared:  # (a merged decoder's weights: one reader in each If branch)
        why = f"no mean correction for {shared} weight(s) several nodes read (one bias cannot hold it for all)"
        return why if note == "no mean correction" else f"{note}; {why}"
    return note


def _statistics_note_body(summary: Int4Summary, skipped: Mapping[str, str]) -> str:
    white = sum(l.whitened for l in summary.layers)
    hint = f"pass {option('data_aware')} with {option('calib')} to whiten"
    plain = [l.weight for l in summary.layers if not l.whitened]
    explained = bool(plain) and all(w in skipped for w in plain)
    if explained:  # statistics were captured, but not of these weights: say why
        whys = sorted({_bare_reason(skipped[w]) for w in plain})
        hint = whys[0] if len(whys) == 1 else "; ".join(whys[:2]) + ("; ..." if len(whys) > 2 else "")
    if not summary.layers:
        return "no weight in 4-bit blocks"
    if not any(l.rank for l in summary.layers):  # (the summary line says "no correction branch" before this)
        mean = sum(l.mean_corrected for l in summary.layers)
        if mean:
            return f"the 4-bit error's mean in the bias of {mean} of {len(summary.layers)} weight(s)"
        if white == 0:
            return f"no input statistics: {hint}" if explained else f"no input statistics; {hint} and correct"
        return "no mean correction"
    if white == len(summary.layers):
        return "whitened by each layer's input Gram"
    if white == 0:
        return f"plain residual SVD (no input statistics: {hint})"
    return f"whitened for {white} of {len(summary.layers)} weight(s); plain residual SVD for the others ({hint})"


def _bare_reason(why: str) -> str:
    """A statistics stage's reason for a weight, without its ``data-aware:`` tag and its note on
    the factorization's fallback."""
    why = why.removeprefix("data-aware: ")
    return why.split("; plain SVD used")[0]


def _why_not(c: Const, users: list[Site], inputs: set[str], model: onnx.ModelProto) -> str | None:
    if c.graph == 0 and c.name in inputs and c.node is None and model.ir_version >= 4:
        return "it is a graph input (a caller may feed another value)"
    if c.graph and model.ir_version < 4 and c.node is None:
        return f"an initializer of an If/Loop/Scan body at IR version {model.ir_version} (below 4 it is also a body input)"
    if not users:
        return "no node reads it"
    if c.tensor.data_type != TensorProto.FLOAT:
        return f"MatMulNBits takes float32 weights here; this one is {TensorProto.DataType.Name(c.tensor.data_type)}"
    if len(c.tensor.dims) != 2:
        return f"not a 2-D matrix (shape {list(c.tensor.dims)})"
    return None


def _factor_why_not(c: Const, users: list[Site], inputs: set[str], model: onnx.ModelProto, sc: Scopes) -> str | None:
    if c.tensor.data_type != TensorProto.FLOAT or len(c.tensor.dims) != 2:
        return "int8 storage takes float32 2-D factors"
    if c.graph == 0 and c.name in inputs and c.node is None and model.ir_version >= 4:  # (IR < 4 lists every initializer)
        return "the factor is a graph input"
    if c.graph and model.ir_version < 4 and c.node is None:
        return f"an initializer of an If/Loop/Scan body at IR version {model.ir_version} (below 4 it is also a body input)"
    if not users or any(u.node < 0 or sc.node(u).op_type not in ("MatMul", "Gemm") for u in users):
        return "the factor is read by something other than MatMul/Gemm"
    return None


def _mean_target(b: _Builder, users: list[Site], n: int) -> tuple[str | None] | None:
    """Where a mean correction goes: ``(bias constant or None,)`` for a weight read by one
    MatMul (its folded bias, or none) or one Gemm with ``alpha = 1`` whose ``C`` is absent or a
    bias it folds (``beta = 1``), when the runtime takes a bias input; ``None`` otherwise."""
    if len(users) != 1 or not b.takes_bias:
        return None
    node = b.sc.node(users[0])
    if node.op_type == "Gemm":
        c = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if float(_attr(node, "alpha", 1.0)) != 1.0:
            return None
        if c is None:
            return (None,)
        return (c,) if float(_attr(node, "beta", 1.0)) == 1.0 and b.bias(users[0].graph, c, n) else None
    folded = b.bias_add(users[0], n)
    return (folded[1] if folded is not None else None,)


def _quantize_one(b: _Builder, name: str, wk: np.ndarray, gram: np.ndarray | None, users: list[Site],
                  rank: int | None = None, mean: tuple[np.ndarray, int] | None = None) -> Int4Layer:
    """Quantize one weight (as multiplied, ``x @ wk``), fit its branch (of ``rank``, else by the
    options' rule), and schedule its users' rewrite; ``mean``: the mean input row and the rows
    behind it, for the mean correction (module docstring)."""
    opts = b.opts
    k, n = wk.shape
    if gram is not None and gram.shape != (k, k):
        log.debug("int4: %s: Gram of shape %s does not fit (%d, %d); plain residual used", name, gram.shape, k, n)
        gram = None
    target = _mean_target(b, users, n) if gram is not None and mean is not None and mean[0].shape == (k,) else None
    if target is not None:
        centred = _centred(gram, mean)
        if centred is not None:
            gram = centred
        else:  # inputs that never vary: nothing to whiten by
            target = None
    if rank is not None:
        f = quant.fit(wk, gram, block=opts.block, rank=rank, max_rank=rank or None, damping=opts.damping, rounds=opts.rounds,
                      rounding=opts.rounding)
    else:
        f = quant.fit(wk, gram, block=opts.block, energy=opts.energy, rank=None if opts.energy is not None else opts.rank,
                      max_rank=opts.max_rank, damping=opts.damping, rounds=opts.rounds, rounding=opts.rounding)
    q, corr, error = f.q, f.correction, f.error
    stack = quant.stacked(wk, q, corr, gram, damping=opts.damping) if opts.stacks(k, n, corr.rank, b.opset) else None
    if stack is not None:
        q, error = quant.stack_blocks(q, stack.b), stack.error
    packed = (b.init(q.packed, f"{name}_q4"), b.init(q.scales, f"{name}_q4_scales"), b.init(q.zero_points, f"{name}_q4_zero_points"))
    n_bytes = q.nbytes
    branch = stacked = None
    if stack is not None:
        pad = quant.stack_padding(k, opts.block)  # zero columns: x A meets B's rows at a block's start
        a = np.concatenate([np.zeros((k, pad), np.float32), stack.a], axis=1)
        a_name, a_bytes = b.factor(a, f"{name}_lqer_a", axis=1)
        stacked = (a_name, pad + stack.rank)
        n_bytes += a_bytes
    elif corr.rank > 0:
        a_name, a_bytes = b.factor(corr.a, f"{name}_lqer_a", axis=1)
        b_name, b_bytes = b.factor(corr.b, f"{name}_lqer_b", axis=0)
        branch = (a_name, b_name)
        n_bytes += a_bytes + b_bytes
    shift_bias = None
    if target is not None:
        shift = mean[0] @ (wk.astype(np.float64) - _effective(wk, q, corr, stack, opts, b.opset))
        (old,) = target
        c = b.sc.const(users[0].graph, old) if old is not None else None
        base = np.zeros(n) if c is None else b.data.read(c.tensor).astype(np.float64).reshape(n)
        shift_bias = b.init((base + shift).astype(np.float32), f"{old or name}_mean_corrected")
        if c is not None:
            b.corrected_readers[c.key] = b.corrected_readers.get(c.key, 0) + 1
    for u in users:  # (a shifted bias: one MatMul user, _mean_target)
        node, graph = b.sc.node(u), b.sc.graphs[u.graph]
        folded = b.bias_add(u, n)
        if folded is None:
            b.replace[u.graph, u.node] = _user_nodes(b, u.graph, node, packed, k, n, branch, shift_bias, stacked=stacked)
        else:  # the nodes go where the Add was (its bias may be a Constant made after the MatMul)
            j, bias = folded
            b.replace[u.graph, j] = _user_nodes(b, u.graph, node, packed, k, n, branch, shift_bias or bias,
                                                graph.node[j].output[0], stacked)
            b.replace[u.graph, u.node] = []
            b.gone.add((u.graph, node.output[0]))
    return Int4Layer(name, [b.sc.node(u).name or b.sc.node(u).output[0] for u in users], (k, n), opts.block, corr.rank,
                     corr.energy, gram is not None, wk.size * 4, n_bytes, f.error_int4, error, stack is not None,
                     target is not None, f.rounding,
                     mean_shared=target is None and mean is not None and gram is not None and len(users) > 1)


def _centred(gram: np.ndarray, mean: tuple[np.ndarray, int]) -> np.ndarray | None:
    """The inputs' covariance (times the rows), ``G - n mu mu^T``, that a mean-corrected fit
    whitens by; ``None`` for inputs that never vary (nothing to whiten by)."""
    mu, rows = mean
    centred = gram - rows * np.outer(mu, mu)
    return centred if np.mean(np.diag(centred)) > 1e-9 * np.mean(np.diag(gram)) else None


def _effective(w: np.ndarray, q: quant.BlockQuantized, corr: quant.Correction, stack: quant.Stacked | None,
               opts: Int4Options, opset: int) -> np.ndarray:
    """What the written layer multiplies by (float64): the blocks as the runtime dequantizes them
    (``q`` with a stacked ``B`` below: only its first ``K`` rows) plus the branch as stored."""
    k = w.shape[0]
    eff = quant.dequantize(q).astype(np.float64)[:k]
    if stack is not None:
        return eff + stored_factor(stack.a, 1).astype(np.float64) @ quant.dequantize(stack.b).astype(np.float64)
    if corr.rank > 0:
        a, bb = np.asarray(corr.a, np.float32), np.asarray(corr.b, np.float32)
        if opts.factors == "int8" and opset >= 7:  # (before opset 7 the branch stays float)
            a, bb = stored_factor(a, 1), stored_factor(bb, 0)
        eff = eff + a.astype(np.float64) @ bb.astype(np.float64)
    return eff


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------

@dataclass
class Int4Quantized(StageResult):
    """The model with int4 weights and correction branches (the quantize stage, ``quantize="int4"``)."""

    section = "int4"
    model: onnx.ModelProto
    data: io.DataFiles
    summary: Int4Summary

    def to_dict(self) -> dict[str, Any]:
        return self.summary.to_dict()


#: The energy ``int4_correction="auto"`` asks for when there are input statistics and the blocks
#: are rounded to the nearest level.
AUTO_ENERGY = 0.5


def options_of(cfg: Any, whitened: bool = False) -> Int4Options:
    """The :class:`Int4Options` of a configuration (its ``int4_*`` options); ``whitened``: whether
    input statistics were captured.  ``auto`` corrects only with statistics and nearest rounding:
    error feedback (``gptq``) already takes what a branch would repair first, at no cost in bytes
    or time, and leaves a flat residual whose energy a branch buys dearly."""
    corr = cfg.int4_correction
    if corr == "auto":
        corr = AUTO_ENERGY if whitened and cfg.int4_rounding == "nearest" else 0
    energy = float(corr) if isinstance(corr, float) else None
    rank = int(corr) if isinstance(corr, int) and not isinstance(corr, bool) else None
    return Int4Options(block=cfg.int4_block, accuracy_level=cfg.int4_accuracy_level, energy=energy, rank=rank,
                       max_rank=cfg.int4_max_rank, factors=cfg.int4_factors, damping=cfg.damping,
                       branch=cfg.int4_branch, rounding=cfg.int4_rounding)


def run_stage(ctx: Context) -> Int4Quantized:
    """The quantize stage under ``quantize="int4"``: the dense weights the factorization left, with
    the input Grams of the statistics stage when it ran; the factor pairs per ``int4_factors``."""
    from .adaptive import Adapted
    from .discover import Discovery
    from .rewrite import Rewritten
    from .statistics import Statistics

    rewritten = ctx.need(Rewritten)
    found = ctx.need(Discovery)
    from .width import current_widths

    stats = ctx.get(Statistics)
    widths = current_widths(ctx)
    opts = options_of(ctx.config, whitened=stats is not None and ctx.config.data_aware)
    adapted = ctx.get(Adapted)
    # adaptive mode measured the 4-bit forms it chose among: correct only the layers it measured corrected
    measured = adapted.int4_means if adapted is not None and adapted.int4_ranks is not None else None
    weights, grams, skipped = [], {}, {}
    means: dict[str, tuple[np.ndarray, int]] = {}
    left: dict[str, str] = {}
    for group in found.groups:
        name = group.weight.name
        if group.key in rewritten.factors:
            continue
        if group.layers[0].is_conv:
            continue
        if group.skip is not None:
            left[name] = f"not a candidate: {group.skip.message}"
            continue
        weights.append(name)
        if stats is not None:
            if group.key in stats.capture.grams:
                gram = stats.capture.grams[group.key][0]
                plan = widths.get(group.key)
                mean = input_mean(stats.capture, group.key)
                if plan is not None and group.key == plan.block.down.key:  # narrowed: the kept neurons' statistics
                    keep = np.asarray(plan.fit.keep)
                    gram = gram[np.ix_(keep, keep)]
                    mean = (mean[0][keep], mean[1]) if mean is not None else None
                grams[name] = gram
                if mean is not None and (measured is None or group.key in measured):
                    means[name] = mean
            elif group.key in stats.capture.skipped:
                skipped[name] = stats.capture.skipped[group.key]
    factor_names = [f for key, pair in rewritten.factors.items() if not found.group(key).layers[0].is_conv for f in pair]
    from .decide import latest_decided

    budget = latest_decided(ctx, "int4_ranks")
    ranks = None
    if budget is not None:  # --target-bytes chose which weights take 4 bits, and each branch's rank
        ranks = {found.group(key).weight.name: r for key, r in budget.items()}
        outside = {g.weight.name for g in found.groups if g.weight.scope} if adapted is not None else set()
        for w in weights:
            if w not in ranks:
                left[w] = ("adaptive mode measures weights of the main graph only; kept float" if w in outside else
                           "kept float by the byte budget (it cannot take 4-bit blocks)")
        weights = [w for w in weights if w in ranks]
    model, summary = quantize_int4(ctx.model, base_dir=ctx.data, options=opts, weights=weights, grams=grams,
                                   factors=factor_names, inline=False, skipped=skipped, ranks=ranks, means=means)
    if budget is not None:
        summary.budget = True
    if ctx.config.int4_correction == "auto":
        summary.auto = True
    for name, why in left.items():
        summary.left_float.setdefault(name, why)
    if not summary.layers and factor_names:
        log.warning("%s put no weight in 4-bit blocks: the factorization took every layer it could (their factors are "
                    "stored %s); add %s for 4-bit blocks without factorization, or let %s choose between the two",
                    option_value("quantize", "int4"), summary.options.factors, option_value("energy", 1), option("target_bytes"))
    return Int4Quantized(model, ctx.data, summary)


# --------------------------------------------------------------------------------------------
# What 4-bit blocks cost each weight, for a byte budget (passes/decide.py)
# --------------------------------------------------------------------------------------------

def group_problem(group: Any, opset: int = 17) -> str | None:
    """Why a discovered weight group cannot become ``MatMulNBits`` (``None``: it can), from
    what discovery knows; :func:`quantize_int4` checks the graph again when it writes."""
    w = group.weight
    if w.tensor is None or w.tensor.data_type != TensorProto.FLOAT or len(w.shape) != 2:
        return "not a float32 matrix"
    for layer in group.layers:
        if layer.is_conv or layer.op_type not in ("MatMul", "Gemm"):
            return f"read by {layer.op_type}"
        if layer.weight_index != 1:
            return "multiplied as W @ x"
        if layer.op_type == "Gemm" and int(_attr(layer.node, "transA", 0)):
            return "Gemm with transA=1"
        if layer.op_type == "Gemm" and opset < 7:
            return f"Gemm at opset {opset}"
    return None


def input_mean(capture: Any, key: int) -> tuple[np.ndarray, int] | None:
    """The mean input row of a weight group and the rows behind it, from the statistics
    stage's capture (``None``: not captured)."""
    rows, sums = capture.rows.get(key, 0), capture.row_sums.get(key)
    return (np.asarray(sums, np.float64) / rows, rows) if sums is not None and rows > 0 else None


def stored_factor(arr: np.ndarray, axis: int | None = None) -> np.ndarray:
    """A factor as :func:`quantize_int4` stores it under ``int4_factors="int8"``, read back:
    int8 codes with one scale per singular direction (``axis``, the rank's; by default the shorter
    one, as for the factorization's pairs), dequantized."""
    arr = np.asarray(arr, np.float32)
    axis = int(np.argmin(arr.shape)) if axis is None else axis
    moved = np.moveaxis(arr, axis, 1)
    return np.ascontiguousarray(np.moveaxis(quant.dequantize_columns(*quant.quantize_columns(moved)), 1, axis))


def float_pairs(model: onnx.ModelProto, groups: Iterable[Any], cfg: Any) -> frozenset[int]:
    """The group keys whose factor pair :func:`quantize_int4` would leave float although
    ``int4_factors`` is ``int8``, for a byte budget to price them as written: factors that take a
    graph input's place (a weight that is an input at IR 4+, with ``--allow-input-weights``),
    pairs in If/Loop/Scan bodies at IR versions below 4, and every pair before opset 7."""
    groups = list(groups)
    if cfg.quantize != "int4" or cfg.int4_factors != "int8":
        return frozenset()
    if opset_version(model) < 7:
        return frozenset(g.key for g in groups)
    inputs = {i.name for i in model.graph.input} if model.ir_version >= 4 else set()
    return frozenset(g.key for g in groups if (g.weight.scope and model.ir_version < 4) or (not g.weight.scope and g.weight.name in inputs))


def _multiplied(group: Any, arr: np.ndarray) -> np.ndarray:
    """The weight as ``x @ W``: a ``transB`` Gemm stores it transposed."""
    layer = group.layers[0]
    return np.ascontiguousarray(arr.T) if layer.op_type == "Gemm" and int(_attr(layer.node, "transB", 0)) else arr


def budget_candidates(ctx: Context, plans: list) -> dict[int, Any]:
    """Per plan that can take 4-bit blocks: the bytes and errors of each correction rank
    (:data:`~.decide.INT4_RANKS` up to ``int4_max_rank``), whitened by the layer's input Gram
    when statistics were captured."""
    from .decide import INT4_RANKS, Int4Candidate
    from .discover import Discovery
    from .statistics import Statistics

    cfg = ctx.config
    require_runtime(cfg.int4_block, cfg.int4_accuracy_level)
    found = ctx.need(Discovery)
    stats = ctx.get(Statistics)
    grams = stats.capture.grams if stats is not None and cfg.data_aware else {}
    out = {}
    opset = opset_version(ctx.model)
    opts = options_of(cfg)
    for plan in plans:
        group = found.group(plan.key)
        if group_problem(group, opset) is not None:
            continue
        w = _multiplied(group, ctx.data.read(group.weight.tensor).astype(np.float32))
        k, n = w.shape
        ranks = [r for r in INT4_RANKS if r <= min(cfg.int4_max_rank, k, n)]
        gram = grams[plan.key][0] if plan.key in grams else None
        if gram is not None and gram.shape != (k, k):
            gram = None
        errors = quant.correction_errors(w, gram, ranks, block=cfg.int4_block, damping=cfg.damping, rounding=opts.rounding)
        costs = [quant.block_bytes(k, n, cfg.int4_block) + opts.branch_bytes(k, n, r, opset) for r in ranks]
        # the pair's error on the same scale (the plan's spectrum may weigh the output side too,
        # as attention-aware whitening does, which would make the two forms incomparable)
        s = quant.whitened_values(w, gram, damping=cfg.damping)
        out[plan.key] = Int4Candidate(tuple(ranks), tuple(costs), tuple(float(e) for e in errors), s)
    return out


def unit_candidates(ctx: Context, units: Mapping[int, Any]) -> dict[int, Any]:
    """Per feed-forward block a byte budget sizes (``ffn_keep="auto"``, by key) whose two
    projections can both take 4-bit blocks: their bytes and whitened errors with a branch of each
    rank (:data:`~.decide.INT4_RANKS` up to ``int4_max_rank``, one rank for both), at each width
    the block may keep and whole (:class:`~.decide.Int4Unit`).  The first projection's columns
    are quantized once (a narrowed one keeps some of them); the second is refitted per width and
    quantized as refitted, with the Gram of the kept neurons, as the quantize stage does."""
    from .decide import INT4_RANKS, Int4Unit
    from .discover import Discovery
    from .statistics import Statistics

    cfg = ctx.config
    found = ctx.need(Discovery)
    stats = ctx.get(Statistics)
    grams = stats.capture.grams if stats is not None else {}
    opset = opset_version(ctx.model)
    opts = options_of(cfg)
    out = {}
    for key, unit in units.items():
        b = unit.block
        firsts = [found.group(g.key) for g, _, _ in b.firsts]  # (a gated block's gate too: its columns follow W1's)
        down = found.group(b.down.key)
        if any(group_problem(g, opset) is not None for g in (*firsts, down)):
            continue
        w1s = [_multiplied(g, ctx.data.read(g.weight.tensor).astype(np.float32)) for g in firsts]
        d, f = w1s[0].shape[0], b.hidden
        w2 = np.asarray(unit.w2, np.float64)
        n = w2.shape[1]
        ranks = [r for r in INT4_RANKS if r <= min(cfg.int4_max_rank, d, n)]
        plans = {k: unit.plan(k) for k in unit.ks}
        widths: list[int | None] = [*unit.ks, None]
        keeps = [b.columns(plans[k].fit.keep) if k is not None else None for k in widths]  # (W1's columns: both halves when fused)
        first = np.zeros((len(widths), len(ranks)))
        for g, w1 in zip(firsts, w1s):
            gram1 = grams[g.key][0] if g.key in grams else None
            if gram1 is not None and gram1.shape != (d, d):
                gram1 = None
            first += np.asarray(quant.column_correction_errors(w1, gram1, ranks, keeps, block=cfg.int4_block,
                                                               damping=cfg.damping, rounding=opts.rounding), dtype=np.float64)
        forms = {}
        for k, e1 in zip(widths, first):
            keep = np.asarray(plans[k].fit.keep) if k is not None else np.arange(f)
            rows = plans[k].fit.w2 if k is not None else w2
            gram2 = unit.gram[np.ix_(keep, keep)] if k is not None else unit.gram
            e2 = quant.correction_errors(np.asarray(rows, np.float32), gram2, ranks, block=cfg.int4_block, damping=cfg.damping,
                                         rounding=opts.rounding)
            width, cols = len(keep), len(b.columns(keep))
            costs = tuple(len(firsts) * (quant.block_bytes(d, cols, cfg.int4_block) + opts.branch_bytes(d, cols, r, opset))
                          + quant.block_bytes(width, n, cfg.int4_block) + opts.branch_bytes(width, n, r, opset)
                          for r in ranks)
            forms[k] = (costs, tuple(float(a + c) for a, c in zip(e1, e2)))
        out[key] = Int4Unit(tuple(ranks), forms)
        ctx.progress(len(out), len(units), f"4-bit forms of {b.name}")
    return out


def emulated_weight(group: Any, stored: np.ndarray, gram: np.ndarray | None, cfg: Any, rank: int, opset: int = 17) -> np.ndarray:
    """The weight the 4-bit form with a rank-``rank`` branch computes, in the stored layout and
    dtype: the blocks as the runtime dequantizes them plus the branch's product (its factors as
    ``int4_factors`` stores them), fitted as the quantize stage fits it.  Adaptive mode measures
    the form by feeding this in place of the weight."""
    w = _multiplied(group, np.asarray(stored, np.float32))
    return _stored_layout(group, _computed(w, gram, cfg, rank, opset), stored.dtype)


def emulated_corrected(group: Any, stored: np.ndarray, gram: np.ndarray, mean: tuple[np.ndarray, int], bias: MeanBias,
                       cfg: Any, rank: int, opset: int = 17) -> dict[str, np.ndarray]:
    """:func:`emulated_weight` with the mean correction: the weight fitted on the centred inputs
    and ``bias`` (the layer's own, which adaptive mode feeds) shifted by the error's mean, as
    the quantize stage writes them into ``MatMulNBits`` (``mean``: the mean input row and the
    rows behind it).  Inputs that never vary: the plain form, bias unchanged."""
    eff, shift = _corrected(_multiplied(group, np.asarray(stored, np.float32)), gram, mean, cfg, rank, opset)
    out = {group.weight.name: _stored_layout(group, eff, stored.dtype)}
    if shift is not None:
        out[bias.name] = _shifted(bias.value, shift)
    return out


def _corrected(w: np.ndarray, gram: np.ndarray | None, mean: tuple[np.ndarray, int] | None, cfg: Any, rank: int,
               opset: int) -> tuple[np.ndarray, np.ndarray | None]:
    """What the 4-bit form of ``x @ w`` computes (:func:`_computed`) and, with ``mean``, fitted on
    the centred inputs, the shift of its bias (``None``: no correction, as for inputs that never
    vary)."""
    w = np.asarray(w, np.float32)
    centred = _centred(gram, mean) if mean is not None and gram is not None and gram.shape == (w.shape[0],) * 2 else None
    if centred is None:
        return _computed(w, gram, cfg, rank, opset), None
    eff = _computed(w, centred, cfg, rank, opset)
    return eff, mean[0] @ (w.astype(np.float64) - eff)


def _shifted(value: np.ndarray, shift: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
    """A bias plus a shift (of the entries ``cols`` only, when given), in its dtype and shape."""
    v = np.asarray(value, np.float64).reshape(-1).copy()
    v[slice(None) if cols is None else cols] += shift
    return v.astype(np.asarray(value).dtype).reshape(np.shape(value))


@dataclass(frozen=True)
class MeanBias:
    """A layer's bias that adaptive mode can feed with a mean correction's shift: a float32
    ``(N,)`` constant only the layer's bias ``Add`` (or its Gemm, as ``C``) reads."""

    name: str
    value: np.ndarray


def mean_biases(model: onnx.ModelProto, groups: Iterable[Any], data: io.DataFiles, cfg: Any) -> dict[int, MeanBias]:
    """By group key, the bias each weight's mean correction would shift when adaptive mode can
    measure that by feeding the bias (:class:`MeanBias`): a weight one main-graph node reads,
    ``MatMul`` then an ``Add`` of the bias (the folding :func:`quantize_int4` does) or a Gemm
    with ``alpha = beta = 1`` and the bias as ``C``, and a runtime that takes the bias input.
    Weights without such a bias are measured, and written, without the correction."""
    from .ffn import _Graph

    if runtime_problem(cfg.int4_block, cfg.int4_accuracy_level, bias=True) is not None:
        return {}
    g = _Graph(model.graph, data)
    out = {}
    for group in groups:
        if len(group.layers) != 1 or group.layers[0].scope or group.layers[0].weight_index != 1:
            continue
        node = group.layers[0].node
        shape = group.weight.shape
        n = shape[0] if node.op_type == "Gemm" and int(_attr(node, "transB", 0)) else shape[-1]
        name = None
        if node.op_type == "Gemm":
            if float(_attr(node, "alpha", 1.0)) == 1.0 and float(_attr(node, "beta", 1.0)) == 1.0 and len(node.input) > 2:
                name = node.input[2] or None
        elif node.op_type == "MatMul":
            readers = g.readers.get(node.output[0], [])
            if len(readers) == 1 and g.private(node.output[0]):
                add = readers[0]
                if add.op_type == "Add" and add.domain in ("", "ai.onnx") and len(add.input) == 2:
                    name = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        got = g.value(name) if name and name != node.output[0] and g.private(name) else None
        if got is not None and got[1].data_type == TensorProto.FLOAT and list(got[1].dims) == [n]:
            out[group.key] = MeanBias(name, np.asarray(got[0], np.float32))
    return out


def _computed(w: np.ndarray, gram: np.ndarray | None, cfg: Any, rank: int, opset: int) -> np.ndarray:
    """What 4-bit blocks and a rank-``rank`` branch compute for ``x @ w`` (float64), fitted and
    stored as the quantize stage writes them (stacked where it would stack)."""
    k = w.shape[0]
    if gram is not None and gram.shape != (k, k):
        gram = None
    opts = options_of(cfg)
    f = quant.fit(w, gram, block=opts.block, rank=rank, max_rank=rank or None, damping=opts.damping, rounds=opts.rounds,
                  rounding=opts.rounding)
    stack = quant.stacked(w, f.q, f.correction) if opts.stacks(k, w.shape[1], f.correction.rank, opset) else None
    return _effective(w, f.q, f.correction, stack, opts, opset)


def _stored_layout(group: Any, eff: np.ndarray, dtype: Any) -> np.ndarray:
    transposed = group.layers[0].op_type == "Gemm" and int(_attr(group.layers[0].node, "transB", 0))
    return np.ascontiguousarray((eff.T if transposed else eff).astype(dtype))


def emulated_block(found: Any, data: io.DataFiles, unit: Any, plan: Any, grams: Mapping[int, np.ndarray], cfg: Any,
                   rank: int, opset: int = 17, means: Mapping[int, tuple[np.ndarray, int]] | None = None,
                   biases: Mapping[int, MeanBias] | None = None) -> dict[str, np.ndarray]:
    """A feed-forward block in 4-bit blocks with rank-``rank`` branches, narrowed to ``plan``
    (a :class:`~.width.WidthPlan`; ``None``: whole), in tensors of the shapes as found, for
    adaptive mode to feed: the first projection's kept columns as its sliced 4-bit form computes
    them (the others as they are), the second's kept rows as its refitted 4-bit form computes them
    and zero rows for the dropped neurons, ``b2`` shifted; each fitted as the quantize stage fits
    the sliced weights (``grams``: input Grams by group key; the second's is sliced to the kept
    neurons).  A projection with a mean input row in ``means`` and a bias in ``biases`` (by group
    key) takes the mean correction as :func:`emulated_corrected` does, its bias fed shifted."""
    b = unit.block
    down = found.group(b.down.key)
    gram2 = grams.get(b.down.key)
    dtype2 = np.dtype(helper.tensor_dtype_to_np_dtype(down.weight.tensor.data_type))
    means, biases = means or {}, biases or {}

    def fitted(key: int, w: np.ndarray, gram: np.ndarray | None, rows: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """:func:`_corrected` of one projection (``rows``: the kept neurons its input is sliced to)."""
        mean = means.get(key) if key in biases else None
        if mean is not None and rows is not None:
            mean = (mean[0][rows], mean[1])
        return _corrected(w, gram, mean, cfg, rank, opset)

    keep = np.asarray(plan.fit.keep) if plan is not None else None
    if plan is None:
        eff2, shift2 = fitted(b.down.key, np.asarray(unit.w2, np.float64), gram2)
        out = {down.weight.name: _stored_layout(down, eff2, dtype2)}
    else:
        from .width import emulated_arrays

        rows = np.zeros((b.hidden, plan.fit.w2.shape[1]), dtype=np.float64)
        g2 = gram2[np.ix_(keep, keep)] if gram2 is not None else None
        rows[keep], shift2 = fitted(b.down.key, plan.fit.w2, g2, rows=keep)
        out = emulated_arrays(plan)  # b2 shifted (and W2, replaced below)
        out[down.weight.name] = _stored_layout(down, rows, dtype2)
    for first in b.firsts:  # W1 (and a gated block's gate): the kept columns as their 4-bit form computes them
        up = found.group(first[0].key)
        w1 = _multiplied(up, data.read(up.weight.tensor).astype(np.float32)).astype(np.float64)
        cols = b.columns(keep) if keep is not None else None
        eff1, shift1 = fitted(up.key, w1 if cols is None else np.ascontiguousarray(w1[:, cols]), grams.get(up.key))
        if cols is None:
            w1 = eff1
        else:
            w1[:, cols] = eff1
        out[up.weight.name] = _stored_layout(up, w1, np.dtype(helper.tensor_dtype_to_np_dtype(up.weight.tensor.data_type)))
        if shift1 is not None:
            out[biases[up.key].name] = _shifted(biases[up.key].value, shift1, cols)
    if shift2 is not None:  # (on top of the refit's intercept, when the block is narrowed)
        b2 = biases[b.down.key]
        out[b2.name] = _shifted(out.get(b2.name, b2.value), shift2)
    return out
