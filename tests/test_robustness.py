"""Graphs and paths that real users hand the tool: odd weight uses, external data, special files."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnx_lowrank as ol
from onnx_lowrank.cli import main
from models import data_files, init, lowrank, make_model, vi

RNG = np.random.default_rng(21)


def _digest(*paths) -> list[str]:
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


def test_weight_that_is_also_the_same_gemms_bias_is_left_alone():
    w = lowrank(64, 64, 4, 1)
    model = make_model([helper.make_node("Gemm", ["x", "W", "W"], ["y"], name="g")], [vi("x", [64, 64])], [vi("y", [64, 64])],
                       [init("W", w)])
    res = ol.compress(model, rank=4, min_params=0)
    assert not res.layers[0].factorized and "another input" in res.layers[0].reason
    onnx.checker.check_model(res.model)


def test_a_chain_of_two_wide_layers_is_not_called_a_factor_pair():
    # x @ W1[64x80] @ W2[80x64]: they share 80, above the product's break-even (32): not a factorization
    model = make_model([helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["y"])],
                       [vi("x", [2, 64])], [vi("y", [2, 64])], [init("W1", lowrank(64, 80, 4, 1)), init("W2", lowrank(80, 64, 4, 2))])
    res = ol.compress(model, rank=4, min_params=0)
    assert all(d.factorized for d in res.layers)
    # a real pair (64 -> 4 -> 64) is still recognized
    pair = make_model([helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["y"])],
                      [vi("x", [2, 64])], [vi("y", [2, 64])], [init("A", lowrank(64, 4, 4, 1)), init("B", lowrank(4, 64, 4, 2))])
    assert all("already low-rank" in (d.reason or "") for d in ol.compress(pair, min_params=0).layers)


def _external_model(tmp_path, *, constant: bool):
    """``x @ W + B``, every tensor in ``weights.bin``; ``B`` in a Constant node when ``constant``."""
    w = lowrank(128, 128, 8, 3)
    b = RNG.standard_normal((4, 128)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Add", ["h", "B"], ["y"])]
    inits = [init("W", w)]
    if constant:
        nodes.insert(0, helper.make_node("Constant", [], ["B"], value=numpy_helper.from_array(b, "Bv")))
    else:
        inits.append(init("B", b))
    model = make_model(nodes, [vi("x", [4, 128])], [vi("y", [4, 128])], inits, ir_version=8)
    src = tmp_path / "in" / "model.onnx"
    src.parent.mkdir()
    onnx.save_model(model, src, save_as_external_data=True, location="weights.bin", size_threshold=0, convert_attribute=True)
    return (lambda x: x @ w + b), src


def test_constant_node_tensors_in_external_data_are_carried_to_the_output(tmp_path):
    reference, src = _external_model(tmp_path, constant=True)
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    assert main([str(src), "-o", str(out), "--rank", "8", "--min-params", "0", "-q"]) == 0
    x = RNG.standard_normal((4, 128)).astype(np.float32)
    import onnxruntime as ort

    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(got, reference(x), rtol=1e-3, atol=1e-3)


def test_output_onto_the_inputs_external_data_file_is_refused(tmp_path, capsys):
    _, src = _external_model(tmp_path, constant=False)
    data = src.parent / "weights.bin"
    before = _digest(src, data)
    assert main([str(src), "-o", str(data), "--rank", "8", "--min-params", "0"]) == 2
    err = capsys.readouterr().err
    assert "external data file" in err and "Traceback" not in err
    assert _digest(src, data) == before
    # the Python API refuses the same, and its own input file too
    res = ol.compress(str(src), rank=8, min_params=0)
    for target in (data, src):
        with pytest.raises(ol.UsageError, match="input"):
            res.save(target)
    assert _digest(src, data) == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_output_onto_a_pipe_is_refused_and_left_a_pipe(tmp_path, capsys):
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", [2, 64])], [vi("y", [2, 64])], [init("W", lowrank(64, 64, 4))])
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for args in (["-o", str(fifo)], ["-o", str(tmp_path / "o.onnx"), "--report", str(fifo)]):
        assert main([str(src), *args, "--min-params", "0"]) == 2
        assert "not a regular file" in capsys.readouterr().err
        assert not (fifo.is_file()) and fifo.exists()
    assert not (tmp_path / "o.onnx").exists()


def test_nan_calibration_data_is_an_error_not_a_pass(tmp_path, capsys):
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", ["n", 64])], [vi("y", ["n", 64])], [init("W", lowrank(64, 64, 4))])
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.full((8, 64), np.nan, np.float32))
    out = tmp_path / "o.onnx"
    assert main([str(src), "-o", str(out), "--min-params", "0", "--calib", str(calib)]) != 0
    err = capsys.readouterr().err
    assert "NaN" in err and "--calib" in err and "Traceback" not in err
    assert not out.exists()


def test_an_unknown_api_option_is_a_usage_error_with_a_suggestion():
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", [2, 64])], [vi("y", [2, 64])], [init("W", lowrank(64, 64, 4))])
    with pytest.raises(ol.UsageError, match="did you mean energy="):
        ol.compress(model, enrgy=0.9)


def test_a_budget_counts_a_factorized_conv_at_its_factorized_size():
    # Conv (per-layer rule) + Gemm (budget): the Gemm may use what the Conv's factorization frees
    k = (lowrank(64, 32 * 9, 8, 4)).reshape(64, 32, 3, 3)
    w = RNG.standard_normal((4096, 256)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "K"], ["c"], pads=[1, 1, 1, 1]),
                        helper.make_node("Reshape", ["c", "shape"], ["f"]),
                        helper.make_node("Gemm", ["f", "W"], ["y"])],
                       [vi("x", [1, 32, 8, 8])], [vi("y", [1, 256])],
                       [init("K", k), init("W", w), init("shape", np.array([1, 4096], np.int64))])
    res = ol.compress(model, target_params=0.1, min_params=0)
    conv, gemm = res.layers
    assert conv.factorized and gemm.factorized
    budget = 0.1 * res.totals.params_before
    assert res.totals.params_after <= budget
    assert res.totals.params_after + (4096 + 256) > budget  # one more Gemm rank would not fit


def test_an_external_data_input_gives_an_external_data_output_even_when_every_external_tensor_is_factorized(tmp_path):
    w = lowrank(128, 128, 8, 3)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [4, 128])], [vi("y", [4, 128])],
                       [init("W", w)], ir_version=8)
    src = tmp_path / "m.onnx"
    onnx.save_model(model, src, save_as_external_data=True, location="m.bin", size_threshold=0)
    out = tmp_path / "o.onnx"
    assert main([str(src), "-o", str(out), "--rank", "8", "--min-params", "0", "-q"]) == 0
    assert len(data_files(tmp_path, "o.onnx")) == 1
    import onnxruntime as ort

    x = RNG.standard_normal((4, 128)).astype(np.float32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(got, x @ w, rtol=1e-3, atol=1e-3)


def test_layers_left_alone_before_planning_still_count_their_macs():
    pair = make_model([helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["y"])],
                      [vi("x", [2, 64])], [vi("y", [2, 64])], [init("A", lowrank(64, 4, 4, 1)), init("B", lowrank(4, 64, 4, 2))])
    t = ol.compress(pair, min_params=0, dry_run=True).totals
    assert t.params_before == t.params_after == 512
    assert t.macs_before == t.macs_after == 512


def test_ops_neither_onnx_nor_onnxruntime_define_are_named_at_load(tmp_path, capsys):
    """tf2onnx has written an ``Erfc`` node (no such ONNX op): the compressed copy of such a model
    loads nowhere either, so the run says so up front, for a node in an If branch and in a
    model-local function too, and for an op deprecated at the model's opset that onnxruntime does
    not run; valid models get no such warning, ONNX's old experimental ops that onnxruntime still
    runs and deprecated ops with a function body included."""
    from onnx_lowrank.passes.load import undefined_ops

    w = init("W", lowrank(64, 64, 4))
    branch = helper.make_graph([helper.make_node("Erfc", ["x"], ["e"])], "then", [], [vi("e", [2, 64])])
    nodes = [helper.make_node("If", ["c"], ["e"], then_branch=branch, else_branch=branch),
             helper.make_node("Erfc", ["e"], ["e2"]), helper.make_node("MatMul", ["e2", "W"], ["y"], name="mm")]
    m = make_model(nodes, [vi("x", [2, 64]), vi("c", [], onnx.TensorProto.BOOL)], [vi("y", [2, 64])], [w], opset=13)
    res = ol.compress(m, rank=4, min_params=0)
    assert res.warnings == ["the input uses op(s) that neither ONNX (opset 13) nor the installed onnxruntime defines: "
                            "Erfc (3 nodes); onnxruntime refuses such a model, and the output keeps them (fix the export, "
                            "or replace them before compressing)"]
    assert res.totals.factorized == 1
    s = init("s", np.ones(2, np.float32))
    up = make_model([helper.make_node("Upsample", ["x", "s"], ["u"]), helper.make_node("MatMul", ["u", "W"], ["y"])],
                    [vi("x", [1, 64])], [vi("y", [1, 64])], [w, s], opset=10)
    assert undefined_ops(up) == {"Upsample": 1}
    assert undefined_ops(make_model(up.graph.node, [vi("x", [1, 64])], [vi("y", [1, 64])], [w, s], opset=9)) == {}
    # onnxruntime runs ImageScaler (tiny-YOLOv2, opset 7) and expands GroupNormalization-18 (deprecated, with a body)
    old = make_model([helper.make_node("ImageScaler", ["x"], ["u"], scale=2.0), helper.make_node("MatMul", ["u", "W"], ["y"])],
                     [vi("x", [1, 3, 4, 64])], [vi("y", [1, 3, 4, 64])], [w], opset=7)
    gn = make_model([helper.make_node("GroupNormalization", ["x", "g", "b"], ["u"], num_groups=2), helper.make_node("MatMul", ["u", "W"], ["y"])],
                    [vi("x", [1, 4, 64])], [vi("y", [1, 4, 64])], [w, init("g", np.ones(2, np.float32)), init("b", np.zeros(2, np.float32))],
                    opset=18)
    assert undefined_ops(old) == {} and undefined_ops(gn) == {}
    func = helper.make_function("custom", "F", ["a"], ["b"], [helper.make_node("Erfc", ["a"], ["b"])], [helper.make_opsetid("", 13)])
    fm = make_model([helper.make_node("F", ["x"], ["u"], domain="custom"), helper.make_node("MatMul", ["u", "W"], ["y"])],
                    [vi("x", [2, 64])], [vi("y", [2, 64])], [w], opset=13)
    fm.functions.append(func)
    fm.opset_import.append(helper.make_opsetid("custom", 1))
    assert undefined_ops(fm) == {"Erfc": 1}
    src = tmp_path / "erfc.onnx"
    onnx.save(m, src)
    assert main([str(src), "-o", str(tmp_path / "out.onnx"), "--rank", "4", "--min-params", "0", "-q"]) == 0
    assert "Erfc (3 nodes)" in capsys.readouterr().err
    assert ol.compress(make_model([nodes[2]], [vi("e2", [2, 64])], [vi("y", [2, 64])], [w]), rank=4, min_params=0).warnings == []
