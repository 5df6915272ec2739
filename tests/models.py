"""Tiny models built in code, with seeded weights, for the tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def lowrank(m: int, n: int, r: int, seed: int = 0, dtype=np.float32) -> np.ndarray:
    """An exactly rank-``r`` matrix of shape (m, n)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)).astype(dtype)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17, ir_version: int | None = None, **graph_kw) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers), **graph_kw)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def vi(name: str, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(arr, name)


#   x[b,k] --MatMul(W[k,n])--> y[b,n]
def matmul_model(k=64, n=48, r=6, batch_shape=(3,), seed=0, dtype=np.float32) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        [vi("x", [*batch_shape, k], elem)],
        [vi("y", [*batch_shape, n], elem)],
        [init("W", lowrank(k, n, r, seed, dtype))],
    )


#   x[b,k] --Gemm(W, C; transA, transB, alpha, beta)--> y
def gemm_model(trans_a=0, trans_b=0, alpha=1.0, beta=1.0, bias_shape=(40,), weight_first=False, m=5, k=64, n=40, r=5, opset=17):
    rng = np.random.default_rng(1)
    if not weight_first:
        x_shape = [k, m] if trans_a else [m, k]
        w = lowrank(k, n, r, 2)
        w = w.T.copy() if trans_b else w
        inputs = ["x", "W"]
        out_shape = [m, n]
    else:
        # W[m', k] @ x[k, n']: weight is the first operand
        w = lowrank(n, k, r, 2)
        w = w.T.copy() if trans_a else w
        x_shape = [m, k] if trans_b else [k, m]
        inputs = ["W", "x"]
        out_shape = [n, m]
    inits = [init("W", w)]
    if bias_shape is not None:
        inputs.append("C")
        inits.append(init("C", rng.standard_normal(bias_shape).astype(np.float32)))
    attrs = {"transA": trans_a, "transB": trans_b, "alpha": alpha, "beta": beta}
    return make_model([helper.make_node("Gemm", inputs, ["y"], name="gemm", **attrs)], [vi("x", x_shape)], [vi("y", out_shape)], inits, opset=opset)


def data_files(folder, model_name: str) -> list:
    """The content-named data files ``MODEL.<16 hex>.data`` in ``folder`` (at most one after a save)."""
    import re
    from pathlib import Path

    pattern = re.compile(re.escape(model_name) + r"\.[0-9a-f]{16}\.data$")
    return sorted(p for p in Path(folder).iterdir() if pattern.match(p.name))


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]
