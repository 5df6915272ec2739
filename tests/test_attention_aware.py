"""Attention-aware whitening: query/key projections weighed by what they are scored against."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnx_lowrank as ol
from onnx_lowrank import decompose
from onnx_lowrank.activations import capture_grams
from onnx_lowrank.cli import main
from onnx_lowrank.discovery import discover
from onnx_lowrank.report import render_table
from models import init, make_model, run, vi

RNG = np.random.default_rng(11)
B, T, H, D = 3, 6, 2, 8
N = H * D


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {k: (rng.standard_normal((N, N)) / np.sqrt(N)).astype(np.float32) for k in ("Wq", "Wk", "Wv", "Wo")}
    # keys concentrated in a few directions per head: what the query error meets is far from isotropic
    w["Wk"] = (w["Wk"] * np.linspace(3.0, 0.05, N)[None, :]).astype(np.float32)
    w.update({f"b{k[1]}": (0.1 * rng.standard_normal(N)).astype(np.float32) for k in ("Wq", "Wk", "Wv")})
    return w


def attention_model(split=(0, 0, H, D), perm_q=(0, 2, 1, 3), perm_k=(0, 2, 3, 1), seed: int = 3):
    """One attention layer as PyTorch exports it unfused::

        q = x Wq + bq -> Reshape(B, T, H, D) -> Transpose(0,2,1,3) -> Mul(1/sqrt(D))
        k = x Wk + bk -> Reshape -> Transpose(0,2,3,1)      scores = q @ k -> Softmax
        v = x Wv + bv -> Reshape -> Transpose(0,2,1,3)      (scores @ v) -> back to (B, T, N) -> Wo
    """
    w = _weights(seed)
    nodes = []
    for p in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["x", f"W{p}"], [f"{p}0"], name=f"{p}_proj"),
                  helper.make_node("Add", [f"{p}0", f"b{p}"], [f"{p}1"]),
                  helper.make_node("Reshape", [f"{p}1", "split" if p != "v" else "split_v"], [f"{p}2"])]
    nodes += [helper.make_node("Transpose", ["q2"], ["q3"], perm=list(perm_q)),
              helper.make_node("Mul", ["q3", "scale"], ["q4"]),
              helper.make_node("Transpose", ["k2"], ["k3"], perm=list(perm_k)),
              helper.make_node("Transpose", ["v2"], ["v3"], perm=[0, 2, 1, 3]),
              helper.make_node("MatMul", ["q4", "k3"], ["s"], name="scores"),
              helper.make_node("Softmax", ["s"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v3"], ["c"], name="context"),
              helper.make_node("Transpose", ["c"], ["c1"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["c1", "merge"], ["c2"]),
              helper.make_node("MatMul", ["c2", "Wo"], ["y"], name="o_proj")]
    inits = [init(k, v) for k, v in w.items()]
    inits += [init("split", np.array(split, np.int64)), init("split_v", np.array((0, 0, H, D), np.int64)), init("merge", np.array([0, 0, N], np.int64)),
              init("scale", np.array(1 / np.sqrt(D), np.float32))]
    return make_model(nodes, [vi("x", [B, T, N])], [vi("y", [B, T, N])], inits), w


def _calib(n: int = 4):
    return [{"x": RNG.standard_normal((B, T, N)).astype(np.float32)} for _ in range(n)]


def _keys(w, xs):
    """The key operand per head, (B, H, T, D), as the model scores it."""
    k = xs @ w["Wk"] + w["bk"]
    return k.reshape(B, T, H, D).transpose(0, 2, 1, 3)


def _scores(m, feed):
    """The attention scores ``s`` of a model built by :func:`attention_model`."""
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    probe.graph.output.append(onnx.ValueInfoProto(name="s"))
    return run(probe, feed)[-1]


def _score_error(model, result, calib) -> float:
    return sum(float(np.sum((_scores(result.model, f) - _scores(model, f)) ** 2)) for f in calib)


def test_two_sided_truncation_is_the_optimum_of_the_weighted_error():
    x = RNG.standard_normal((200, 12)) * np.linspace(2, 0.1, 12)
    k = RNG.standard_normal((300, 10)) * np.linspace(3, 0.05, 10)
    w = RNG.standard_normal((12, 10))
    g, h = x.T @ x, k.T @ k
    r = 3
    a, b = decompose.factors(decompose.whitened_spectrum(w, g, "left", 0.0, out_gram=h), r)
    a1, b1 = decompose.factors(decompose.whitened_spectrum(w, g, "left", 0.0), r)

    def cost(m):  # the error that reaches the scores: ||X (W - M) K^T||
        return np.linalg.norm(x @ (w - m) @ k.T)

    s = np.linalg.svd(np.linalg.cholesky(g).T @ w @ np.linalg.cholesky(h), compute_uv=False)
    assert cost(a @ b) == pytest.approx(np.sqrt(np.sum(s[r:] ** 2)), rel=1e-6)  # Eckart-Young in the weighted space
    assert cost(a @ b) < 0.9 * cost(a1 @ b1)
    # right side (W @ x): the output rows get the weight, and the map back is on A
    ar, br = decompose.factors(decompose.whitened_spectrum(w.T, g, "right", 0.0, out_gram=h), r)
    assert np.allclose(ar @ br, (a @ b).T, atol=1e-8)


def test_output_gram_shape_is_checked():
    with pytest.raises(ValueError, match="output Gram"):
        decompose.whitened_spectrum(np.ones((4, 3)), np.eye(4), "left", 0.01, out_gram=np.eye(4))


def test_capture_weighs_query_and_key_by_each_other_per_head():
    model, w = attention_model()
    calib = _calib()
    found = discover(model, min_params=0)
    by = {g.weight.name: g for g in found.groups}
    cap = capture_grams(model, found.groups, calib, None, attention=True)
    assert set(cap.out_grams) == {by["Wq"].key, by["Wk"].key}  # not the value or output projections
    keys = np.concatenate([_keys(w, f["x"]) for f in calib]).astype(np.float64)
    expect = np.zeros((N, N))
    for h in range(H):
        rows = keys[:, h].reshape(-1, D)
        expect[h * D:(h + 1) * D, h * D:(h + 1) * D] = rows.T @ rows
    assert np.allclose(cap.out_grams[by["Wq"].key], expect, rtol=1e-5)
    assert not capture_grams(model, found.groups, calib, None).out_grams  # only when asked


def test_a_head_layout_the_check_does_not_recognize_keeps_input_only_whitening():
    # heads split as (D, H) and then transposed: the head dimension is not the channel's low part
    model, _ = attention_model(split=(0, 0, D, H), perm_q=(0, 3, 1, 2), perm_k=(0, 3, 2, 1))
    found = discover(model, min_params=0)
    cap = capture_grams(model, found.groups, _calib(), None, attention=True)
    assert cap.out_grams == {} and len(cap.grams) == 4


def test_compress_lowers_the_score_error_at_equal_rank():
    model, w = attention_model()
    calib = _calib()
    kw = dict(rank=3, min_params=0, data_aware=True, include="q_proj", calib=calib)
    aware = ol.compress(model, **kw)
    plain = ol.compress(model, attention_aware=False, **kw)
    row = next(d for d in aware.layers if d.node == "q_proj")
    assert row.factorized and row.note == "attention-aware"
    assert next(d for d in plain.layers if d.node == "q_proj").note is None
    # only the query projection is a candidate here; the keys it meets need not be one
    assert aware.sections["data_aware"]["attention_weighted"] == 1

    assert _score_error(model, aware, calib) < 0.8 * _score_error(model, plain, calib)
    assert "attention-aware" in render_table(aware.layers)


def test_no_attention_aware_needs_data_aware(tmp_path, capsys):
    model, _ = attention_model()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    out = tmp_path / "o.onnx"
    assert main([str(src), "-o", str(out), "--no-attention-aware"]) != 0
    err = capsys.readouterr().err
    assert "--no-attention-aware" in err and "--data-aware" in err and "Traceback" not in err
    assert not out.exists()


def test_padded_keys_are_left_out_with_the_mask():
    model, w = attention_model()
    model.graph.input.append(vi("mask", [B, T], onnx.TensorProto.INT64))
    mask = np.ones((B, T), np.int64)
    mask[0, -2:] = 0
    feed = {"x": RNG.standard_normal((B, T, N)).astype(np.float32), "mask": mask}
    found = discover(model, min_params=0)
    by = {g.weight.name: g for g in found.groups}
    cap = capture_grams(model, found.groups, [feed], None, mask_input="mask", attention=True)
    keys = _keys(w, feed["x"]).astype(np.float64)
    rows = keys[:, 0][mask != 0]  # head 0, real tokens only
    assert np.allclose(cap.out_grams[by["Wq"].key][:D, :D], rows.T @ rows, rtol=1e-5)


def _variant(kind: str):
    """Attention graphs from other exporters: the score operands reached in other ways.

    ``bart``: the query is scaled before the head split; ``sdpa``: both sides scaled by a factor
    computed at run time from the shape; ``mqa``: one key/value head shared by the query heads;
    ``k_output``: the key projection's output is also a model output; ``memory``: the keys are a
    3-D (heads, dim, keys) input, broadcast over the batch.
    """
    w = _weights(5)
    hk = 1 if kind == "mqa" else H
    w["Wk"], w["bk"] = w["Wk"][:, :hk * D].copy(), w["bk"][:hk * D].copy()
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q0"], name="q_proj"), helper.make_node("Add", ["q0", "bq"], ["q1"])]
    q = "q1"
    if kind == "bart":
        nodes.append(helper.make_node("Mul", ["q1", "scale"], ["q1s"]))
        q = "q1s"
    nodes += [helper.make_node("Reshape", [q, "split"], ["q2"]), helper.make_node("Transpose", ["q2"], ["q3"], perm=[0, 2, 1, 3])]
    q = "q3"
    if kind == "sdpa":
        nodes += [helper.make_node("Shape", ["q3"], ["qs"]), helper.make_node("Slice", ["qs", "m1", "big"], ["qd"]),
                  helper.make_node("Cast", ["qd"], ["qdf"], to=onnx.TensorProto.FLOAT), helper.make_node("Sqrt", ["qdf"], ["qsq"]),
                  helper.make_node("Div", ["one", "qsq"], ["inv"]), helper.make_node("Sqrt", ["inv"], ["root"]),
                  helper.make_node("Mul", ["q3", "root"], ["q4"])]
        q = "q4"
    inputs = [vi("x", [B, T, N])]
    outputs = [vi("y", [B, H, T, T])]
    if kind == "memory":
        inputs.append(vi("mem", [H, D, T]))
        k = "mem"
    else:
        nodes += [helper.make_node("MatMul", ["x", "Wk"], ["k0"], name="k_proj"), helper.make_node("Add", ["k0", "bk"], ["k1"]),
                  helper.make_node("Reshape", ["k1", "split_k"], ["k2"]), helper.make_node("Transpose", ["k2"], ["k3"], perm=[0, 2, 3, 1])]
        k = "k3"
        if kind == "sdpa":
            nodes.append(helper.make_node("Mul", ["k3", "root"], ["k4"]))
            k = "k4"
        if kind == "k_output":
            outputs.append(vi("k1", [B, T, N]))
    nodes.append(helper.make_node("MatMul", [q, k], ["y"], name="scores"))
    inits = [init("Wq", w["Wq"]), init("bq", w["bq"]), init("Wk", w["Wk"]), init("bk", w["bk"]),
             init("split", np.array((0, 0, H, D), np.int64)), init("split_k", np.array((0, 0, hk, D), np.int64)),
             init("scale", np.array(0.3, np.float32)), init("one", np.array(1.0, np.float32)),
             init("m1", np.array([-1], np.int64)), init("big", np.array([9], np.int64))]
    if kind == "memory":
        inits = [t for t in inits if t.name not in ("Wk", "bk")]
    return make_model(nodes, inputs, outputs, inits), w


@pytest.mark.parametrize("kind, weighted", [("bart", {"Wq", "Wk"}), ("sdpa", {"Wq", "Wk"}), ("mqa", {"Wq", "Wk"}),
                                            ("k_output", {"Wq"}), ("memory", set())])
def test_exporter_variants(kind, weighted):
    model, w = _variant(kind)
    feeds = [{"x": RNG.standard_normal((B, T, N)).astype(np.float32)} for _ in range(2)]
    if kind == "memory":
        for f in feeds:
            f["mem"] = RNG.standard_normal((H, D, T)).astype(np.float32)
    found = discover(model, min_params=0)
    cap = capture_grams(model, found.groups, feeds, None, attention=True)
    got = {g.weight.name for g in found.groups if g.key in cap.out_grams}
    assert got == weighted
    if kind == "mqa":  # the single key head serves every query head: its weight sums their Grams
        xs = np.concatenate([f["x"] for f in feeds])
        qh = (xs @ w["Wq"] + w["bq"]).reshape(-1, T, H, D).astype(np.float64)
        k_gram = next(cap.out_grams[g.key] for g in found.groups if g.weight.name == "Wk")
        rows = qh.reshape(-1, D)
        assert np.allclose(k_gram, rows.T @ rows, rtol=1e-5)


def test_the_context_matmul_is_not_a_score_operand():
    # probabilities @ values contracts the token axis of the values, not their head dimension:
    # neither side is weighed, and the (batch, heads, T, T) probabilities are never fetched
    from onnx_lowrank.activations import _score_operands

    model, _ = attention_model()
    found = discover(model, min_params=0)
    ops = _score_operands(model.graph, found.groups)
    assert {(op.operand, op.other) for op in ops} == {("q4", "k3"), ("k3", "q4")}


def test_refine_keeps_the_attention_weighting():
    model, w = attention_model()
    calib = _calib()
    kw = dict(rank=3, min_params=0, data_aware=True, include="q_proj", calib=calib)

    refined = ol.compress(model, refine=True, **kw)
    plain = ol.compress(model, attention_aware=False, **kw)
    assert _score_error(model, refined, calib) < 0.8 * _score_error(model, plain, calib)
