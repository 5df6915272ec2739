"""int8 after factorization: a valid model, outputs within tolerance, factors quantized."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from models import init, lowrank, make_model, run, vi
from onnx_lowrank import compress
from onnx_lowrank.cli import main
from onnx_lowrank.quantize import INTEGER_MATMULS, quantize_int8, quantized_weights, unquantized
from onnx_lowrank.verify import compare


#   x[batch, 128] --Gemm(W1[96, 128], b1, transB=1)--> --Relu--> --MatMul(W2[96, 64])--> y[batch, 64]
def model(w1: np.ndarray | None = None, w2: np.ndarray | None = None, opset: int = 17) -> onnx.ModelProto:
    """The model above; ``W1`` and ``W2`` low-rank unless given."""
    rng = np.random.default_rng(0)
    return make_model(
        [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], name="fc1", transB=1),
         helper.make_node("Relu", ["h"], ["a"], name="relu"),
         helper.make_node("MatMul", ["a", "W2"], ["y"], name="fc2")],
        [vi("x", ["batch", 128])], [vi("y", ["batch", 64])],
        [init("W1", lowrank(96, 128, 6, 1) if w1 is None else w1), init("b1", rng.standard_normal(96).astype(np.float32)),
         init("W2", lowrank(96, 64, 5, 2) if w2 is None else w2)], opset=opset,
    )


def _outputs(m, x):
    return run(m, {"x": x})[0]


def test_int8_after_factorization_quantizes_every_factor_and_stays_close():
    src = model()
    res = compress(src, energy=0.999, min_params=0, quantize="int8")
    onnx.checker.check_model(res.model, full_check=True)
    assert res.totals.factorized == 2
    factors = [name for d in res.layers for name in d.factors]
    assert len(factors) == 4 and unquantized(res.model, factors) == []
    assert res.sections["quantize"] == {"mode": "int8", "factors": 4, "factors_quantized": 4, "unquantized_factors": []}
    ops = [n.op_type for n in res.model.graph.node]
    assert sum(op in INTEGER_MATMULS for op in ops) == 4 and "Gemm" not in ops
    # no float copy of a factor (or of the original weights) is left behind
    floats = {t.name for t in res.model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    assert not floats & (set(factors) | {"W1", "W2"})
    x = np.random.default_rng(1).standard_normal((32, 128)).astype(np.float32)
    m = compare("y", _outputs(src, x), _outputs(res.model, x))
    # int8 of a factored pair quantizes twice; the verified tolerance for this model
    assert m.cosine_min > 0.99 and m.rel_l2_error < 0.05
    # the same tolerance int8 alone meets: factorization adds little on top
    alone = compare("y", _outputs(src, x), _outputs(quantize_int8(src), x))
    assert m.rel_l2_error < 3 * alone.rel_l2_error + 0.01


def test_quantized_weights_sees_through_transposed_gemm_weights():
    q = quantize_int8(model())
    assert quantized_weights(q) == {"W1", "W2"}
    assert unquantized(q, ["W1", "W2", "nope"]) == ["nope"]


def test_int8_input_model_is_left_unmodified():
    src = model()
    before = src.SerializeToString()
    quantize_int8(src)
    compress(src, rank=4, min_params=0, quantize="int8")
    assert src.SerializeToString() == before


def test_cli_quantize_writes_a_smaller_valid_model(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(model(), str(src))
    out, rep = tmp_path / "small.onnx", tmp_path / "r.json"
    assert main([str(src), "-o", str(out), "--rank", "6", "--min-params", "0", "--quantize", "int8", "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "int8:          onnxruntime dynamic quantization (int8); 4 of 4 factor(s) quantized" in text
    onnx.checker.check_model(str(out), full_check=True)
    doc = json.loads(rep.read_text())
    assert doc["config"]["quantize"] == "int8" and doc["quantize"]["factors_quantized"] == 4
    assert doc["totals"]["size_after"] == out.stat().st_size < src.stat().st_size / 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "r.json", "small.onnx"]


@pytest.mark.parametrize("mode", ["int8", "int8-per-channel"])
def test_quantize_with_latency_aware_times_int8_and_checks_against_int8_baseline(mode):
    class Probe:
        def __init__(self):
            self.cases, self.baselines = [], []

        def layer_times(self, case):
            self.cases.append(case)
            return 2.0, 1.0

        def model_speedup(self, before, after, *, threads, shapes):
            self.baselines.append(before)
            return 1.2

    probe = Probe()
    res = compress(model(), rank=6, min_params=0, quantize=mode, latency_aware=True, probe=probe)
    assert {c.quantize for c in probe.cases} == {mode}
    assert res.sections["latency"]["baseline"] == f"input quantized ({mode})"
    baseline_ops = {n.op_type for n in probe.baselines[0].graph.node}
    assert baseline_ops & set(INTEGER_MATMULS)
    # the baseline is quantized the same way: one scale per column of the 96-wide W1 only per channel
    scale_sizes = {int(np.prod(t.dims)) for t in probe.baselines[0].graph.initializer if t.name.endswith("_scale")}
    assert (96 in scale_sizes) == (mode == "int8-per-channel")
    assert res.totals.factorized == 2


def test_fp16_model_is_refused_before_quantizing():
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from onnx_lowrank import UsageError, compress

    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float16)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 64])], [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UsageError, match="needs a float32 model"):
        compress(m, rank=4, min_params=0, quantize="int8")


def test_quantizing_leaves_the_root_logger_alone():
    import logging

    from onnx_lowrank import compress

    root = logging.getLogger()
    saved = list(root.handlers)
    root.handlers[:] = []  # as in an application that has not configured logging
    try:
        compress(model(), rank=8, min_params=0, quantize="int8")
        assert root.handlers == []
    finally:
        root.handlers[:] = saved


def test_verify_after_int8_on_an_in_memory_model_with_external_data(tmp_path):
    src = tmp_path / "ext"
    src.mkdir()
    onnx.save(model(), str(src / "m.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0)
    proto = onnx.load(str(src / "m.onnx"), load_external_data=False)
    res = compress(proto, base_dir=src, rank=8, min_params=0, quantize="int8", verify={"samples": 4, "input_shape": "x:2x128"})
    assert res.verification is not None and res.verification.samples == 4


def _outlier_model() -> onnx.ModelProto:
    # a rank-8 weight with a few output columns 50x larger than the rest, as trained transformers
    # have: one int8 scale per tensor leaves the ordinary columns a handful of levels
    w = lowrank(128, 96, 8, 3)
    w[:, :4] *= 50.0
    return make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], [vi("x", ["batch", 128])],
                      [vi("y", ["batch", 96])], [init("W", w.astype(np.float32))])


def test_int8_per_channel_quantizes_every_factor_with_column_scales_and_loses_less():
    src = _outlier_model()
    x = np.random.default_rng(4).standard_normal((64, 128)).astype(np.float32)
    ref = _outputs(src, x)
    per_tensor = compress(src, rank=8, min_params=0, quantize="int8")
    per_channel = compress(src, rank=8, min_params=0, quantize="int8-per-channel")
    onnx.checker.check_model(per_channel.model, full_check=True)
    assert per_channel.sections["quantize"] == {"mode": "int8-per-channel", "factors": 2, "factors_quantized": 2,
                                                "unquantized_factors": []}
    scales = [t for t in per_channel.model.graph.initializer if t.name.endswith("_scale")]
    assert sorted(int(np.prod(t.dims)) for t in scales) == [8, 96]  # one scale per output column of each factor
    ordinary = slice(4, None)  # the columns the outliers crowd out
    err_t = compare("y", ref[:, ordinary], _outputs(per_tensor.model, x)[:, ordinary]).rel_l2_error
    err_c = compare("y", ref[:, ordinary], _outputs(per_channel.model, x)[:, ordinary]).rel_l2_error
    assert err_c < err_t / 2


def test_cli_quantize_per_channel_names_the_mode(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(model(), str(src))
    out = tmp_path / "small.onnx"
    assert main([str(src), "-o", str(out), "--rank", "6", "--min-params", "0", "--quantize", "int8-per-channel"]) == 0
    assert "int8:          onnxruntime dynamic quantization (int8-per-channel); 4 of 4 factor(s) quantized" in capsys.readouterr().out
    assert main([str(src), "-o", str(tmp_path / "x.onnx"), "--quantize", "int3"]) == 2
    assert "int8-per-channel" in capsys.readouterr().err


def _with_constant_weights(m: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every weight in a Constant node, as Paddle and older TensorFlow export."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in out.graph.initializer]
    del out.graph.initializer[:]
    nodes = consts + list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


@pytest.mark.parametrize("mode", ["int8", "int8-per-channel"])
def test_int8_quantizes_weights_held_in_constant_nodes(mode):
    rng = np.random.default_rng(5)
    src = _with_constant_weights(model(rng.standard_normal((96, 128)).astype(np.float32),
                                       rng.standard_normal((96, 64)).astype(np.float32)))
    before = src.SerializeToString()
    res = compress(src, energy=1.0, min_params=0, quantize=mode)
    assert src.SerializeToString() == before  # the input model is left alone
    assert quantized_weights(res.model) == {"W1", "W2"}
    assert not any(n.op_type == "Constant" and n.output[0] in ("W1", "W2") for n in res.model.graph.node)
    x = np.random.default_rng(1).standard_normal((32, 128)).astype(np.float32)
    assert compare("y", _outputs(src, x), _outputs(res.model, x)).cosine_min > 0.99


def _lstm_model() -> onnx.ModelProto:
    """x[5, 2, 16] -> LSTM(hidden 8, constant W, R, B) -> last state -> MatMul(V[8, 64], rank 2) -> y."""
    hidden, feat = 8, 16
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["", "h"], hidden_size=hidden, name="lstm"),
             helper.make_node("Squeeze", ["h", "ax"], ["h2"]), helper.make_node("MatMul", ["h2", "V"], ["y"], name="head")]
    return make_model(nodes, [vi("x", [5, 2, feat])], [vi("y", [2, 64])],
                      [init("W", rng.standard_normal((1, 4 * hidden, feat)).astype(np.float32)),
                       init("R", rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32)),
                       init("B", np.zeros((1, 8 * hidden), np.float32)), init("ax", np.array([0], np.int64)),
                       init("V", lowrank(hidden, 64, 2))])


def test_int8_names_the_other_ops_onnxruntimes_quantizer_converted():
    """onnxruntime's defaults also turn an LSTM into DynamicQuantizeLSTM (and a Conv into
    ConvInteger); the int8 line says so instead of leaving it to be found in the graph."""
    from onnx_lowrank.report import render_sections

    m = _lstm_model()
    res = compress(m, rank=2, min_params=0, quantize="int8")
    assert [n.op_type for n in res.model.graph.node if "LSTM" in n.op_type] == ["DynamicQuantizeLSTM"]
    assert res.sections["quantize"]["other_ops_quantized"] == {"LSTM": 1}
    assert "onnxruntime's quantizer also converted (its default op types): 1 LSTM; --int8-ops matmul keeps them float" \
        in render_sections(res.sections)
    plain = compress(model(), energy=0.999, min_params=0, quantize="int8")
    assert "other_ops_quantized" not in plain.sections["quantize"]


def test_an_lstm_the_quantizer_leaves_float_is_not_counted_as_converted():
    """An LSTM whose first output is unnamed and whose W is computed (here: Identity of an input)
    stays a float LSTM; the count goes by its first named output, so it says nothing."""
    from onnx_lowrank.passes.quantize import converted_ops

    hidden, feat = 8, 16
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Identity", ["w_in"], ["W"]),
             helper.make_node("LSTM", ["x", "W", "R", "B"], ["", "h"], hidden_size=hidden, name="lstm"),
             helper.make_node("Squeeze", ["h", "ax"], ["h2"]), helper.make_node("MatMul", ["h2", "V"], ["y"], name="head")]
    m = make_model(nodes, [vi("x", [5, 2, feat]), vi("w_in", [1, 4 * hidden, feat])], [vi("y", [2, 64])],
                   [init("R", rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32)),
                    init("B", np.zeros((1, 8 * hidden), np.float32)), init("ax", np.array([0], np.int64)),
                    init("V", lowrank(hidden, 64, 2))])
    res = compress(m, rank=2, min_params=0, quantize="int8")
    assert [n.op_type for n in res.model.graph.node if "LSTM" in n.op_type] == ["LSTM"]
    assert "other_ops_quantized" not in res.sections["quantize"]
    assert converted_ops(m, res.model) == {}


def test_int8_ops_matmul_leaves_the_other_ops_float():
    """--int8-ops matmul: the LSTM (and Convs, embedding tables) stay float, the MatMul weights and
    factors still become integer products; asking for it without int8 is refused in one line."""
    m = _lstm_model()
    res = compress(m, rank=2, min_params=0, quantize="int8-per-channel", int8_ops="matmul")
    assert [n.op_type for n in res.model.graph.node if "LSTM" in n.op_type] == ["LSTM"]
    assert "other_ops_quantized" not in res.sections["quantize"]
    assert res.sections["quantize"]["factors_quantized"] == 2
    assert sum(n.op_type in INTEGER_MATMULS for n in res.model.graph.node) == 2
    from onnx_lowrank import UsageError

    with pytest.raises(UsageError, match="int8_ops chooses the ops of the int8 quantization; add quantize='int8'"):
        compress(m, rank=2, min_params=0, int8_ops="matmul")


def test_cli_int8_ops_without_int8_is_one_line(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(model(), str(src))
    assert main([str(src), "-o", str(tmp_path / "o.onnx"), "--int8-ops", "matmul"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["onnx-lowrank: error: --int8-ops chooses the ops of the int8 quantization; add --quantize int8 "
                   "(or int8-per-channel) or drop --int8-ops."]
    assert not (tmp_path / "o.onnx").exists()


def test_quantizing_an_already_quantized_model_says_there_is_nothing_to_take(tmp_path):
    """A model onnxruntime's quantize_dynamic already turned int8 has no float MatMul weight: a
    second --quantize says so instead of reporting '0 of 0' as if all went well."""
    src = tmp_path / "m.onnx"
    onnx.save(model(), str(src))
    once = compress(src, energy=1.0, min_params=0, quantize="int8")
    assert not [w for w in once.warnings if "no float MatMul/Gemm weight left" in w]
    for mode in ("int8", "int4"):
        twice = compress(once.model, energy=1.0, min_params=0, quantize=mode)
        assert any(w.startswith(f"quantize='{mode}': the model has no float MatMul/Gemm weight left to quantize")
                   for w in twice.warnings), twice.warnings


def test_a_model_quantized_already_says_why_nothing_is_factorized():
    once = compress(model(), energy=1.0, min_params=0, quantize="int8")
    twice = compress(once.model, energy=0.5, min_params=0)
    assert twice.totals.factorized == 0
    assert any(w.startswith("no float MatMul/Gemm/Conv node to factorize: the model's products are quantized already (")
               for w in twice.warnings), twice.warnings
    assert not [w for w in compress(model(), energy=0.5, min_params=0).warnings if "quantized already" in w]


def test_int8_of_a_conv_model_does_not_claim_nothing_was_quantized():
    """A Conv-only model under int8's default ops gets ConvInteger: no 'nothing to quantize' warning;
    with --int8-ops matmul there is nothing, and it says so."""
    rng = np.random.default_rng(0)
    m = make_model([helper.make_node("Conv", ["x", "K"], ["y"], name="conv")], [vi("x", [1, 4, 8, 8])], [vi("y", [1, 8, 6, 6])],
                   [init("K", rng.standard_normal((8, 4, 3, 3)).astype(np.float32))])
    res = compress(m, energy=1.0, min_params=0, quantize="int8")
    assert res.sections["quantize"].get("other_ops_quantized") == {"Conv": 1}
    assert not [w for w in res.warnings if "no float MatMul/Gemm weight left" in w]
    only = compress(m, energy=1.0, min_params=0, quantize="int8", int8_ops="matmul")
    assert [w for w in only.warnings if "no float MatMul/Gemm weight left" in w]


def test_the_quantized_already_warning_is_not_given_when_filters_left_a_float_layer_out():
    once = compress(model(), energy=1.0, min_params=0, quantize="int8")
    mixed = onnx.ModelProto()
    mixed.CopyFrom(once.model)
    rng = np.random.default_rng(1)
    out = mixed.graph.output[0].name
    for node in mixed.graph.node:
        node.output[:] = ["pre" if o == out else o for o in node.output]
    mixed.graph.node.append(helper.make_node("MatMul", ["pre", "P"], [out], name="float_head"))
    mixed.graph.initializer.append(init("P", rng.standard_normal((64, 64)).astype(np.float32)))
    res = compress(mixed, energy=0.5, min_params=0, exclude="float_head")
    assert res.totals.factorized == 0 and not [w for w in res.warnings if "quantized already" in w]
