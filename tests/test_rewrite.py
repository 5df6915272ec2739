"""Every discovery variant: outputs match after the rewrite, node counts and factor shapes are right,
and every skip reason is triggered."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank as ol
from models import gemm_model, init, lowrank, make_model, matmul_model, ops, run, vi

RNG = np.random.default_rng(42)


def x_for(model, name="x"):
    for i in model.graph.input:
        if i.name == name:
            shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
            dt = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            return RNG.standard_normal(shape).astype(dt)
    raise KeyError(name)


def check_equivalent(model, result, feeds=None, atol=1e-4):
    feeds = feeds or {"x": x_for(model)}
    onnx.checker.check_model(result.model, full_check=True)
    before, after = run(model, feeds), run(result.model, feeds)
    for b, a in zip(before, after):
        np.testing.assert_allclose(a, b, atol=atol, rtol=1e-4)


def decision(result, node):
    return next(d for d in result.layers if d.node == node)


@pytest.mark.parametrize("batch_shape", [(3,), (2, 7), (2, 3, 4), ()])
def test_matmul_weight_second_any_activation_rank(batch_shape):
    m = matmul_model(batch_shape=batch_shape)
    res = ol.compress(m, energy=1.0, min_params=0)
    check_equivalent(m, res)
    assert ops(res.model) == ["MatMul", "MatMul"]
    d = decision(res, "mm")
    assert d.factorized and d.rank == 6 and d.shape == (64, 48)
    shapes = {t.name: list(t.dims) for t in res.model.graph.initializer}
    assert shapes == {"W__lowrank_A": [64, 6], "W__lowrank_B": [6, 48]}


def test_matmul_weight_first():
    #   W[48,64] @ x[2,64,5] -> y[2,48,5]
    m = make_model([helper.make_node("MatMul", ["W", "x"], ["y"], name="mm")], [vi("x", [2, 64, 5])], [vi("y", [2, 48, 5])],
                   [init("W", lowrank(48, 64, 4))])
    res = ol.compress(m, energy=1.0, min_params=0)
    check_equivalent(m, res)
    assert decision(res, "mm").rank == 4
    assert [n.input[0] for n in res.model.graph.node] == ["W__lowrank_B", "W__lowrank_A"]


@pytest.mark.parametrize("weight_first", [False, True])
@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("bias", ["none", "row", "full", "scalar", "column"])
def test_gemm_all_forms(weight_first, trans_a, trans_b, alpha, beta, bias):
    out = (40, 5) if weight_first else (5, 40)
    bias_shape = {"none": None, "row": (out[1],), "full": out, "scalar": (1,), "column": (out[0], 1)}[bias]
    m = gemm_model(trans_a, trans_b, alpha, beta, bias_shape, weight_first)
    onnx.checker.check_model(m, full_check=True)
    res = ol.compress(m, energy=1.0, min_params=0)
    check_equivalent(m, res)
    assert ops(res.model) == ["Gemm", "Gemm"]
    second = res.model.graph.node[1]
    attrs = {a.name: helper.get_attribute_value(a) for a in second.attribute}
    assert attrs.get("alpha", 1.0) == pytest.approx(alpha) and attrs.get("beta", 1.0) == pytest.approx(beta)
    assert (len(second.input) == 3) == (bias != "none")
    assert decision(res, "gemm").rank == 5


def test_gemm_old_opset_gets_explicit_zero_bias():
    m = gemm_model(0, 1, bias_shape=(40,), opset=9)
    res = ol.compress(m, energy=1.0, min_params=0)
    check_equivalent(m, res)
    assert len(res.model.graph.node[0].input) == 3
    assert res.model.opset_import[0].version == 9


def test_constant_node_weights_model_without_initializers():
    w = lowrank(32, 24, 3)
    const = helper.make_node("Constant", [], ["Wc"], name="const_w", value=numpy_helper.from_array(w, "Wc"))
    m = make_model([const, helper.make_node("MatMul", ["x", "Wc"], ["y"], name="mm")], [vi("x", [2, 32])], [vi("y", [2, 24])])
    res = ol.compress(m, energy=1.0, min_params=0)
    check_equivalent(m, res)
    assert ops(res.model) == ["Constant", "Constant", "MatMul", "MatMul"]
    assert len(res.model.graph.initializer) == 0


def _if_model():
    #   main: x --Identity--> xx ; If(c) { then: x @ W (outer W) ; else: xx @ W }
    w = lowrank(32, 24, 4)
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"], name="then_mm")], "then", [], [vi("t", [2, 24])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["xx", "W"], ["e"], name="else_mm")], "else", [], [vi("e", [2, 24])])
    nodes = [helper.make_node("Identity", ["x"], ["xx"]), helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [vi("x", [2, 32]), vi("c", [], TensorProto.BOOL)], [vi("y", [2, 24])], [init("W", w)])


@pytest.mark.parametrize("ir_version", [3, 8])
def test_if_bodies_use_outer_initializer_shared_by_two_users(ir_version):
    m = _if_model()
    if ir_version < 4:
        m.graph.input.append(vi("W", [32, 24]))
        m.ir_version = 3
    onnx.checker.check_model(m, full_check=True)
    if ir_version < 4:
        # In IR 3 every initializer is a graph input, hence overridable: left alone unless allowed.
        assert all("graph input" in d.reason for d in ol.compress(m, energy=1.0, min_params=0).layers)
    res = ol.compress(m, energy=1.0, min_params=0, allow_input_weights=ir_version < 4)
    for c in (True, False):
        check_equivalent(m, res, {"x": x_for(m), "c": np.array(c)})
    names = [d.node for d in res.layers]
    assert sorted(names) == ["branch/else_branch/else_mm", "branch/then_branch/then_mm"]
    assert res.layers[0].params_before == 32 * 24 and res.layers[1].params_before == 0
    assert res.layers[1].shared_with == names[0]
    if ir_version < 4:
        assert sorted(i.name for i in res.model.graph.input) == ["W__lowrank_A", "W__lowrank_B", "c", "x"]
    # factorized once, in the scope of W; no copies in the bodies
    assert sorted(t.name for t in res.model.graph.initializer) == ["W__lowrank_A", "W__lowrank_B"]
    for node in res.model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                assert len(a.g.initializer) == 0


def test_loop_body_with_outer_weight():
    w = lowrank(16, 16, 2)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W"], ["h_out"], name="body_mm"), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("h_in", [2, 16])],
        [vi("cond_out", [], TensorProto.BOOL), vi("h_out", [2, 16])],
    )
    loop = helper.make_node("Loop", ["n", "", "x"], ["y"], name="loop", body=body)
    m = make_model([loop], [vi("x", [2, 16]), vi("n", [], TensorProto.INT64)], [vi("y", [2, 16])], [init("W", w)])
    res = ol.compress(m, energy=1.0, min_params=0)
    check_equivalent(m, res, {"x": x_for(m), "n": np.array(3, dtype=np.int64)}, atol=1e-3)
    assert res.layers[0].node == "loop/body/body_mm" and res.layers[0].factorized


def test_shared_weight_matmul_and_transposed_gemm_reuse_both_factors():
    w = lowrank(32, 32, 3)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Gemm", ["h", "W"], ["y"], name="gemm", transB=1)]
    m = make_model(nodes, [vi("x", [4, 32])], [vi("y", [4, 32])], [init("W", w)])
    res = ol.compress(m, energy=1.0, min_params=0)
    check_equivalent(m, res)
    assert len(res.model.graph.initializer) == 2
    assert res.totals.params_before == 32 * 32 and res.totals.params_after == 3 * 64
    assert res.totals.macs_after == 2 * 3 * 64


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_weight_dtype_is_preserved(dtype):
    m = matmul_model(k=32, n=32, r=3, dtype=dtype)
    res = ol.compress(m, energy=1.0, min_params=0)
    check_equivalent(m, res, atol=5e-2 if dtype == np.float16 else 1e-6)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    assert {t.data_type for t in res.model.graph.initializer} == {elem}


def test_bfloat16_weight_is_factorized_in_bfloat16():
    m = matmul_model(k=32, n=32, r=3)
    w = numpy_helper.to_array(m.graph.initializer[0])
    bf = helper.make_tensor("W", TensorProto.BFLOAT16, [32, 32], [float(v) for v in w.ravel()])
    m.graph.initializer[0].CopyFrom(bf)
    res = ol.compress(m, energy=0.999, min_params=0)  # bf16 rounding adds a small full-rank tail
    assert res.layers[0].factorized and res.layers[0].rank == 3
    assert {t.data_type for t in res.model.graph.initializer} == {TensorProto.BFLOAT16}
    a, b = (numpy_helper.to_array(t).astype(np.float32) for t in res.model.graph.initializer)
    np.testing.assert_allclose(a @ b, w, atol=0.05 * np.abs(w).max())


def test_output_keeps_opset_ir_metadata_and_records_the_pass():
    m = matmul_model()
    m.ir_version = 7
    m.metadata_props.add(key="author", value="me")
    m.doc_string = "keep me"
    res = ol.compress(m, energy=0.9, min_params=0)
    assert res.model.ir_version == 7
    assert [(o.domain, o.version) for o in res.model.opset_import] == [("", 17)]
    assert res.model.doc_string == "keep me"
    props = {p.key: p.value for p in res.model.metadata_props}
    assert props["author"] == "me"
    import json

    recorded = json.loads(props["onnx_lowrank"])
    assert recorded["factorized"] == 1 and recorded["config"]["energy"] == 0.9


def test_factors_never_folded_into_constant_product():
    res = ol.compress(matmul_model(), energy=1.0, min_params=0)
    consts = {t.name for t in res.model.graph.initializer}
    for node in res.model.graph.node:
        assert not set(node.input) <= consts, "a node multiplies two constants"


def test_factors_deterministic_and_named_after_weight():
    a = ol.compress(matmul_model(), energy=0.9, min_params=0).model
    b = ol.compress(matmul_model(), energy=0.9, min_params=0).model
    assert [t.SerializeToString() for t in a.graph.initializer] == [t.SerializeToString() for t in b.graph.initializer]
    assert all(t.name.startswith("W__lowrank_") for t in a.graph.initializer)


def test_input_model_proto_is_not_modified():
    m = matmul_model()
    before = m.SerializeToString()
    ol.compress(m, energy=0.9, min_params=0)
    assert m.SerializeToString() == before


@pytest.mark.parametrize("min_params", [0, 4096])
def test_rerun_on_compressed_model_reports_factor_pair(min_params):
    once = ol.compress(matmul_model(k=128, n=128, r=4), energy=1.0, min_params=0).model
    twice = ol.compress(once, energy=1.0, min_params=min_params)  # each factor is 512 < 4096 elements
    assert twice.totals.factorized == 0
    assert all("already low-rank" in d.reason for d in twice.layers)
    assert twice.totals.params_before == twice.totals.params_after == 2 * 128 * 4


# ---- skip reasons -------------------------------------------------------------------------


def _reason(model, **kw):
    kw.setdefault("min_params", 0)
    kw.setdefault("energy", 1.0)
    res = ol.compress(model, **kw)
    assert res.totals.factorized == 0
    assert res.model.graph.SerializeToString() == model.graph.SerializeToString(), "skipped model must be unchanged"
    return res.layers[0].reason


def test_skip_non_float_weight():
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [2, 8], TensorProto.INT32)],
                   [vi("y", [2, 8], TensorProto.INT32)], [init("W", np.ones((8, 8), np.int32))])
    assert "not floating point" in _reason(m)


def test_skip_quantized_weight():
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"]), helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    m = make_model(nodes, [vi("x", [2, 8])], [vi("y", [2, 8])],
                   [init("Wq", np.ones((8, 8), np.int8)), init("s", np.array(0.1, np.float32)), init("z", np.array(0, np.int8))])
    assert "quantized" in _reason(m)


def test_skip_weight_that_is_graph_input():
    m = matmul_model()
    m.graph.input.append(vi("W", [64, 48]))
    assert "graph input" in _reason(m)


def test_skip_min_params():
    assert "min_params" in _reason(matmul_model(), min_params=10_000)


def test_skip_saves_nothing():
    m = matmul_model(k=16, n=16, r=16)
    assert "saves nothing" in _reason(m)


def test_skip_excluded_and_not_included():
    assert "excluded by exclude" in _reason(matmul_model(), exclude="^mm$")
    assert "not matched by include" in _reason(matmul_model(), include="attention")
    assert "excluded by exclude" in _reason(matmul_model(), exclude="^W$")


def test_skip_no_constant_weight_and_both_constant():
    m = make_model([helper.make_node("MatMul", ["x", "z"], ["y"], name="mm")], [vi("x", [2, 8]), vi("z", [8, 8])], [vi("y", [2, 8])])
    assert "computed at run time" in _reason(m)
    m2 = make_model([helper.make_node("MatMul", ["A", "B"], ["y"], name="mm")], [], [vi("y", [8, 8])],
                    [init("A", np.ones((8, 8), np.float32)), init("B", np.ones((8, 8), np.float32))])
    assert "both operands are constant" in _reason(m2)


def test_skip_3d_weight():
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [2, 4, 8])], [vi("y", [2, 4, 8])],
                   [init("W", np.ones((2, 8, 8), np.float32))])
    assert "3-D" in _reason(m)


def test_skip_weight_also_used_by_another_op():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Add", ["h", "W"], ["y"])]
    m = make_model(nodes, [vi("x", [64, 64])], [vi("y", [64, 64])], [init("W", lowrank(64, 64, 3))])
    assert "also used by Add" in _reason(m)


def test_skip_shared_weight_when_one_user_is_excluded():
    w = lowrank(32, 32, 3)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="keep"), helper.make_node("MatMul", ["h", "W"], ["y"], name="drop")]
    m = make_model(nodes, [vi("x", [4, 32])], [vi("y", [4, 32])], [init("W", w)])
    res = ol.compress(m, energy=1.0, min_params=0, exclude="drop")
    assert res.totals.factorized == 0
    assert "shared with drop" in decision(res, "keep").reason


def test_no_candidates_is_not_an_error():
    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    res = ol.compress(m)
    assert res.layers == [] and not res.modified
    assert res.model.graph.SerializeToString() == m.graph.SerializeToString()


def test_op_types_filter():
    res = ol.compress(gemm_model(), energy=1.0, min_params=0, op_types=("MatMul",))
    assert res.layers == []


def test_rank_rules_fixed_rank_and_multiple():
    m = matmul_model(k=128, n=128, r=40)
    assert decision(ol.compress(m, rank=8, min_params=0), "mm").rank == 8
    assert decision(ol.compress(m, energy=0.5, rank_multiple=16, min_params=0), "mm").rank % 16 == 0


def test_a_weight_behind_a_node_the_pass_does_not_fold_says_so_and_how_to_fix_it():
    """A widening Cast (float16 stored, float32 computed) would double the bytes if folded."""
    from onnx import helper

    from models import init, lowrank, make_model, vi

    op = "Cast"
    m = make_model([helper.make_node(op, ["W"], ["Wt"], name="prep", to=1), helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm")],
                   [vi("x", ["N", 16])], [vi("y", ["N", 8])], [init("W", lowrank(16, 8, 2).astype(np.float16))])
    (row,) = ol.compress(m, energy=0.99, min_params=0).layers
    assert f"input 1 is {op} 'prep' of the constant 'W', not folded: a Cast to a wider type" in row.reason
    assert "fold constants elsewhere if that suits (onnxsim" in row.reason


def test_a_python_caller_gets_the_warnings_without_setting_up_logging():
    """Deploy pipelines call compress() without logging configured: the warnings are on the result."""
    from onnx_lowrank.runtime import available_cores

    res = ol.compress(matmul_model(), rank=2, min_params=0, cores=available_cores() + 1)
    assert len(res.warnings) == 1 and res.warnings[0].startswith(f"cores {available_cores() + 1}: this process may run on")
    assert json.loads(res.to_json())["warnings"] == res.warnings
    assert ol.compress(matmul_model(), rank=2, min_params=0).warnings == []
    assert "warnings" not in json.loads(ol.compress(matmul_model(), rank=2, min_params=0).to_json())


def test_recurrent_nodes_are_listed_with_their_weights_not_hidden():
    """tf2onnx writes a Keras LSTM as an ONNX LSTM node, whose weights the pass leaves alone: the
    report says so instead of leaving them out."""
    hidden, feat = 8, 16
    rng = np.random.default_rng(2)
    w = init("W", rng.standard_normal((1, 4 * hidden, feat)).astype(np.float32))
    r = init("R", rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32))
    b = init("B", np.zeros((1, 8 * hidden), np.float32))
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["", "h"], hidden_size=hidden, name="lstm"),
             helper.make_node("Squeeze", ["h", "ax"], ["h2"]), helper.make_node("MatMul", ["h2", "V"], ["y"], name="head")]
    m = make_model(nodes, [vi("x", [5, 2, feat])], [vi("y", [2, 4])],
                   [w, r, b, init("ax", np.array([0], np.int64)), init("V", lowrank(hidden, 4, 2))])
    res = ol.compress(m, rank=2, min_params=0)
    assert res.sections["recurrent"] == {"nodes": [{"node": "lstm", "op_type": "LSTM", "params": 4 * hidden * (feat + hidden) + 8 * hidden}]}
    from onnx_lowrank.report import render_sections

    assert "recurrent:     1 LSTM node(s) with 832 constant weight parameters, left as they are" in render_sections(res.sections)
    assert "recurrent" not in ol.compress(matmul_model(), rank=2, min_params=0).sections
