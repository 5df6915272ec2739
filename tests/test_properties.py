"""Property-based tests: random small graphs (tests/strategies.py) go through compress() and must
come out valid, runnable, no larger, and computing what the original computed.

The graphs (each drawn per kind, so every kind is tried on every run):

    matrix chain / branch    x --MatMul|Gemm--> ... (--Add--) --> y     MatMul in float16/32/64
    conv chain / branch      x --Conv--> ...                            1-D/2-D/3-D, pads, strides,
    conv + gemm              x --Conv--Flatten--Gemm--> y               dilations, groups
    fork                     x --chain--> y1, x --chain--> y2           weights shared across them
    if / loop                outer-scope weights used inside If/Loop bodies (and nested Ifs)
    function                 a model-local function (Constant W + MatMul) called from the graph
    old IR                   IR 3 + opset 7/8, IR 4 + opset 9

Every example is checked first to be valid ONNX that onnxruntime runs, so a failure below is the
package's.  Hypothesis runs derandomized (the same examples on every run) without a database;
a failing property shrinks its example, which takes a while (tens of seconds) on top of the ~20 s
the file needs when everything passes.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import onnx_lowrank as ol
from models import init, lowrank, make_model, run, vi
from strategies import KINDS, Case, check_counts, check_dry_run, check_original, check_result, check_twice, graph_cases

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def _describe(case: Case) -> None:
    note(case.describe())
    for g_node in case.model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in g_node.attribute if a.type != onnx.AttributeProto.GRAPH
                 and a.type != onnx.AttributeProto.TENSOR}
        note(f"  {g_node.op_type}{'(' + g_node.domain + ')' if g_node.domain else ''} {list(g_node.input)} -> {list(g_node.output)} {attrs}")
    for t in case.model.graph.initializer:
        note(f"  init {t.name} {list(t.dims)}")


def _compress(case: Case, **options) -> ol.CompressResult:
    try:
        return ol.compress(case.model, min_params=0, allow_input_weights=case.allow_input_weights, **options)
    except ol.LowRankError as exc:  # a valid model must not be refused (StageError: an internal error)
        raise AssertionError(f"compress() refused a valid model: {type(exc).__name__}: {exc}") from exc


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_energy_one_is_exact_valid_and_never_larger(kind, data):
    case = data.draw(graph_cases([kind]), label="case")
    _describe(case)
    reference = check_original(case)
    res = _compress(case, energy=1.0)
    check_result(case, res, reference)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_fixed_rank_computes_the_truncated_weights(kind, data):
    case = data.draw(graph_cases([kind]), label="case")
    rank = data.draw(st.integers(1, 8), label="rank")
    _describe(case)
    check_original(case)
    res = _compress(case, rank=rank)
    for d in res.layers:
        assert not d.factorized or d.rank <= rank, f"{d.node}: rank {d.rank} > --rank {rank}"
    # the reference is the original with each factorized weight replaced by its truncated SVD
    check_result(case, res, truncated=True)


@settings(max_examples=80, **SETTINGS)
@given(case=graph_cases(), rank=st.one_of(st.none(), st.integers(1, 6)))
def test_dry_run_predicts_the_run_and_a_second_run_keeps_the_result(case, rank):
    _describe(case)
    reference = check_original(case)
    options = {"energy": 1.0} if rank is None else {"rank": rank}
    res = _compress(case, **options)
    check_dry_run(case, res, **options)
    if rank is None:
        check_twice(case, res, reference)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_reported_model_parameters_are_the_models_tensors(kind, data):
    case = data.draw(graph_cases([kind]), label="case")
    rank = data.draw(st.one_of(st.none(), st.integers(1, 6)), label="rank")
    _describe(case)
    res = _compress(case, **({"energy": 1.0} if rank is None else {"rank": rank}))
    check_counts(case, res)


# ---- fixed examples of the shapes the brief names, so they run even if the draw changes ------


#   x[3,32] --MatMul(W)--> h ; If(c) { then: h @ V ; else: Identity(h) @ V } --> y   (V outer, rank 2)
def test_if_branches_with_an_outer_weight():
    v = lowrank(24, 16, 2, 3)
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "V"], ["t"], name="then_mm")], "then", [], [vi("t", [3, 16])])
    else_g = helper.make_graph([helper.make_node("Identity", ["h"], ["hh"]), helper.make_node("MatMul", ["hh", "V"], ["e"], name="else_mm")],
                               "else", [], [vi("e", [3, 16])])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    model = make_model(nodes, [vi("x", [3, 32]), vi("c", [], onnx.TensorProto.BOOL)], [vi("y", [3, 16])],
                       [init("W", lowrank(32, 24, 3, 1)), init("V", v)])
    res = ol.compress(model, energy=1.0, min_params=0)
    onnx.checker.check_model(res.model, full_check=True)
    assert all(d.factorized for d in res.layers)
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        np.testing.assert_allclose(run(res.model, feeds)[0], run(model, feeds)[0], rtol=1e-3, atol=1e-4)


#   x[2,32] --local.fn:Proj{Constant Wc; X @ Wc}--> p --MatMul(W)--> y
def test_model_local_function_is_left_as_it_is():
    wc = lowrank(32, 24, 2, 4)
    fn = helper.make_function("local.fn", "Proj", ["X"], ["Y"],
                              [helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(wc, "Wc")),
                               helper.make_node("MatMul", ["X", "Wc"], ["Y"])], [helper.make_opsetid("", 17)])
    graph = helper.make_graph([helper.make_node("Proj", ["x"], ["p"], domain="local.fn", name="call"),
                               helper.make_node("MatMul", ["p", "W"], ["y"], name="mm")],
                              "g", [vi("x", [2, 32])], [vi("y", [2, 20])], [init("W", lowrank(24, 20, 2, 5))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local.fn", 1)], functions=[fn])
    onnx.checker.check_model(model, full_check=True)
    res = ol.compress(model, energy=1.0, min_params=0)
    onnx.checker.check_model(res.model, full_check=True)
    assert [d.node for d in res.layers if d.factorized] == ["mm"]
    assert res.model.functions[0] == model.functions[0]
    x = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    np.testing.assert_allclose(run(res.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-3, atol=1e-4)


#   x[4,24] --Gemm(x, W, C)--> y    opset 9: the first Gemm of the pair needs a C, a zero
def test_old_opset_gemm_zero_bias_is_counted_in_the_model_parameters():
    model = make_model([helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="gemm")], [vi("x", [4, 24])], [vi("y", [4, 20])],
                       [init("W", lowrank(24, 20, 2, 6)), init("C", np.zeros(20, np.float32))], opset=9, ir_version=4)
    res = ol.compress(model, energy=1.0, min_params=0)
    held = sum(int(np.prod(t.dims)) for t in res.model.graph.initializer)
    assert res.totals.model_params_after == held, "the explicit zero C of the first Gemm is a tensor of the model too"


#   x[2,32] --MatMul(W)--> y    W finite, rank 2, but ||W||_F exceeds float32's range
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_weight_whose_norm_overflows_gives_finite_factors_or_is_left_alone(dtype):
    top = float(np.finfo(dtype).max)
    w = lowrank(32, 24, 2, 7, dtype=np.float64)
    w = (w / np.abs(w).max() * top / 2).astype(dtype)  # every entry finite; the norm is not representable
    assert np.all(np.isfinite(w))
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [2, 32], elem)], [vi("y", [2, 24], elem)],
                       [init("W", w)])
    x = (np.random.default_rng(2).standard_normal((2, 32)) / top * 1e3).astype(dtype)
    want = run(model, {"x": x})[0]
    assert np.all(np.isfinite(want))
    res = ol.compress(model, energy=1.0, min_params=0)
    for t in res.model.graph.initializer:
        assert np.all(np.isfinite(numpy_helper.to_array(t))), f"{t.name} holds NaN/Inf"
    got = run(res.model, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(np.abs(want).max()))
