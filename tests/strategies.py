"""Random small ONNX graphs, their oracles, and byte mutations, for the property tests and the
fuzz campaign (``benchmarks/fuzz_campaign.py``).

Every generator takes a :class:`Draw`, so the same code runs under hypothesis (which can then
shrink a failing graph: :func:`graph_cases`) and from a plain seeded ``random.Random`` in the
long campaign (:class:`RandomDraw`).  A generated :class:`Case` is always valid ONNX that the
checker accepts and onnxruntime's CPU provider runs; what the generators avoid so that this holds
is listed in ``ORIGINAL_MODEL_LIMITS``.

Graphs built (each small: dims 2..48, spatial sizes up to 16):

    matrix chain      x --[MatMul|Gemm|Relu]*--> y          (x: vector, matrix or batched)
    matrix branch     x --path1--+
                      x --path2--+--Add--> y                (same layer shapes; weights may be shared)
    conv chain        x --Conv*--> y                        (1-D/2-D/3-D, strides, pads, dilations, groups)
    conv branch       x --Conv path1 / path2--Add--> y
    conv + gemm       x --Conv*--Flatten--[Gemm|MatMul]*--> y
    fork              x --chain--> y1, x --chain--> y2 (, y3)   (weights shared across op types/orientations)
    if                x, c --If(c){ x @ W_outer (maybe in a nested If) | xx @ (W_outer | W2_outer | local W) }--> y
    loop              x, n --Loop(n){ h @ W_outer (@ W_local) -> Tanh }--> y
    function          x --MatMul--> h --local.fn:Proj(h){Constant W; MatMul}--> y   (one or two call sites)
    old IR            IR 3 + opset 7/8 (initializers are graph inputs) or IR 4 + opset 9

Weights are exactly low-rank (rank << min(m, n); for a Conv in the channel or the spatial matrix
view) or full-rank random; rarely all-zero, NaN/Inf-holding, or finite but so large that their
norm overflows.  They are initializers (raw or typed fields), Constant nodes (dense, or rarely
sparse), sometimes shared by several nodes, sometimes also a graph output or input, or used by a
node that cannot take factors.  Models sometimes have anonymous nodes, symbolic input dims,
inferred value_info, or the default opset domain spelled ``ai.onnx``.

Oracles: :func:`check_result` (checker, onnxruntime, outputs within tolerance of the output's
:func:`abs_twin` scale, no growth, finite factors), :func:`truncated_reference` (what a ``rank=``
run should compute), :func:`check_counts`, :func:`check_dry_run`, :func:`check_twice`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "Draw", "RandomDraw", "HypothesisDraw", "Case", "build_case", "KINDS", "GENERATORS", "graph_cases", "TOLERANCE",
    "ORIGINAL_MODEL_LIMITS", "check_original", "check_result", "check_counts", "check_dry_run", "check_twice",
    "abs_twin", "all_finite", "truncated_reference", "count_params", "run_model", "compare_outputs",
    "mutate", "MUTATIONS", "seed_models",
]

#: What the generators leave out because the checker or onnxruntime refuses the ORIGINAL model.
ORIGINAL_MODEL_LIMITS = [
    "Conv in float64: onnxruntime's CPU provider has no float64 Conv kernel (NOT_IMPLEMENTED).",
    "Conv with dilations > 1 and auto_pad SAME_UPPER/SAME_LOWER: onnxruntime refuses it at run time "
    "('Dilation not supported for AutoPadType::SAME_UPPER or AutoPadType::SAME_LOWER'); explicit pads are used then.",
    "Graph outputs without a shape: onnx.checker full_check requires a shape on every graph output ('Field shape ... is required').",
    "Gemm without C before opset 11 (C is required there).",
    "Sparse initializers (graph.sparse_initializer) as MatMul weights: the checker's full_check shape inference refuses "
    "them ('Input 1 expected to have type but instead is null'); a Constant with sparse_value is used instead, but not "
    "before opset 11, not with the opset import spelled 'ai.onnx' (checker: 'Unrecognized attribute: sparse_value'), "
    "and not as a graph output too (onnxruntime: execution_frame.cc 'IExecutionFrame::Init' FAIL).",
    "A MatMul/Gemm node with domain 'ai.onnx' when the opset import says '' (checker: 'No opset import for domain ai.onnx'); "
    "the opset import itself may say 'ai.onnx'.",
    "IR 3 models must list every initializer as a graph input (checker), and IR 3/4 models cannot have model-local functions "
    "(functions need IR >= 8).",
]

#: Relative tolerance (of an output's scale, see :func:`compare_outputs`) per dtype.
TOLERANCE = {np.dtype(np.float64): 1e-6, np.dtype(np.float32): 1e-3, np.dtype(np.float16): 3e-2}

KINDS = ("matrix_chain", "matrix_branch", "conv_chain", "conv_branch", "conv_gemm", "if", "function", "old_ir", "fork", "loop")


# ---- drawing ------------------------------------------------------------------------------------


class Draw:
    """Where random choices come from: hypothesis (shrinkable) or ``random.Random`` (fast)."""

    def int(self, lo: int, hi: int) -> int:  # inclusive
        raise NotImplementedError

    def choice(self, seq: Sequence[Any]) -> Any:
        raise NotImplementedError

    def flag(self, p: float = 0.5) -> bool:
        """True with probability ``p`` (shrinks towards False)."""
        raise NotImplementedError


class RandomDraw(Draw):
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def flag(self, p: float = 0.5) -> bool:
        return self.rng.random() < p


class HypothesisDraw(Draw):
    def __init__(self, draw: Callable):
        from hypothesis import strategies as st

        self._draw, self._st = draw, st

    def int(self, lo: int, hi: int) -> int:
        return self._draw(self._st.integers(lo, hi))

    def choice(self, seq):
        return self._draw(self._st.sampled_from(list(seq)))

    def flag(self, p: float = 0.5) -> bool:
        # 0 shrinks first: a rare feature shrinks away
        return self._draw(self._st.integers(0, 999)) >= 1000 - int(round(p * 1000))


def graph_cases(kinds: Sequence[str] = KINDS):
    """A hypothesis strategy of :class:`Case` objects."""
    from hypothesis import strategies as st

    @st.composite
    def _cases(draw):
        return build_case(HypothesisDraw(draw), kinds)

    return _cases()


# ---- the case -----------------------------------------------------------------------------------


@dataclass
class Case:
    """A generated model, the feeds to run it on, and what went into it."""

    model: onnx.ModelProto
    feeds: list[dict[str, np.ndarray]]
    dtype: np.dtype
    kind: str
    allow_input_weights: bool = False
    tags: set[str] = field(default_factory=set)
    _scales: list | None = field(default=None, repr=False, compare=False)

    @property
    def tolerance(self) -> float:
        return TOLERANCE[np.dtype(self.dtype)]

    def scales(self) -> list[list[np.ndarray]]:
        """Per feed, the outputs of :func:`abs_twin` on ``|feeds|`` (the error scale of each output)."""
        if self._scales is None:
            twin = abs_twin(self.model)
            self._scales = [run_model(twin, _abs_feeds(f)) for f in self.feeds]
        return self._scales

    def __repr__(self) -> str:
        return f"<Case {self.describe()}>"

    def describe(self) -> str:
        return f"{self.kind} {np.dtype(self.dtype).name} opset {_opset(self.model)} IR {self.model.ir_version} [{', '.join(sorted(self.tags))}]"


def _opset(model: onnx.ModelProto) -> int:
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


# ---- builder ------------------------------------------------------------------------------------


class Builder:
    """Collects nodes, initializers and weights of one graph while layers are drawn."""

    def __init__(self, d: Draw, dtype, opset: int, ir_version: int | None = None):
        self.d = d
        self.dtype = np.dtype(dtype)
        self.elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.opset = opset
        self.ir_version = ir_version
        self.rng = np.random.default_rng(d.int(0, 2**31 - 1))
        self.default_domain = "ai.onnx" if d.flag(0.05) else ""  # the default opset domain spelled out
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.weights: dict[tuple[int, ...], list[str]] = {}  # stored shape -> names (for sharing)
        self.weight_shapes: dict[str, tuple[int, ...]] = {}
        self.input_weights: list[onnx.ValueInfoProto] = []
        self.tags: set[str] = set()
        self.dims: list[int] = []  # sizes seen so far; reusing them makes shared (and square) weights likely
        self.channels: list[int] = []
        self._n = 0

    def dim(self, lo: int = 2, hi: int = 48) -> int:
        if self.dims and self.d.flag(0.3):
            return self.d.choice(self.dims)
        v = self.d.int(lo, hi)
        self.dims.append(v)
        return v

    def tensor(self, values: np.ndarray, name: str) -> onnx.TensorProto:
        """``values`` as a TensorProto, in raw_data or (sometimes) in the typed fields
        (float_data / double_data / float16 bit patterns in int32_data)."""
        if self.d.flag(0.15):
            self.tags.add("typed_fields")
            return helper.make_tensor(name, helper.np_dtype_to_tensor_dtype(values.dtype), list(values.shape), values.flatten().tolist())
        return numpy_helper.from_array(values, name)

    def fresh(self, base: str) -> str:
        self._n += 1
        return f"{base}{self._n}"

    def vi(self, name: str, shape) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, self.elem, list(shape))

    # weights ------------------------------------------------------------------------------

    def matrix_values(self, m: int, n: int, fan_in: int) -> np.ndarray:
        d = self.d
        special = self.special((m, n))
        if special is not None:
            return special
        if d.flag(0.7):
            r = d.int(1, max(1, min(m, n) // 3))
            self.tags.add("lowrank")
            w = self.rng.standard_normal((m, r)) @ self.rng.standard_normal((r, n)) / np.sqrt(r)
        else:
            self.tags.add("fullrank")
            w = self.rng.standard_normal((m, n))
        return (w / np.sqrt(fan_in)).astype(self.dtype)

    def special(self, shape) -> np.ndarray | None:
        """Rarely, an all-zero weight or one holding a NaN/Inf."""
        if not self.d.flag(0.04):
            return None
        kind = self.d.choice(["zero", "zero", "nan", "inf", "huge"])
        self.tags.add(f"weight_{kind}")
        if kind == "huge":
            # finite, but near the dtype's largest value (its Frobenius norm is not representable)
            top = float(np.finfo(self.dtype).max)
            w = np.clip(self.rng.standard_normal(shape), -3, 3) * (top / 4)
            return w.astype(self.dtype)
        w = np.zeros(shape) if kind == "zero" else self.rng.standard_normal(shape) * 0.1
        if kind != "zero":
            w.flat[self.d.int(0, w.size - 1)] = np.nan if kind == "nan" else np.inf
        return w.astype(self.dtype)

    def conv_values(self, shape: tuple[int, ...]) -> np.ndarray:
        d = self.d
        special = self.special(shape)
        if special is not None:
            return special
        c_out, c_in, kernel = shape[0], shape[1], shape[2:]
        k = int(np.prod(kernel))
        modes = ["channel", "full"] + (["spatial"] if len(kernel) == 2 else [])
        mode = d.choice(modes)
        self.tags.add(f"conv_weight_{mode}")
        if mode == "channel":
            r = d.int(1, max(1, min(c_out, c_in * k) // 3))
            w = (self.rng.standard_normal((c_out, r)) @ self.rng.standard_normal((r, c_in * k))).reshape(shape)
        elif mode == "spatial":
            kh, kw = kernel
            r = d.int(1, max(1, min(c_in * kh, c_out * kw) // 3))
            m = self.rng.standard_normal((c_in * kh, r)) @ self.rng.standard_normal((r, c_out * kw))
            w = m.reshape(c_in, kh, c_out, kw).transpose(2, 0, 1, 3)
        else:
            w = self.rng.standard_normal(shape)
        w = w / np.sqrt(np.mean(np.square(w)) + 1e-30)  # unit entries, then fan-in scaling
        return np.ascontiguousarray(w / np.sqrt(c_in * k)).astype(self.dtype)

    def add_weight(self, values: np.ndarray, *, share: float = 0.25, constant: float = 0.3, base: str = "W") -> str:
        """An initializer or a Constant node holding ``values`` (or an earlier weight of the same shape)."""
        d = self.d
        shape = tuple(values.shape)
        same = self.weights.get(shape)
        if same and d.flag(share):
            self.tags.add("shared")
            return d.choice(same)
        name = self.fresh(base)
        tensor = self.tensor(values, name)
        if d.flag(constant):
            self.tags.add("constant_node")
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("const"), value=tensor))
        elif d.flag(0.03) and values.size > 1 and self.opset >= 11 and not self.default_domain:
            # a Constant holding a sparse tensor (a sparse *initializer* trips the checker's shape inference)
            self.tags.add("sparse_constant")
            flat = values.reshape(-1)
            keep = np.flatnonzero(np.abs(flat) >= np.median(np.abs(flat))).astype(np.int64)
            sparse = helper.make_sparse_tensor(numpy_helper.from_array(flat[keep], name), numpy_helper.from_array(keep, name + "_idx"),
                                               list(values.shape))
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.fresh("const"), sparse_value=sparse))
            self.weights.setdefault(shape, []).append(name)
            return name  # onnxruntime refuses a sparse constant that is also a graph output
        else:
            self.inits.append(tensor)
        self.weights.setdefault(shape, []).append(name)
        self.weight_shapes[name] = shape
        if d.flag(0.06):
            # the weight is also used by a node that cannot take factors
            self.tags.add("weight_other_use")
            out = self.fresh("wout")
            self.nodes.append(helper.make_node("Identity", [name], [out], name=self.fresh("id")))
            self.outputs.append(self.vi(out, shape))
        elif d.flag(0.03):
            self.tags.add("weight_is_graph_output")
            self.outputs.append(self.vi(name, shape))
        elif d.flag(0.04) and tensor in self.inits and (self.ir_version is None or self.ir_version >= 4):
            # IR >= 4: an initializer that is also a graph input is an overridable default
            self.tags.add("weight_is_graph_input")
            self.input_weights.append(self.vi(name, shape))
        return name

    def small_tensor(self, shape, base: str) -> str:
        name = self.fresh(base)
        self.inits.append(self.tensor(self.rng.standard_normal(shape).astype(self.dtype), name))
        return name

    # layers -------------------------------------------------------------------------------

    def relu_maybe(self, x: str) -> str:
        if self.d.flag(0.2):
            y = self.fresh("r")
            self.nodes.append(helper.make_node("Relu", [x], [y], name=self.fresh("relu")))
            return y
        return x

    def matrix_layer(self, x: str, shape: list[int], spec: dict | None = None, *, share: float = 0.25) -> tuple[str, list[int], dict]:
        """One MatMul or Gemm on activation ``x`` of ``shape``; ``spec`` repeats an earlier layer's geometry."""
        d = self.d
        if spec is None:
            ops = ["MatMul"] + (["Gemm", "Gemm"] if len(shape) == 2 else [])
            op = d.choice(ops)
            spec = {"op": op, "c": self.dim()}
            if op == "MatMul":
                spec["first"] = d.flag(0.3)
            else:
                spec.update(first=d.flag(0.35), ta=d.int(0, 1), tb=d.int(0, 1))
        op, c = spec["op"], spec["c"]
        y = self.fresh("h")
        name = self.fresh(op.lower())
        if op == "MatMul":
            if spec["first"]:
                k = shape[-2] if len(shape) >= 2 else shape[0]
                w = self.add_weight(self.matrix_values(c, k, k), share=share)
                out = shape[:-2] + [c, shape[-1]] if len(shape) >= 2 else [c]
                self.nodes.append(helper.make_node("MatMul", [w, x], [y], name=name))
                self.tags.add("matmul_weight_first")
            else:
                k = shape[-1]
                w = self.add_weight(self.matrix_values(k, c, k), share=share)
                out = shape[:-1] + [c]
                self.nodes.append(helper.make_node("MatMul", [x, w], [y], name=name))
                self.tags.add("matmul")
            return y, out, spec
        ta, tb = spec["ta"], spec["tb"]
        if not spec["first"]:
            m_, k = (shape[0], shape[1]) if not ta else (shape[1], shape[0])
            n_ = c
            values = self.matrix_values(k, n_, k)
            w = self.add_weight(values.T.copy() if tb else values, share=share)
            inputs = [x, w]
            self.tags.add("gemm_weight_B")
        else:
            k, n_ = (shape[0], shape[1]) if not tb else (shape[1], shape[0])
            m_ = c
            values = self.matrix_values(m_, k, k)
            w = self.add_weight(values.T.copy() if ta else values, share=share)
            inputs = [w, x]
            self.tags.add("gemm_weight_A")
        bias_kinds = ["row", "full", "scalar", "column", "0d"] + (["none", "none", "none"] if self.opset >= 11 else [])
        bias = d.choice(bias_kinds)
        if bias != "none":
            bshape = {"row": [n_], "full": [m_, n_], "scalar": [1], "column": [m_, 1], "0d": []}[bias]
            inputs.append(self.small_tensor(bshape, "C"))
            self.tags.add(f"gemm_bias_{bias}")
        attrs: dict[str, Any] = {}
        if ta:
            attrs["transA"] = 1
        if tb:
            attrs["transB"] = 1
        for a in ("alpha", "beta"):
            v = d.choice([None, None, 1.0, 0.5, 2.0, -1.5, 0.0])
            if v is not None:
                attrs[a] = v
        if self.opset < 7:
            attrs["broadcast"] = 1
        self.nodes.append(helper.make_node("Gemm", inputs, [y], name=name, **attrs))
        return y, [m_, n_], spec

    def conv_layer(self, x: str, shape: list[int], spec: dict | None = None, *, share: float = 0.25) -> tuple[str, list[int], dict]:
        d = self.d
        c_in, sp = shape[1], shape[2:]
        nd = len(sp)
        if spec is None:
            group = 1
            if d.flag(0.15) and c_in > 1:
                divisors = [g for g in range(2, c_in + 1) if c_in % g == 0]
                group = d.choice(divisors)
            c_out = group * d.int(1, max(1, 16 // group))
            if group == 1:
                c_out = d.choice(self.channels) if self.channels and d.flag(0.3) else max(c_out, 2)
            self.channels.append(c_out)
            kmax = 5 if nd == 1 else 3
            kernel = [d.int(1, kmax) for _ in range(nd)]
            strides = [d.int(1, 2) for _ in range(nd)]
            dil = [d.int(1, 2) if d.flag(0.3) else 1 for _ in range(nd)]
            pad_modes = ["explicit", "explicit", "none", "VALID"]
            if max(dil) == 1:  # onnxruntime refuses SAME_* with dilations > 1
                pad_modes += ["SAME_UPPER", "SAME_LOWER"]
            pad_mode = d.choice(pad_modes)
            pads = [0] * (2 * nd)
            if pad_mode == "explicit":
                pads = [d.int(0, max(0, kernel[i % nd] - 1)) for i in range(2 * nd)]
            for i in range(nd):  # the kernel must fit into the (padded) input
                avail = sp[i] + (pads[i] + pads[i + nd] if pad_mode in ("explicit", "none") else 0)
                if pad_mode.startswith("SAME"):
                    continue
                if dil[i] * (kernel[i] - 1) + 1 > avail:
                    kernel[i], dil[i] = 1, 1
                    pads[i] = pads[i + nd] = 0
            spec = {"group": group, "c_out": c_out, "kernel": kernel, "strides": strides, "dil": dil, "pad_mode": pad_mode, "pads": pads}
        group, c_out, kernel, strides, dil, pad_mode, pads = (spec[k] for k in ("group", "c_out", "kernel", "strides", "dil", "pad_mode", "pads"))
        w_shape = (c_out, c_in // group, *kernel)
        w = self.add_weight(self.conv_values(w_shape), share=share, base="K")
        inputs = [x, w]
        if d.flag(0.5):
            inputs.append(self.small_tensor([c_out], "B"))
            self.tags.add("conv_bias")
        attrs: dict[str, Any] = {}
        if d.flag(0.7):
            attrs["kernel_shape"] = list(kernel)
        if max(strides) > 1 or d.flag(0.3):
            attrs["strides"] = list(strides)
        if max(dil) > 1 or d.flag(0.3):
            attrs["dilations"] = list(dil)
        if group != 1 or d.flag(0.1):
            attrs["group"] = group
        if pad_mode == "explicit":
            attrs["pads"] = list(pads)
        elif pad_mode != "none":
            attrs["auto_pad"] = pad_mode
        out_sp = []
        for i in range(nd):
            if pad_mode.startswith("SAME"):
                o = -(-sp[i] // strides[i])
            else:
                eff = dil[i] * (kernel[i] - 1) + 1
                o = (sp[i] + pads[i] + pads[i + nd] - eff) // strides[i] + 1
            out_sp.append(o)
        self.tags.update({f"conv{nd}d", f"pad_{pad_mode}"} | ({"dilated"} if max(dil) > 1 else set())
                         | ({"strided"} if max(strides) > 1 else set()) | ({"grouped"} if group > 1 else set()))
        y = self.fresh("c")
        self.nodes.append(helper.make_node("Conv", inputs, [y], name=self.fresh("conv"), **attrs))
        return y, [shape[0], c_out, *out_sp], spec

    def model(self, outputs: list[tuple[str, list[int]]], functions=(), extra_opsets=()) -> onnx.ModelProto:
        """The model, with some finishing touches drawn: anonymous nodes, symbolic input dims, value_info."""
        d = self.d
        self.feed_shapes = {v.name: [dim.dim_value for dim in v.type.tensor_type.shape.dim] for v in self.inputs}
        outs = [self.vi(n, s) for n, s in outputs] + self.outputs
        inputs = list(self.inputs) + self.input_weights
        if self.ir_version is not None and self.ir_version < 4:
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        if d.flag(0.2):
            self.tags.add("anonymous_nodes")
            for n in self.nodes:
                n.name = ""
        if d.flag(0.25):
            # symbolic batch (and spatial) dims; outputs then declare their rank only
            self.tags.add("symbolic_dims")
            spatial = d.flag(0.5)
            for v in inputs[:1]:
                dims = v.type.tensor_type.shape.dim
                for i, dim in enumerate(dims):
                    if i == 0 or (spatial and i >= 2 and len(dims) >= 3):
                        dim.dim_param = f"s{i}"
            for v in outs:
                for dim in v.type.tensor_type.shape.dim:
                    dim.Clear()
        graph = helper.make_graph(self.nodes, "g", inputs, outs, initializer=self.inits)
        if self.default_domain:
            self.tags.add("opset_domain_ai.onnx")
        opsets = [helper.make_opsetid(self.default_domain, self.opset), *[helper.make_opsetid(dom, v) for dom, v in extra_opsets]]
        model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
        if self.ir_version is not None:
            model.ir_version = self.ir_version
        if d.flag(0.25):
            self.tags.add("value_info")
            model = onnx.shape_inference.infer_shapes(model)
        return model


# ---- generators ---------------------------------------------------------------------------------


def _float_dtype(d: Draw, conv: bool) -> np.dtype:
    options = [np.float32, np.float32, np.float32, np.float16] + ([] if conv else [np.float64])
    return np.dtype(d.choice(options))


def _matrix_input(b: Builder) -> list[int]:
    d = b.d
    form = d.choice(["matrix", "matrix", "matrix", "batched", "vector"])
    k = b.dim()
    if form == "vector":
        return [k]
    a = b.dim(1, 8)
    if form == "batched":
        return [d.int(1, 3) for _ in range(d.int(1, 2))] + [a, k]
    return [a, k]


def _feeds(b: Builder) -> dict[str, np.ndarray]:
    feeds = {}
    for v in b.inputs:
        if v.type.tensor_type.elem_type != b.elem:
            continue
        shape = b.feed_shapes[v.name]
        feeds[v.name] = b.rng.standard_normal(shape).astype(b.dtype)
    return feeds


def _matrix_chain(b: Builder, x: str, shape: list[int], n: int) -> tuple[str, list[int]]:
    for k in range(n):
        if k:
            x = b.relu_maybe(x)
        x, shape, _ = b.matrix_layer(x, shape)
    return x, shape


def _opset_draw(d: Draw) -> int:
    return d.int(11, 21)


def gen_matrix_chain(d: Draw) -> Case:
    b = Builder(d, _float_dtype(d, conv=False), _opset_draw(d))
    shape = _matrix_input(b)
    b.inputs.append(b.vi("x", shape))
    y, out = _matrix_chain(b, "x", shape, d.int(1, 3))
    return Case(b.model([(y, out)]), [_feeds(b)], b.dtype, "matrix_chain", tags=b.tags)


def gen_matrix_branch(d: Draw) -> Case:
    b = Builder(d, _float_dtype(d, conv=False), _opset_draw(d))
    shape = _matrix_input(b)
    b.inputs.append(b.vi("x", shape))
    specs, x, s = [], "x", shape
    for k in range(d.int(1, 2)):
        if k:
            x = b.relu_maybe(x)
        x, s, spec = b.matrix_layer(x, s)
        specs.append(spec)
    y1 = x
    x2, s2 = "x", shape
    for k, spec in enumerate(specs):
        if k:
            x2 = b.relu_maybe(x2)
        x2, s2, _ = b.matrix_layer(x2, s2, spec, share=0.4)
    assert s2 == s, (s, s2)
    y = b.fresh("sum")
    b.nodes.append(helper.make_node("Add", [y1, x2], [y], name=b.fresh("add")))
    b.tags.add("branch")
    if d.flag(0.3):
        y, s = b.matrix_layer(b.relu_maybe(y), s)[:2]
    return Case(b.model([(y, s)]), [_feeds(b)], b.dtype, "matrix_branch", tags=b.tags)


def _conv_input(d: Draw) -> list[int]:
    nd = d.choice([1, 2, 2, 2, 3])
    size_max = {1: 16, 2: 10, 3: 5}[nd]
    return [d.int(1, 2), d.int(1, 8), *[d.int(2, size_max) for _ in range(nd)]]


def _conv_chain(b: Builder, x: str, shape: list[int], n: int) -> tuple[str, list[int]]:
    for k in range(n):
        if k:
            x = b.relu_maybe(x)
        x, shape, _ = b.conv_layer(x, shape)
    return x, shape


def gen_conv_chain(d: Draw) -> Case:
    b = Builder(d, _float_dtype(d, conv=True), _opset_draw(d))
    shape = _conv_input(b.d)
    b.inputs.append(b.vi("x", shape))
    y, out = _conv_chain(b, "x", shape, d.int(1, 3))
    return Case(b.model([(y, out)]), [_feeds(b)], b.dtype, "conv_chain", tags=b.tags)


def gen_conv_branch(d: Draw) -> Case:
    b = Builder(d, _float_dtype(d, conv=True), _opset_draw(d))
    shape = _conv_input(b.d)
    b.inputs.append(b.vi("x", shape))
    specs, x, s = [], "x", shape
    for k in range(d.int(1, 2)):
        if k:
            x = b.relu_maybe(x)
        x, s, spec = b.conv_layer(x, s)
        specs.append(spec)
    x2, s2 = "x", shape
    for k, spec in enumerate(specs):
        if k:
            x2 = b.relu_maybe(x2)
        x2, s2, _ = b.conv_layer(x2, s2, spec, share=0.4)
    assert s2 == s
    y = b.fresh("sum")
    b.nodes.append(helper.make_node("Add", [x, x2], [y], name=b.fresh("add")))
    b.tags.add("branch")
    return Case(b.model([(y, s)]), [_feeds(b)], b.dtype, "conv_branch", tags=b.tags)


def gen_conv_gemm(d: Draw) -> Case:
    b = Builder(d, _float_dtype(d, conv=True), _opset_draw(d))
    shape = _conv_input(b.d)
    b.inputs.append(b.vi("x", shape))
    y, s = _conv_chain(b, "x", shape, d.int(1, 2))
    flat = b.fresh("flat")
    b.nodes.append(helper.make_node("Flatten", [y], [flat], name=b.fresh("flatten"), axis=1))
    s = [s[0], int(np.prod(s[1:]))]
    y, s = _matrix_chain(b, flat, s, d.int(1, 2))
    b.tags.add("conv_then_matrix")
    return Case(b.model([(y, s)]), [_feeds(b)], b.dtype, "conv_gemm", tags=b.tags)


def gen_if(d: Draw) -> Case:
    """``If(c)`` whose branches multiply by an outer-scope weight (and maybe one of their own)."""
    dtype = np.dtype(d.choice([np.float32, np.float32, np.float16, np.float64]))
    b = Builder(d, dtype, _opset_draw(d))
    a, k, n = d.int(1, 8), b.dim(), b.dim()
    b.inputs += [b.vi("x", [a, k]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])]
    b.nodes.append(helper.make_node("Identity", ["x"], ["xx"], name="pre"))
    w = b.add_weight(b.matrix_values(k, n, k))  # outer: initializer or Constant node

    def branch(tag: str, act: str) -> onnx.GraphProto:
        out = f"{tag}_out"
        choice = d.choice(["outer", "outer", "outer2", "local_init", "local_const"])
        nodes, inits = [], []
        if choice == "outer":
            wn = w
        elif choice == "outer2":
            wn = b.add_weight(b.matrix_values(k, n, k), share=0.0)
        else:
            wn = f"{tag}_W"
            t = b.tensor(b.matrix_values(k, n, k), wn)
            if choice == "local_init":
                inits.append(t)
            else:
                nodes.append(helper.make_node("Constant", [], [wn], name=f"{tag}_const", value=t))
        b.tags.add(f"if_{choice}")
        if tag == "then" and d.flag(0.2):
            # a nested If whose branches use the weight two scopes up
            b.tags.add("if_nested")
            inner = [helper.make_graph([helper.make_node("MatMul", [act, wn], [f"{t}_o"], name=f"{t}_mm")], f"{t}_g", [],
                                       [b.vi(f"{t}_o", [a, n])]) for t in ("inner_then", "inner_else")]
            nodes.append(helper.make_node("Not", ["c"], ["not_c"], name="not"))
            nodes.append(helper.make_node("If", ["not_c"], [out], name="inner_if", then_branch=inner[0], else_branch=inner[1]))
        else:
            nodes.append(helper.make_node("MatMul", [act, wn], [out], name=f"{tag}_mm"))
        return helper.make_graph(nodes, f"{tag}_g", [], [b.vi(out, [a, n])], initializer=inits)

    then_g, else_g = branch("then", "x"), branch("else", "xx")
    b.nodes.append(helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g))
    outputs = [("y", [a, n])]
    if d.flag(0.3):  # the outer weight is also used in the main graph
        b.nodes.append(helper.make_node("MatMul", ["x", w], ["z"], name="main_mm"))
        outputs.append(("z", [a, n]))
        b.tags.add("if_main_user")
    model = b.model(outputs)
    base = _feeds(b)
    feeds = [{**base, "c": np.array(True)}, {**base, "c": np.array(False)}]
    return Case(model, feeds, b.dtype, "if", tags=b.tags)


def gen_function(d: Draw) -> Case:
    """A model-local function ``local.fn:Proj`` (Constant weight + MatMul) called from the main graph."""
    dtype = np.dtype(d.choice([np.float32, np.float32, np.float16, np.float64]))
    b = Builder(d, dtype, _opset_draw(d))
    a, k = d.int(1, 8), d.int(2, 48)
    b.inputs.append(b.vi("x", [a, k]))
    h, s = "x", [a, k]
    if d.flag(0.7):
        h, s, _ = b.matrix_layer(h, s)
    n = d.int(2, 48)
    wv = b.matrix_values(s[1], n, s[1])
    fnodes = [helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(wv, "Wc")),
              helper.make_node("MatMul", ["X", "Wc"], ["Y"])]
    fn = helper.make_function("local.fn", "Proj", ["X"], ["Y"], fnodes, [helper.make_opsetid("", b.opset)])
    y = b.fresh("f")
    b.nodes.append(helper.make_node("Proj", [h], [y], name="call1", domain="local.fn"))
    s = [s[0], n]
    b.tags.add("function")
    if d.flag(0.3):
        # a second call site, after a square projection so the function fits again
        sq = b.add_weight(b.matrix_values(n, wv.shape[0], n))
        h2 = b.fresh("h")
        b.nodes.append(helper.make_node("MatMul", [y, sq], [h2], name="to_fn_input"))
        y = b.fresh("f")
        b.nodes.append(helper.make_node("Proj", [h2], [y], name="call2", domain="local.fn"))
        b.tags.add("function_two_calls")
    if d.flag(0.5):
        y, s, _ = b.matrix_layer(y, s)
    model = b.model([(y, s)], functions=[fn], extra_opsets=[("local.fn", 1)])
    return Case(model, [_feeds(b)], b.dtype, "function", tags=b.tags)


def gen_old_ir(d: Draw) -> Case:
    """IR 3 (opset 7/8; every initializer is a graph input) or IR 4 (opset 9)."""
    ir, opset = d.choice([(3, 7), (3, 8), (4, 9)])
    conv = d.flag(0.3)
    b = Builder(d, np.dtype(d.choice([np.float32, np.float32, np.float16])), opset, ir_version=ir)
    if conv:
        shape = _conv_input(b.d)
        b.inputs.append(b.vi("x", shape))
        y, s = _conv_chain(b, "x", shape, d.int(1, 2))
    else:
        shape = _matrix_input(b)
        b.inputs.append(b.vi("x", shape))
        y, s = _matrix_chain(b, "x", shape, d.int(1, 3))
    b.tags.add(f"ir{ir}")
    return Case(b.model([(y, s)]), [_feeds(b)], b.dtype, "old_ir", allow_input_weights=ir < 4 and d.flag(0.5), tags=b.tags)


def gen_fork(d: Draw) -> Case:
    """Two or three independent chains from one input, each its own output; weights of equal
    stored shape are often shared across them (so across op types, orientations and Conv attributes)."""
    conv = d.flag(0.4)
    b = Builder(d, _float_dtype(d, conv=conv), _opset_draw(d))
    shape = _conv_input(d) if conv else _matrix_input(b)
    b.inputs.append(b.vi("x", shape))
    outputs = []
    for _ in range(d.int(2, 3)):
        x, s = "x", shape
        for k in range(d.int(1, 2)):
            if k:
                x = b.relu_maybe(x)
            x, s, _ = (b.conv_layer if conv else b.matrix_layer)(x, s, share=0.5)
        outputs.append((x, s))
    b.tags.add("fork")
    return Case(b.model(outputs), [_feeds(b)], b.dtype, "fork", tags=b.tags)


def gen_loop(d: Draw) -> Case:
    """``Loop`` whose body multiplies by an outer square weight (a state carried through the iterations)."""
    dtype = np.dtype(d.choice([np.float32, np.float32, np.float16, np.float64]))
    b = Builder(d, dtype, _opset_draw(d))
    a, k = d.int(1, 8), b.dim()
    b.inputs += [b.vi("x", [a, k]), helper.make_tensor_value_info("n", TensorProto.INT64, [])]
    w = b.add_weight(b.matrix_values(k, k, k))
    body_nodes = [helper.make_node("MatMul", ["h_in", w], ["h_mm"], name="body_mm"),
                  helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")]
    last = "h_mm"
    if d.flag(0.5):  # a body-local weight too
        wl = "body_W"
        body_nodes.insert(0, helper.make_node("Constant", [], [wl], name="body_const", value=b.tensor(b.matrix_values(k, k, k), wl)))
        body_nodes.append(helper.make_node("MatMul", [last, wl], ["h_mm2"], name="body_mm2"))
        last = "h_mm2"
        b.tags.add("loop_local_weight")
    body_nodes.append(helper.make_node("Tanh", [last], ["h_out"], name="body_tanh"))
    body = helper.make_graph(body_nodes, "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), b.vi("h_in", [a, k])],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), b.vi("h_out", [a, k])])
    b.nodes.append(helper.make_node("Loop", ["n", "", "x"], ["y"], name="loop", body=body))
    b.tags.add("loop")
    model = b.model([("y", [a, k])])
    feeds = {**_feeds(b), "n": np.array(d.int(0, 3), dtype=np.int64)}
    return Case(model, [feeds], b.dtype, "loop", tags=b.tags)


GENERATORS: dict[str, Callable[[Draw], Case]] = {
    "matrix_chain": gen_matrix_chain, "matrix_branch": gen_matrix_branch, "conv_chain": gen_conv_chain,
    "conv_branch": gen_conv_branch, "conv_gemm": gen_conv_gemm, "if": gen_if, "function": gen_function, "old_ir": gen_old_ir,
    "fork": gen_fork, "loop": gen_loop,
}


def build_case(d: Draw, kinds: Sequence[str] = KINDS) -> Case:
    kind = d.choice(list(kinds))
    return GENERATORS[kind](d)


# ---- oracles ------------------------------------------------------------------------------------


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _graphs(g)


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every initializer and Constant-node tensor of the main graph and its bodies."""
    total = 0
    for g in _graphs(model.graph):
        for t in g.initializer:
            total += int(np.prod(t.dims, dtype=np.int64))
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        total += int(np.prod(a.t.dims, dtype=np.int64))
    return total


def all_finite(model: onnx.ModelProto, functions: bool = False) -> bool:
    """Whether every float initializer and Constant tensor of the graphs (and with ``functions``,
    of the model-local functions) holds only finite values."""
    bodies = [(list(g.initializer), list(g.node)) for g in _graphs(model.graph)]
    if functions:
        bodies += [([], list(f.node)) for f in model.functions]
    for inits, nodes in bodies:
        tensors = inits + [a.t for n in nodes if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        for t in tensors:
            arr = numpy_helper.to_array(t)
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                return False
    return True


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def compare_outputs(want: list[np.ndarray], got: list[np.ndarray], tol: float, scales: list[np.ndarray] | None = None) -> str | None:
    """``None`` when each output matches within ``tol`` of its scale, else what differs.

    An output's scale is the largest value of its :func:`abs_twin` output (``scales``), which
    bounds the magnitudes that were summed: an output that is small by cancellation is compared at
    the size of its terms, as rounding errors are.  Without ``scales``: its largest magnitude.
    """
    if len(want) != len(got):
        return f"{len(got)} outputs, expected {len(want)}"
    for i, (w, g) in enumerate(zip(want, got)):
        if w.shape != g.shape or w.dtype != g.dtype:
            return f"output {i}: {g.dtype}{list(g.shape)}, expected {w.dtype}{list(w.shape)}"
        w64, g64 = w.astype(np.float64), g.astype(np.float64)
        if not np.all(np.isfinite(w64)):
            continue  # the original overflowed (float16); nothing to compare
        if not w64.size:
            continue
        scale = float(np.max(np.abs(w64)))
        if scales is not None:
            scale = max(scale, float(np.max(np.abs(scales[i].astype(np.float64)))))
        err = float(np.max(np.abs(w64 - g64)))
        floor = 1e-5 if w.dtype == np.float16 else 1e-9  # float16 subnormals are 6e-8 apart
        if not err <= tol * scale + floor:
            return f"output {i}: max abs error {err:.3g} vs scale {scale:.3g} (max |output| {np.max(np.abs(w64)):.3g}; tolerance {tol:g} relative)"
    return None


def abs_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every float constant replaced by its absolute value (Gemm's alpha and beta
    too); fed ``|x|``, its outputs bound the magnitudes the original's outputs are sums of, since
    every op here is linear or monotone and odd (Relu, Tanh) or sums."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)

    def fix(t: onnx.TensorProto) -> None:
        arr = numpy_helper.to_array(t)
        if arr.dtype.kind == "f":
            t.CopyFrom(numpy_helper.from_array(np.abs(arr), t.name))

    bodies = [f.node for f in twin.functions]
    for g in _graphs(twin.graph):
        for t in g.initializer:
            fix(t)
        bodies.append(g.node)
    for nodes in bodies:
        for n in nodes:
            for a in n.attribute:
                if n.op_type == "Constant" and a.name == "value":
                    fix(a.t)
                elif n.op_type == "Constant" and a.name == "sparse_value":
                    fix(a.sparse_tensor.values)
                elif n.op_type == "Gemm" and a.name in ("alpha", "beta"):
                    a.f = abs(a.f)
    return twin


def _abs_feeds(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.abs(v) if v.dtype.kind == "f" else v for k, v in feeds.items()}


def check_original(case: Case) -> list[np.ndarray]:
    """The generator's own guarantee: the checker and onnxruntime accept the original."""
    onnx.checker.check_model(case.model, full_check=True)
    return [run_model(case.model, f) for f in case.feeds]


def _truncate(arr: np.ndarray, rank: int, mode: str | None) -> np.ndarray:
    w = arr.astype(np.float64)
    if w.ndim == 2:
        m = w
    elif mode == "spatial":
        c_out, c_in, kh, kw = w.shape
        m = w.transpose(1, 2, 0, 3).reshape(c_in * kh, c_out * kw)
    else:
        m = w.reshape(w.shape[0], -1)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    t = (u[:, :rank] * s[:rank]) @ vt[:rank]
    if w.ndim == 2:
        back = t
    elif mode == "spatial":
        c_out, c_in, kh, kw = w.shape
        back = t.reshape(c_in, kh, c_out, kw).transpose(2, 0, 1, 3)
    else:
        back = t.reshape(w.shape)
    return np.ascontiguousarray(back).astype(arr.dtype)


def truncated_reference(model: onnx.ModelProto, layers) -> onnx.ModelProto:
    """The original with every factorized weight replaced by its rank-``rank`` truncated SVD (in the
    reported Conv view): what the compressed model should compute."""
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    want = {}
    for d in layers:
        if d.factorized and d.weight is not None:
            want.setdefault(d.weight, (d.rank, d.conv_mode))
    for g in _graphs(ref.graph):
        for t in g.initializer:
            if t.name in want:
                t.CopyFrom(numpy_helper.from_array(_truncate(numpy_helper.to_array(t), *want[t.name]), t.name))
        for n in g.node:
            if n.op_type == "Constant" and n.output[0] in want:
                for a in n.attribute:
                    if a.name == "value":
                        a.t.CopyFrom(numpy_helper.from_array(_truncate(numpy_helper.to_array(a.t), *want[n.output[0]]), a.t.name))
    return ref


def check_counts(case: Case, res) -> None:
    """The report's model parameter counts are the model's: tensors of its graphs and bodies."""
    before, after = count_params(case.model), count_params(res.model)
    t = res.totals
    assert t.model_params_before == before, f"reported model_params_before {t.model_params_before}, the model holds {before}"
    assert t.model_params_after == after, f"reported model_params_after {t.model_params_after}, the model holds {after}"


def check_result(case: Case, res, reference_outputs: list[list[np.ndarray]] | None = None, *, truncated: bool = False) -> None:
    """Assert the properties of a compression result (AssertionError names the first that fails).

    Args:
        reference_outputs: The original's outputs per feed (with ``truncated=False``).
        truncated: Compare with :func:`truncated_reference` instead of the original (``rank=`` runs).
    """
    onnx.checker.check_model(res.model, full_check=True)
    t = res.totals
    assert t.model_params_after <= t.model_params_before, f"model parameters grew: {t.model_params_before} -> {t.model_params_after}"
    for d in res.layers:
        assert d.params_after <= d.params_before, f"{d.node}: parameters grew {d.params_before} -> {d.params_after}"
    before, after = count_params(case.model), count_params(res.model)
    assert after <= before, f"the model's tensors grew: {before} -> {after} elements"
    if all_finite(case.model):
        assert all_finite(res.model), "finite weights gave factors holding NaN or Inf"
    if not all_finite(case.model, functions=True):
        # inf * 0 and inf - inf: (x @ A) @ B need not propagate an Inf the way x @ W does; only run it
        for feeds in case.feeds:
            run_model(res.model, feeds)
        return
    if truncated:
        ref = truncated_reference(case.model, res.layers)
        reference_outputs = [run_model(ref, f) for f in case.feeds]
    elif reference_outputs is None:
        reference_outputs = [run_model(case.model, f) for f in case.feeds]
    for feeds, want, scales in zip(case.feeds, reference_outputs, case.scales()):
        got = run_model(res.model, feeds)
        problem = compare_outputs(want, got, case.tolerance, scales)
        assert problem is None, f"{problem} (feeds {sorted(feeds)})"


def check_dry_run(case: Case, res, **options) -> None:
    """A dry run leaves the model as it was and predicts what the real run did."""
    import onnx_lowrank as ol

    dry = ol.compress(case.model, dry_run=True, min_params=0, allow_input_weights=case.allow_input_weights, **options)
    assert dry.model == case.model, "dry run changed the model"
    fields = ("node", "weight", "rank", "factorized", "params_before", "params_after", "macs_before", "macs_after", "reason", "conv_mode")
    for a, b in zip(dry.layers, res.layers):
        da, db = {f: getattr(a, f) for f in fields}, {f: getattr(b, f) for f in fields}
        assert da == db, f"dry run predicted {da}, the run did {db}"
    assert len(dry.layers) == len(res.layers)


def check_twice(case: Case, res, reference_outputs: list[list[np.ndarray]]) -> None:
    """Compressing the result again (energy 1.0) keeps it valid, no larger, and computing the same."""
    import onnx_lowrank as ol

    again = ol.compress(res.model, energy=1.0, min_params=0, allow_input_weights=case.allow_input_weights)
    second = Case(res.model, case.feeds, case.dtype, case.kind, case.allow_input_weights, case.tags, case._scales)
    check_result(second, again, reference_outputs)


# ---- byte mutations -----------------------------------------------------------------------------


def _flip(rng: random.Random, data: bytearray) -> bytearray:
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return data


def _set_byte(rng: random.Random, data: bytearray) -> bytearray:
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    return data


def _insert(rng: random.Random, data: bytearray) -> bytearray:
    i = rng.randrange(len(data) + 1)
    data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return data


def _delete(rng: random.Random, data: bytearray) -> bytearray:
    i = rng.randrange(len(data))
    del data[i:i + rng.randint(1, 16)]
    return data


def _truncate_bytes(rng: random.Random, data: bytearray) -> bytearray:
    return data[:rng.randrange(len(data))]


def _duplicate(rng: random.Random, data: bytearray) -> bytearray:
    i = rng.randrange(len(data))
    chunk = data[i:i + rng.randint(1, 64)]
    j = rng.randrange(len(data) + 1)
    data[j:j] = chunk
    return data


MUTATIONS = {"flip": _flip, "set": _set_byte, "insert": _insert, "delete": _delete, "truncate": _truncate_bytes, "duplicate": _duplicate}


def mutate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One to three random byte-level mutations of ``data``; returns the bytes and their names."""
    out = bytearray(data)
    names = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if not out:
            break
        name = rng.choice(sorted(MUTATIONS))
        out = MUTATIONS[name](rng, out)
        names.append(name)
    return bytes(out), "+".join(names)


def seed_models() -> dict[str, onnx.ModelProto]:
    """Small valid models to mutate (saved plain, or with external data by the caller)."""
    rng = np.random.default_rng(5)

    def lr(m, n, r):
        return (rng.standard_normal((m, r)) @ rng.standard_normal((r, n))).astype(np.float32)

    f = TensorProto.FLOAT
    vi = helper.make_tensor_value_info
    init = numpy_helper.from_array
    models = {}
    #   x[2,24] --MatMul(W1)--> h --Gemm(W2^T, C)--> y
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm"),
                           helper.make_node("Gemm", ["h", "W2", "C"], ["y"], name="gemm", transB=1, alpha=0.5)],
                          "plain", [vi("x", f, [2, 24])], [vi("y", f, [2, 20])],
                          [init(lr(24, 16, 2), "W1"), init(lr(20, 16, 3), "W2"), init(rng.standard_normal(20).astype(np.float32), "C")])
    models["plain"] = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    #   Constant(Wc) ; x --MatMul(Wc)--> y ; x --Conv(K)--> z
    g = helper.make_graph([helper.make_node("Constant", [], ["Wc"], name="const", value=init(lr(24, 20, 2), "Wc")),
                           helper.make_node("MatMul", ["x", "Wc"], ["y"], name="mm"),
                           helper.make_node("Conv", ["img", "K"], ["z"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3])],
                          "constant", [vi("x", f, [2, 24]), vi("img", f, [1, 4, 6, 6])], [vi("y", f, [2, 20]), vi("z", f, [1, 8, 6, 6])],
                          [init(lr(8, 36, 2).reshape(8, 4, 3, 3), "K")])
    models["constant"] = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    #   If(c){x @ W}{x @ W}
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"], name="then_mm")], "then", [], [vi("t", f, [2, 20])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["e"], name="else_mm")], "else", [], [vi("e", f, [2, 20])])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)], "if",
                          [vi("x", f, [2, 24]), vi("c", TensorProto.BOOL, [])], [vi("y", f, [2, 20])], [init(lr(24, 20, 2), "W")])
    models["if"] = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return models
