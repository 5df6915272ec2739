"""The fold stage: weights behind layout operators become constants the pass can factorize."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnx_lowrank as ol
from models import init, lowrank, make_model, run, vi
from onnx_lowrank.plan import SkipCode
from onnx_lowrank.passes.fold import fold_layout

X = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)


def _chain_model(nodes, stored, out="Wt", x_type=TensorProto.FLOAT, ir_version=None, extra=()):
    return make_model([*nodes, helper.make_node("MatMul", ["x", out], ["y"], name="mm")],
                      [vi("x", ["N", 16], x_type)], [vi("y", ["N", 8], x_type)], [init("W", stored), *extra],
                      ir_version=ir_version)


def _only(res, name="mm"):
    return next(d for d in res.layers if d.node == name or d.node.endswith("/" + name))  # (a body's node: its scope first)


CHAINS = {
    "Transpose": (lambda w: w.T.copy(), [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="prep")], []),
    "Identity": (lambda w: w, [helper.make_node("Identity", ["W"], ["Wt"], name="prep")], []),
    "Flatten": (lambda w: w.reshape(16, 1, 8), [helper.make_node("Flatten", ["W"], ["Wt"], axis=1, name="prep")], []),
    "Squeeze": (lambda w: w.reshape(1, 16, 8), [helper.make_node("Squeeze", ["W", "ax"], ["Wt"], name="prep")],
                [init("ax", np.array([0], np.int64))]),
    "Unsqueeze+Reshape": (lambda w: w.reshape(128), [helper.make_node("Unsqueeze", ["W", "ax"], ["W1"], name="prep"),
                                                     helper.make_node("Reshape", ["W1", "shape"], ["Wt"], name="prep2")],
                          [init("ax", np.array([0], np.int64)), init("shape", np.array([16, -1], np.int64))]),
}


@pytest.mark.parametrize("kind", sorted(CHAINS))
def test_a_weight_behind_layout_operators_is_folded_and_factorized_under_its_own_name(kind):
    w = lowrank(16, 8, 2)
    store, nodes, extra = CHAINS[kind]
    m = _chain_model(nodes, store(w), extra=extra)
    before = m.SerializeToString()
    res = ol.compress(m, rank=2, min_params=0)
    assert m.SerializeToString() == before  # the caller's model is untouched
    row = _only(res)
    assert row.factorized and row.weight == "W" and row.rank == 2
    (chain,) = res.sections["fold"]["chains"]
    assert chain["source"] == "W" and chain["name"] == "W" and chain["readers"] == ["mm"]
    assert chain["ops"] == [n.op_type for n in nodes]
    out = res.model.graph
    assert not {"Transpose", "Identity", "Flatten", "Squeeze", "Unsqueeze", "Reshape"} & {n.op_type for n in out.node}
    assert {t.name for t in out.initializer}.isdisjoint({"ax", "shape"})  # the chain's own constants went with it
    np.testing.assert_allclose(run(res.model, {"x": X})[0], X @ w, rtol=1e-4, atol=1e-4)


def test_a_constant_node_source_becomes_a_constant_node():
    w = lowrank(16, 8, 2)
    const = helper.make_node("Constant", [], ["W"], value=onnx.numpy_helper.from_array(w.T.copy()), name="c")
    m = make_model([const, helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
                    helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm")], [vi("x", ["N", 16])], [vi("y", ["N", 8])])
    chains, _ = fold_layout(m)
    assert [c["name"] for c in chains] == ["W"]
    assert [n.op_type for n in m.graph.node] == ["Constant", "MatMul"] and not m.graph.initializer
    np.testing.assert_allclose(run(m, {"x": X})[0], X @ w, rtol=1e-5, atol=1e-5)


def test_a_narrowing_cast_folds_a_widening_one_does_not():
    w = lowrank(16, 8, 2)
    narrow = _chain_model([helper.make_node("Cast", ["W"], ["Wt"], to=TensorProto.FLOAT16, name="prep")], w, x_type=TensorProto.FLOAT16)
    assert [c["ops"] for c in fold_layout(narrow)[0]] == [["Cast"]]
    assert narrow.graph.initializer[0].data_type == TensorProto.FLOAT16
    wide = _chain_model([helper.make_node("Cast", ["W"], ["Wt"], to=TensorProto.FLOAT, name="prep")], w.astype(np.float16))
    res = ol.compress(wide, rank=2, min_params=0)
    assert "fold" not in res.sections
    assert _only(res).reason.startswith("no constant weight: input 1 is Cast 'prep' of the constant 'W', not folded: a Cast to a "
                                        "wider type (folding would store the weight in more bytes); fold constants elsewhere")
    # float64 to float16: onnxruntime rounds through float32, the reference evaluator directly
    double = _chain_model([helper.make_node("Cast", ["W"], ["Wt"], to=TensorProto.FLOAT16, name="prep")], w.astype(np.float64),
                          x_type=TensorProto.FLOAT16)
    chains, declined = fold_layout(double)
    assert chains == [] and "rounds twice" in declined["Wt"]


def test_a_source_something_else_reads_is_not_stored_twice():
    """A tied output projection: the table is read by Gather and, transposed, by the MatMul."""
    w = lowrank(16, 8, 2)
    m = make_model([helper.make_node("Gather", ["W", "ids"], ["emb"], axis=0),
                    helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="prep"),
                    helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm")],
                   [vi("x", ["N", 8]), vi("ids", ["N"], TensorProto.INT64)], [vi("y", ["N", 16]), vi("emb", ["N", 8])],
                   [init("W", w)])
    res = ol.compress(m, rank=2, min_params=0)
    assert "fold" not in res.sections and res.model.graph.SerializeToString() == m.graph.SerializeToString()
    row = _only(res)
    assert row.skip_code == SkipCode.NO_CONSTANT_WEIGHT.value
    assert row.reason.endswith("of the constant 'W', not folded: its constant 'W' is also read elsewhere: folding would store it twice")


def test_one_transposed_weight_read_by_two_products_is_folded_once_and_shared():
    """ALBERT's layers share one matrix, which the export transposes once for all of them."""
    w = lowrank(16, 16, 3)
    m = make_model([helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="prep"),
                    helper.make_node("MatMul", ["x", "Wt"], ["h"], name="mm"),
                    helper.make_node("MatMul", ["h", "Wt"], ["y"], name="mm2")],
                   [vi("x", ["N", 16])], [vi("y", ["N", 16])], [init("W", w.T.copy())])
    res = ol.compress(m, rank=3, min_params=0)
    assert len(res.sections["fold"]["chains"]) == 1 and res.sections["fold"]["chains"][0]["readers"] == ["mm", "mm2"]
    assert _only(res, "mm").factorized and _only(res, "mm2").factorized
    assert sum(int(np.prod(t.dims)) for t in res.model.graph.initializer) == 3 * 32  # one pair of factors for both
    np.testing.assert_allclose(run(res.model, {"x": X})[0], X @ w @ w, rtol=1e-3, atol=1e-3)


def test_a_weight_read_directly_and_through_identity_is_one_shared_weight():
    """TorchScript's ALBERT: layer 0 reads the shared matrix, later layers an Identity of it."""
    w = lowrank(16, 16, 3)
    m = make_model([helper.make_node("Identity", ["W"], ["W_again"], name="alias"),
                    helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                    helper.make_node("MatMul", ["h", "W_again"], ["y"], name="mm2")],
                   [vi("x", ["N", 16])], [vi("y", ["N", 16])], [init("W", w)])
    res = ol.compress(m, rank=3, min_params=0)
    assert [c["ops"] for c in res.sections["fold"]["chains"]] == [["Identity"]]
    assert res.sections["fold"]["chains"][0]["readers"] == ["mm2"]
    assert _only(res, "mm").factorized and _only(res, "mm2").shared_with == "mm"
    assert "Identity" not in [n.op_type for n in res.model.graph.node]
    assert sum(int(np.prod(t.dims)) for t in res.model.graph.initializer) == 3 * 32
    np.testing.assert_allclose(run(res.model, {"x": X})[0], X @ w @ w, rtol=1e-3, atol=1e-3)
    # to a graph output, an Identity stays (renaming would change the output's name)
    m.graph.output.append(vi("W_again", [16, 16]))
    assert fold_layout(m) == ([], {"W_again": "its value 'W_again' is also an output of the graph"})


def test_a_layer_the_filters_leave_alone_keeps_its_layout_nodes():
    w = lowrank(16, 8, 2)
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="prep")]
    m = _chain_model(nodes, w.T.copy())
    for kw, code in ((dict(exclude="^mm$", min_params=0), SkipCode.EXCLUDED), (dict(include="nothing", min_params=0), SkipCode.NOT_INCLUDED),
                     (dict(min_params=1000), SkipCode.TOO_SMALL)):
        res = ol.compress(m, rank=2, **kw)
        assert "fold" not in res.sections and _only(res).skip_code == code.value, kw
        assert res.model.graph.SerializeToString() == m.graph.SerializeToString()
    # one Transpose read by two products, one of them excluded: both keep it
    w2 = lowrank(16, 16, 3)
    shared = make_model([helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Wt"], ["h"], name="mm1"),
                         helper.make_node("MatMul", ["h", "Wt"], ["y"], name="mm2")], [vi("x", ["N", 16])], [vi("y", ["N", 16])],
                        [init("W", w2)])
    res = ol.compress(shared, rank=3, min_params=0, exclude="^mm1$")
    assert "fold" not in res.sections and res.model.graph.SerializeToString() == shared.graph.SerializeToString()


def test_a_chain_inside_an_if_branch_is_folded_there():
    w = lowrank(16, 8, 2)
    branch = helper.make_graph([helper.make_node("Transpose", ["Wb"], ["Wt"], perm=[1, 0]),
                                helper.make_node("MatMul", ["x", "Wt"], ["yb"], name="mm_in_branch")],
                               "then", [], [vi("yb", ["N", 8])], initializer=[init("Wb", w.T.copy())])
    other = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["yo"])], "else", [], [vi("yo", ["N", 8])])
    m = make_model([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)],
                   [vi("x", ["N", 16]), vi("c", [], TensorProto.BOOL)], [vi("y", ["N", 8])], [init("W", w)])
    res = ol.compress(m, rank=2, min_params=0)
    (chain,) = res.sections["fold"]["chains"]
    assert chain["name"] == "Wb" and chain["graph"].startswith("main / If")
    assert all(d.factorized for d in res.layers)
    for flag in (True, False):
        np.testing.assert_allclose(run(res.model, {"x": X, "c": np.array(flag)})[0], X @ w, rtol=1e-4, atol=1e-4)


def test_a_chain_whose_value_something_else_reads_stays_and_says_why():
    w = lowrank(16, 8, 2)
    for extra_node, out, why in ((None, vi("Wt", [16, 8]), "its value 'Wt' is also an output of the graph"),
                                 (helper.make_node("Shape", ["Wt"], ["s"]), vi("s", [2], TensorProto.INT64),
                                  "its value 'Wt' is also read by a node that cannot take factors")):
        nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="prep"), helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm")]
        m = make_model(nodes + ([extra_node] if extra_node else []), [vi("x", ["N", 16])], [vi("y", ["N", 8]), out], [init("W", w.T.copy())])
        res = ol.compress(m, rank=2, min_params=0)
        assert "fold" not in res.sections and res.model.graph.SerializeToString() == m.graph.SerializeToString()
        assert _only(res).reason.endswith(f"not folded: {why}")


def test_why_a_chain_stays_is_in_its_row():
    w = lowrank(16, 8, 2)
    x = [vi("x", ["N", 16])]
    inner = make_model([helper.make_node("Transpose", ["W"], ["W1"], perm=[1, 0]), helper.make_node("Identity", ["W1"], ["Wt"], name="prep"),
                        helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm")], x, [vi("y", ["N", 8]), vi("W1", [16, 8])],
                       [init("W", w.T.copy())])
    runtime_shape = make_model([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["W", "s"], ["Wt"], name="prep"),
                                helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm")], [vi("x", [16, 8])], [vi("y", [16, 8])],
                               [init("W", w)])
    ir3 = _chain_model([helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="prep")], w.T.copy(), ir_version=3)
    for m, why in ((inner, "the chain's value 'W1' is also read by another node"),
                   (ir3, "below IR version 4 an initializer is also a graph input")):
        assert _only(ol.compress(m, rank=2, min_params=0)).reason.split("not folded: ")[1].startswith(why)
    assert fold_layout(runtime_shape)[1] == {"Wt": "the shape or axes of Reshape 'prep' are computed at run time"}


def test_a_long_chain_folds_whole():
    w = lowrank(16, 8, 2)
    nodes = [helper.make_node("Transpose", ["W" if k == 0 else f"t{k}"], [f"t{k + 1}" if k < 9 else "Wt"], perm=[1, 0]) for k in range(10)]
    res = ol.compress(_chain_model(nodes, w), rank=2, min_params=0)  # ten transposes: the stored matrix as it is
    assert _only(res).factorized and res.sections["fold"]["chains"][0]["ops"] == ["Transpose"] * 10


def test_chains_from_one_source_that_compute_the_same_value_fold_once():
    """An ALBERT export without constant folding transposes the shared matrix once per layer."""
    w = lowrank(16, 16, 3)
    nodes = [helper.make_node("Transpose", ["W"], ["Wt1"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Wt1"], ["h"], name="mm"),
             helper.make_node("Transpose", ["W"], ["Wt2"], perm=[1, 0]), helper.make_node("MatMul", ["h", "Wt2"], ["y"], name="mm2")]
    m = make_model(nodes, [vi("x", ["N", 16])], [vi("y", ["N", 16])], [init("W", w.T.copy())])
    res = ol.compress(m, rank=3, min_params=0)
    (chain,) = res.sections["fold"]["chains"]
    assert chain["chains"] == 2 and chain["readers"] == ["mm", "mm2"]
    assert _only(res, "mm").factorized and _only(res, "mm2").shared_with == "mm"
    np.testing.assert_allclose(run(res.model, {"x": X})[0], X @ w @ w, rtol=1e-3, atol=1e-3)
    # chains that compute different values from one source would store it twice
    m.graph.node[2].CopyFrom(helper.make_node("Identity", ["W"], ["Wt2"]))
    chains, declined = fold_layout(m)
    assert [c["ops"] for c in chains] == [["Identity"]] and "also read elsewhere" in declined["Wt1"]


def test_same_local_names_in_two_branches_fold_in_each():
    w = lowrank(16, 8, 2)

    def branch(name, scale):
        return helper.make_graph([helper.make_node("Transpose", ["Wl"], ["Wlt"], perm=[1, 0]),
                                  helper.make_node("MatMul", ["x", "Wlt"], [f"y{name}"], name=f"mm_{name}")],
                                 name, [], [vi(f"y{name}", ["N", 8])], initializer=[init("Wl", (scale * w).T.copy())])

    m = make_model([helper.make_node("If", ["c"], ["y"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0))],
                   [vi("x", ["N", 16]), vi("c", [], TensorProto.BOOL)], [vi("y", ["N", 8])])
    chains, declined = fold_layout(m)
    assert len(chains) == 2 and declined == {}
    for flag, scale in ((True, 1.0), (False, 2.0)):
        np.testing.assert_allclose(run(m, {"x": X, "c": np.array(flag)})[0], scale * X @ w, rtol=1e-5, atol=1e-5)


def test_the_default_domain_imported_by_its_long_name_folds():
    m = _chain_model([helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0])], lowrank(16, 8, 2).T.copy())
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("ai.onnx", 17))
    assert len(fold_layout(m)[0]) == 1


def test_ir3_initializers_are_not_folded():
    w = lowrank(16, 8, 2)
    m = _chain_model([helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="prep")], w.T.copy(), ir_version=3)
    assert fold_layout(m)[0] == []


def _external_chain(tmp_path, w):
    """``x @ Transpose(W)`` saved with W in an external data file: its path and its files' hashes."""
    m = make_model([helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="prep"),
                    helper.make_node("MatMul", ["x", "Wt"], ["y"], name="mm")], [vi("x", ["N", 64])], [vi("y", ["N", 32])],
                   [init("W", w.T.copy())])
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(m, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    return src, _hashes(src.parent)


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_an_external_data_model_is_folded_from_its_data_file_and_the_input_is_untouched(tmp_path):
    w = lowrank(64, 32, 4)
    src, digest = _external_chain(tmp_path, w)
    res = ol.compress(str(src), rank=4, min_params=0)
    res.save(tmp_path / "out.onnx")
    assert _only(res).factorized and res.sections["fold"]["chains"][0]["source"] == "W"
    assert digest == _hashes(src.parent)
    out = onnx.load(str(tmp_path / "out.onnx"))
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(run(out, {"x": x})[0], x @ w, rtol=1e-4, atol=1e-4)


def _loop_model(through_identity: bool, read_final: bool):
    """y_t = x_t W in a Loop that carries W unchanged (tf2onnx's RNN kernels); also h = h + 1."""
    w = lowrank(16, 8, 2)
    out_w = "w_out" if through_identity else "w_in"
    body_nodes = [helper.make_node("Gather", ["xs", "i"], ["x_t"], axis=0),
                  helper.make_node("MatMul", ["x_t", "w_in"], ["y_t"], name="body_mm"),
                  helper.make_node("Add", ["h_in", "one"], ["h_out"]),
                  helper.make_node("Identity", ["c_in"], ["c_out"])]
    if through_identity:
        body_nodes.append(helper.make_node("Identity", ["w_in"], ["w_out"]))
    body = helper.make_graph(body_nodes, "body",
                             [vi("i", [], TensorProto.INT64), vi("c_in", [], TensorProto.BOOL), vi("h_in", [1]), vi("w_in", [16, 8])],
                             [vi("c_out", [], TensorProto.BOOL), vi("h_out", [1]), vi(out_w, [16, 8]), vi("y_t", ["N", 8])])
    nodes = [helper.make_node("Loop", ["M", "", "h0", "W"], ["h_final", "W_final", "ys"], body=body, name="loop")]
    outputs = [vi("ys", ["T", "N", 8]), vi("h_final", [1])]
    if read_final:  # the final value of the carried weight read after the Loop
        nodes.append(helper.make_node("MatMul", ["x_last", "W_final"], ["z"], name="after"))
        outputs.append(vi("z", ["N", 8]))
    m = make_model(nodes, [vi("M", [], TensorProto.INT64), vi("xs", ["T", "N", 16]), vi("x_last", ["N", 16])], outputs,
                   [init("W", w), init("h0", np.zeros(1, np.float32)), init("one", np.ones(1, np.float32))])
    return m, w


@pytest.mark.parametrize("through_identity", [False, True])
def test_a_weight_a_loop_carries_unchanged_is_read_directly_and_factorized(through_identity):
    m, w = _loop_model(through_identity, read_final=True)
    xs = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32)
    feeds = {"M": np.array(3, np.int64), "xs": xs, "x_last": X}
    res = ol.compress(m, rank=2, min_params=0)
    (chain,) = res.sections["fold"]["chains"]
    assert chain["ops"] == ["Loop (carried unchanged)"] and chain["name"] == "W" and chain["readers"] == ["body_mm"]
    assert _only(res, "body_mm").factorized and _only(res, "after").factorized
    loop = next(n for n in res.model.graph.node if n.op_type == "Loop")
    assert list(loop.input) == ["M", "", "h0"] and list(loop.output) == ["h_final", "ys"]
    onnx.checker.check_model(res.model, full_check=True)
    want = run(m, feeds)
    got = run(res.model, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)  # (w is exactly rank 2)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-4, atol=1e-4)
    assert res.totals.tensor_bytes["matmul weights"][0] == 16 * 8 * 4  # counted as the weight it is


def test_a_carried_value_that_changes_or_feeds_no_product_stays_carried():
    m, _ = _loop_model(through_identity=False, read_final=False)
    body = m.graph.node[0].attribute[0].g
    body.node[1].input[1] = "x_t"  # W no longer reaches a product: nothing to gain
    body.node[1].input[0] = "x_t"
    before = m.SerializeToString()
    assert fold_layout(m) == ([], {}) and m.SerializeToString() == before


def test_a_carried_weight_the_filters_leave_alone_stays_carried():
    for kw in (dict(exclude="body_mm", min_params=0), dict(exclude="^W$", min_params=0), dict(include="nothing", min_params=0),
               dict(min_params=10_000)):
        m, _ = _loop_model(through_identity=False, read_final=False)
        res = ol.compress(m, rank=2, **kw)
        assert "fold" not in res.sections, kw
        assert res.model.graph.node[0].input[3] == "W"  # (still carried)


def test_a_folded_external_weight_left_dense_is_saved_from_the_spill_and_confined(tmp_path):
    """The folded value of an external weight goes to the run's spill file; kept dense, it is
    written into the output's own data file, next to the output (nothing read from elsewhere)."""
    w = np.random.default_rng(5).standard_normal((64, 32)).astype(np.float32)  # (full rank: nothing to save)
    src, digest = _external_chain(tmp_path, w)
    res = ol.compress(str(src), energy=0.999, min_params=0)
    assert not _only(res).factorized and res.sections["fold"]["chains"][0]["source"] == "W"
    folded = next(t for t in res.model.graph.initializer if t.name == "W")
    assert folded.data_location == TensorProto.EXTERNAL  # (in the spill, not in memory)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    written = res.save(out)
    assert all(p.parent == out.parent for p in written)
    assert digest == _hashes(src.parent)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(run(onnx.load(str(out)), {"x": x})[0], x @ w, rtol=1e-4, atol=1e-4)
