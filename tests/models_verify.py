"""Tiny models for the calibration and verification tests, built in code with seeded weights."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from models import init, make_model, vi

I64 = TensorProto.INT64


#   x[batch,k] --MatMul(W[k,n])--> scores[batch,n]
def scores_model(k: int = 16, n: int = 6, seed: int = 0, noise: float = 0.0, batch="batch") -> onnx.ModelProto:
    """``noise`` perturbs W (relative to its scale) so a test can dial in a drift."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    if noise:
        w = w + noise * np.random.default_rng(seed + 1).standard_normal((k, n)).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "W"], ["scores"], name="mm")],
                      [vi("x", [batch, k])], [vi("scores", [batch, n])], [init("W", w)])


#   input_ids[batch,seq] --Gather(E[100,8])--> hidden[batch,seq,8] ------------------------------> (output)
#   attention_mask[batch,seq] --Cast,Unsqueeze--> Mul(hidden) --ReduceSum(seq)--> pooled --MatMul(W[8,4])--> logits[batch,4]
def token_model(vocab: int = 100, d: int = 8, classes: int = 4, seed: int = 0, noise: float = 0.0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((vocab, d)).astype(np.float32)
    w = rng.standard_normal((d, classes)).astype(np.float32)
    if noise:
        w = w + noise * np.random.default_rng(seed + 1).standard_normal((d, classes)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["hidden"], name="embed"),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "last"], ["mask3"]),
        helper.make_node("Mul", ["hidden", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "seq_axis"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "W"], ["logits"], name="head"),
    ]
    inits = [init("E", emb), init("W", w), init("last", np.array([-1], np.int64)), init("seq_axis", np.array([1], np.int64))]
    return make_model(nodes, [vi("input_ids", ["batch", "seq"], I64), vi("attention_mask", ["batch", "seq"], I64)],
                      [vi("logits", ["batch", classes]), vi("hidden", ["batch", "seq", d])], inits)
