"""--quantize int4: 4-bit blocks as onnxruntime's MatMulNBits, with a whitened low-rank correction."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from models import init, lowrank, make_model, run, vi
from test_quantize import model as quantize_model
from onnx_lowrank import compress
from onnx_lowrank.cli import main
from onnx_lowrank.errors import UsageError
from onnx_lowrank.linalg import quant
from onnx_lowrank.passes import int4
from onnx_lowrank.report import render_sections
from onnx_lowrank.verify import compare


def _w(k, n, seed=0):
    return np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)


def _inputs(rows, k, seed=1, outliers=(3, 17)):
    """Inputs with a few outlier features, as transformer activations have."""
    x = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)
    x[:, list(outliers)] *= 25.0
    return x


def model(opset=17) -> onnx.ModelProto:
    """test_quantize's Gemm -> Relu -> MatMul model with full-rank weights (4 bits meet every direction)."""
    return quantize_model(_w(96, 128, 3) * 0.1, _w(96, 64, 4) * 0.1, opset=opset)


# ------------------------------------------------------------------ the block layout

@pytest.mark.parametrize("block", quant.BLOCK_SIZES)
def test_blocks_round_trip_within_half_a_step_and_keep_zeros_exact(block):
    w = _w(70, 9)  # 70 rows: the last block is padded
    w[5, 2] = 0.0
    q = quant.quantize_blocks(w, block, clip=(1.0,))
    d = quant.dequantize(q)
    assert d.shape == w.shape and d.dtype == np.float32
    steps = np.repeat(q.scales.T, block, axis=0)[: w.shape[0]]
    assert np.all(np.abs(d - w) <= 0.5 * steps + 1e-6)
    assert d[5, 2] == 0.0
    assert q.packed.shape == (9, -(-70 // block), block // 2) and q.packed.dtype == np.uint8
    # the clipping search never makes a block worse than plain min/max rounding
    clipped = quant.dequantize(quant.quantize_blocks(w, block))
    assert np.square(clipped - w).sum() <= np.square(d - w).sum() + 1e-9


def test_blocks_reject_what_cannot_be_quantized():
    with pytest.raises(ValueError, match="block"):
        quant.quantize_blocks(_w(32, 4), 24)
    with pytest.raises(ValueError, match="NaN"):
        quant.quantize_blocks(np.full((32, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="2-D"):
        quant.quantize_blocks(np.zeros((0, 4), np.float32))


@pytest.mark.parametrize("block,accuracy", [(16, 0), (32, 0), (64, 1), (128, 0)])
def test_the_runtime_reads_the_layout_as_written(block, accuracy):
    assert int4.runtime_problem(block, accuracy) is None


def test_int8_columns_round_trip():
    a = _w(40, 6)
    q, s = quant.quantize_columns(a)
    assert q.dtype == np.int8 and s.shape == (6,)
    assert np.all(np.abs(quant.dequantize_columns(q, s) - a) <= s / 2 + 1e-7)


# ------------------------------------------------------------------ the correction

def test_the_whitened_correction_repairs_the_output_error_the_plain_one_does_not():
    k, n = 128, 96
    w, x = _w(k, n), _inputs(2000, k)
    gram = x.T.astype(np.float64) @ x
    q = quant.quantize_blocks(w, 32)
    residual = w.astype(np.float64) - quant.dequantize(q)

    def out_err(c):
        return np.linalg.norm(x @ (residual - c.a.astype(np.float64) @ c.b)) / np.linalg.norm(x @ residual)

    white = quant.correction(residual, gram, rank=8)
    plain = quant.correction(residual, None, rank=8)
    assert white.rank == plain.rank == 8 and white.whitened and not plain.whitened
    assert out_err(white) < 0.6 * out_err(plain)
    # the energy rule: a higher share needs a higher rank, and the branch holds what it says
    low, high = (quant.correction(residual, gram, energy=e) for e in (0.3, 0.8))
    assert 0 < low.rank < high.rank and low.energy >= 0.3 and high.energy >= 0.8
    assert quant.correction(residual, gram, energy=0.99, max_rank=5).rank == 5
    assert quant.correction(residual, gram, rank=0).rank == 0
    with pytest.raises(ValueError, match="exactly one"):
        quant.correction(residual, gram)


def test_alternating_fits_never_end_worse_than_the_first():
    w, x = _w(96, 64, 2), _inputs(500, 96)
    gram = x.T.astype(np.float64) @ x
    first = quant.fit(w, gram, rank=8, rounds=0)
    more = quant.fit(w, gram, rank=8, rounds=2)
    assert more.error <= first.error < first.error_int4
    assert quant.fit(w, gram).correction.rank == 0  # neither energy nor rank: no branch


def _correlated(rows, k, seed=1):
    """Inputs whose features move together (as a layer's inputs do), with outliers."""
    mix = np.random.default_rng(100).standard_normal((k, k)) * np.logspace(0, -1.5, k)  # one distribution
    return (_inputs(rows, k, seed) @ mix).astype(np.float32)


@pytest.mark.parametrize("block", [16, 64])
def test_error_feedback_rounds_to_a_smaller_output_error_in_the_same_layout(block):
    k, n = 150, 24  # 150 rows: the last block is padded
    w, x = _w(k, n, 6), _correlated(1500, k)
    gram = x.T.astype(np.float64) @ x
    near = quant.quantize_blocks(w, block)
    fed = quant.quantize_blocks(w, block, gram=gram)
    assert (fed.packed.shape, fed.scales.shape, fed.zero_points.shape) == (near.packed.shape, near.scales.shape,
                                                                          near.zero_points.shape)

    def out_err(q):
        return np.linalg.norm(x @ (w - quant.dequantize(q))) / np.linalg.norm(x @ w)

    assert out_err(fed) < 0.8 * out_err(near)
    # the padded rows of the last block still dequantize to exactly zero
    tail = fed.codes()[:, -1, k % block:]
    assert np.array_equal(tail, np.repeat(fed.zeros()[:, -1:], tail.shape[1], axis=1))
    # columns never mix: a column's codes are the same quantized alone
    cols = [3, 7, 20]
    alone = quant.quantize_blocks(w[:, cols], block, gram=gram)
    assert np.array_equal(alone.codes(), fed.codes()[cols]) and np.array_equal(alone.scales, fed.scales[cols])
    # inputs that never correlate feed nothing: nearest rounding
    same = quant.quantize_blocks(w, block, gram=np.eye(k))
    assert np.array_equal(same.packed, near.packed) and np.array_equal(same.scales, near.scales)


def test_the_feedback_factor_is_the_upper_cholesky_factor_of_the_damped_inverse_gram(monkeypatch):
    x = _correlated(300, 40)
    gram = x.T.astype(np.float64) @ x
    u = quant._feedback_factor(gram, 40, 0.01)
    inv = np.linalg.inv(gram + 0.01 * np.mean(np.diag(gram)) * np.eye(40))
    assert np.array_equal(u, np.triu(u)) and np.allclose(u.T @ u, inv, rtol=1e-8, atol=1e-12 * np.abs(inv).max())

    def eigen(g, damping):  # the whitening's fallback for a Gram Cholesky refuses: a factor that is not triangular
        g = np.asarray(g)
        w, q = np.linalg.eigh(g + damping * np.mean(np.diag(g)) * np.eye(len(g)))
        return q * np.sqrt(w), damping

    monkeypatch.setattr(quant, "whitening_factor", eigen)
    np.testing.assert_allclose(quant._feedback_factor(gram, 40, 0.01), u, rtol=1e-7, atol=1e-9 * np.abs(u).max())


def test_fits_with_error_feedback_end_below_nearest_rounding_with_or_without_a_branch():
    w, x = _w(128, 64, 2), _correlated(800, 128)
    gram = x.T.astype(np.float64) @ x
    for rank in (0, 8):
        near = quant.fit(w, gram, block=32, rank=rank, rounding="nearest")
        fed = quant.fit(w, gram, block=32, rank=rank, rounding="gptq")
        assert fed.error < 0.9 * near.error and fed.correction.rank == rank
    # the budget's price of a rank is the same fit's (one rounding, no alternation)
    errs = quant.correction_errors(w, gram, [0, 8], block=32, rounding="gptq")
    assert errs[0] == pytest.approx(quant.fit(w, gram, block=32, rounding="gptq").error ** 2, rel=1e-6)
    assert errs[1] < errs[0]
    assert quant.fit(w, None, block=32, rounding="gptq").error == quant.fit(w, None, block=32).error  # no Gram: nearest
    with pytest.raises(ValueError, match="rounding"):
        quant.fit(w, gram, rounding="stochastic")


# ------------------------------------------------------------------ the graph

def _weights_of(m, *names):
    return {t.name for t in m.graph.initializer} & set(names)


def test_int4_alone_matches_the_runtime_dequantization_and_drops_the_float_weights():
    src = model()
    out, summary = int4.quantize_int4(src)
    onnx.checker.check_model(out)
    assert [n.op_type for n in out.graph.node].count("MatMulNBits") == 2
    assert not _weights_of(out, "W1", "W2") and _weights_of(src, "W1", "W2") == {"W1", "W2"}  # input untouched
    assert {l.weight for l in summary.layers} == {"W1", "W2"} and all(l.rank == 0 for l in summary.layers)
    # the graph computes exactly x @ dequantize(Q(W)) (+ bias): same layout as the runtime reads
    x = np.random.default_rng(5).standard_normal((16, 128)).astype(np.float32)
    b1 = numpy_helper.to_array(src.graph.initializer[1])
    w1 = numpy_helper.to_array(src.graph.initializer[0])
    q1 = quant.dequantize(quant.quantize_blocks(np.ascontiguousarray(w1.T), 32))
    a = np.maximum(x @ q1 + b1, 0)
    w2 = numpy_helper.to_array(src.graph.initializer[2])
    expect = a @ quant.dequantize(quant.quantize_blocks(w2, 32))
    got = run(out, {"x": x})[0]
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())
    assert int4.weight_bytes(out) < int4.weight_bytes(src) / 5


def test_compress_with_data_whitens_the_branch_and_beats_int4_alone():
    src = model()
    calib = {"x": _inputs(400, 128, seed=2)}
    held = _inputs(200, 128, seed=9)
    ref = run(src, {"x": held})[0]
    alone = compress(src, energy=1.0, min_params=0, quantize="int4", int4_correction=0)
    fixed = compress(src, energy=1.0, min_params=0, quantize="int4", data_aware=True, calib=calib, int4_correction=16)
    sec = fixed.sections["int4"]
    assert sec["weights_quantized"] == 2 and sec["corrected"] == 2 and sec["whitened"] == 2
    assert all(l["error_corrected"] < l["error_int4"] for l in sec["layers"])
    e_alone = compare("y", ref, run(alone.model, {"x": held})[0]).rel_l2_error
    e_fixed = compare("y", ref, run(fixed.model, {"x": held})[0]).rel_l2_error
    assert e_fixed < 0.7 * e_alone
    # the branch is stored int8 by default, read through Cast and Mul (constants onnxruntime folds)
    ops = [n.op_type for n in fixed.model.graph.node]
    assert ops.count("Cast") == 4 and "DequantizeLinear" not in ops and ops.count("MatMulNBits") == 2
    codes = [t for t in fixed.model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(codes) == 4
    json.dumps(fixed.to_dict() if hasattr(fixed, "to_dict") else sec)


def test_with_input_statistics_blocks_round_with_error_feedback_and_the_report_says_so(tmp_path, capsys):
    src = model()
    calib = {"x": _correlated(400, 128, seed=2)}
    held = _correlated(200, 128, seed=9)
    ref = run(src, {"x": held})[0]
    kw = dict(energy=1.0, min_params=0, quantize="int4", data_aware=True, calib=calib, int4_correction=0)
    fed, near = compress(src, **kw), compress(src, **kw, int4_rounding="nearest")
    assert fed.sections["int4"]["rounding"] == "gptq" and fed.sections["int4"]["gptq_rounded"] == 2
    assert {l["rounding"] for l in near.sections["int4"]["layers"]} == {"nearest"}
    assert int4.weight_bytes(fed.model) == int4.weight_bytes(near.model)
    e_fed, e_near = (compare("y", ref, run(r.model, {"x": held})[0]).rel_l2_error for r in (fed, near))
    assert e_fed < 0.8 * e_near
    # the default correction: none after error feedback, half the energy after nearest rounding
    auto = {r: compress(src, energy=1.0, min_params=0, quantize="int4", data_aware=True, calib=calib, int4_rounding=r)
            for r in ("gptq", "nearest")}
    assert auto["gptq"].sections["int4"]["corrected"] == 0 and auto["gptq"].sections["int4"]["correction"] == "auto: off"
    assert auto["nearest"].sections["int4"]["corrected"] == 2
    assert auto["nearest"].sections["int4"]["correction"].startswith("auto: energy 0.5")
    # no statistics: nothing to feed the error by
    plain = compress(src, energy=1.0, min_params=0, quantize="int4")
    assert plain.sections["int4"]["gptq_rounded"] == 0
    np.savez(tmp_path / "c.npz", **calib)
    onnx.save(src, tmp_path / "m.onnx")
    assert main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--energy", "1", "--quantize", "int4",
                 "--data-aware", "--calib", str(tmp_path / "c.npz"), "--int4-rounding", "nearest", "--report",
                 str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["int4"]["gptq_rounded"] == 0


def test_factor_pairs_are_stored_int8_and_dense_weights_int4():
    src = make_model([helper.make_node("MatMul", ["x", "W1"], ["h"], name="low"),
                      helper.make_node("MatMul", ["h", "W2"], ["y"], name="dense")],
                     [vi("x", ["batch", 128])], [vi("y", ["batch", 64])],
                     [init("W1", lowrank(128, 96, 4, 1)), init("W2", _w(96, 64) * 0.1)])
    res = compress(src, energy=0.999, min_params=0, quantize="int4")
    assert res.totals.factorized == 1
    sec = res.sections["int4"]
    assert [l["weight"] for l in sec["layers"]] == ["W2"]
    assert {p["storage"] for p in sec["factors"]} == {"int8"} and len(sec["factors"]) == 2
    x = np.random.default_rng(3).standard_normal((8, 128)).astype(np.float32)
    m = compare("y", run(src, {"x": x})[0], run(res.model, {"x": x})[0])
    assert m.cosine_min > 0.99


def test_old_opsets_and_constant_nodes():
    # opset 11: int8 factors are read through Cast and Mul; W2 is held in a Constant node
    src = model(opset=11)
    const = helper.make_node("Constant", [], ["W2"], name="w2_const", value=src.graph.initializer[2])
    del src.graph.initializer[2]
    src.graph.node.insert(0, const)
    calib = {"x": _inputs(200, 128, seed=2)}
    res = compress(src, energy=1.0, min_params=0, quantize="int4", data_aware=True, calib=calib, int4_correction=4)
    onnx.checker.check_model(res.model)
    ops = [n.op_type for n in res.model.graph.node]
    assert "DequantizeLinear" not in ops and "Cast" in ops and ops.count("MatMulNBits") == 2
    assert "Constant" not in ops  # the float weight left the file
    x = np.random.default_rng(4).standard_normal((8, 128)).astype(np.float32)
    assert compare("y", run(src, {"x": x})[0], run(res.model, {"x": x})[0]).cosine_min > 0.98


def test_weights_that_cannot_map_stay_float_and_say_why():
    w = _w(64, 40)
    src = make_model([helper.make_node("Gemm", ["x", "W"], ["a"], name="ta", transA=1),
                      helper.make_node("MatMul", ["V", "z"], ["b"], name="first")],
                     [vi("x", [64, 5]), vi("z", [40, 3])], [vi("a", [5, 40]), vi("b", [64, 3])],
                     [init("W", w), init("V", _w(64, 40, 1))])
    out, summary = int4.quantize_int4(src, weights=["W", "V"])
    assert summary.layers == []
    assert "transA" in summary.left_float["W"] and "first input" in summary.left_float["V"]
    assert [n.op_type for n in out.graph.node] == ["Gemm", "MatMul"]


# ------------------------------------------------------------------ options and refusals

def test_options_are_checked_before_any_work(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(model(), str(src))
    out = tmp_path / "o.onnx"
    for flags, needle in ((["--int4-block", "64"], "--quantize int4"),
                          (["--quantize", "int4", "--int4-block", "24"], "--int4-block"),
                          (["--quantize", "int4", "--int4-accuracy-level", "7"], "--int4-accuracy-level"),
                          (["--quantize", "int4", "--int4-correction", "1.5"], "--int4-correction")):
        assert main([str(src), "-o", str(out), "--min-params", "0", *flags]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
        assert not out.exists()


def test_a_runtime_without_the_op_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(int4, "runtime_problem", lambda *a: "onnxruntime 0.0 cannot run it (no kernel)")
    src = tmp_path / "m.onnx"
    onnx.save(model(), str(src))
    before = src.read_bytes()
    assert main([str(src), "-o", str(tmp_path / "o.onnx"), "--quantize", "int4", "--min-params", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MatMulNBits" in err[0] and "int8-per-channel" in err[0]
    assert not (tmp_path / "o.onnx").exists() and src.read_bytes() == before


def test_cli_reports_the_int4_section(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(model(), str(src))
    rep = tmp_path / "r.json"
    assert main([str(src), "-o", str(tmp_path / "o.onnx"), "--energy", "1", "--min-params", "0", "--quantize", "int4",
                 "--int4-correction", "4", "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "int4:          2 weight(s) as MatMulNBits (block 32), 2 with a correction branch" in text
    assert "plain residual SVD" in text  # no statistics: the report says so, and how to whiten
    assert text.count("int4 (block 32) + rank-4 correction") == 2  # each row says what its weight became
    doc = json.loads(rep.read_text())
    assert doc["int4"]["matmul_weight_bytes_after"] < doc["int4"]["matmul_weight_bytes_before"]


# ------------------------------------------------------------------ where the bytes are

def test_the_report_gives_bytes_by_tensor_kind_before_and_after():
    from onnx_lowrank.passes.load import tensor_bytes

    table = np.random.default_rng(0).standard_normal((500, 128)).astype(np.float32)
    src = model()
    src.graph.node.insert(0, helper.make_node("Gather", ["E", "ids"], ["x"], name="embed"))
    src.graph.input[0].CopyFrom(vi("ids", ["batch"], onnx.TensorProto.INT64))
    src.graph.initializer.append(init("E", table))
    kinds = tensor_bytes(src)
    assert kinds == {"matmul weights": (96 * 128 + 96 * 64) * 4, "conv weights": 0, "embeddings": table.nbytes, "other": 96 * 4}
    res = compress(src, energy=1.0, min_params=0, quantize="int4")
    tb = res.totals.tensor_bytes
    assert tb["embeddings"] == [table.nbytes, table.nbytes] and tb["other"] == [384, 384]
    before, after = tb["matmul weights"]
    assert before == kinds["matmul weights"] and after == int4.weight_bytes(res.model) < before / 5
    # int8 codes read through DequantizeLinear still count as the MatMul's weight
    res8 = compress(src, rank=8, min_params=0, quantize="int8")
    assert 0 < res8.totals.tensor_bytes["matmul weights"][1] < (128 + 96 + 96 + 64) * 8 * 4 / 3
    dry = compress(src, rank=8, min_params=0, dry_run=True)
    assert dry.totals.tensor_bytes["matmul weights"] == [before, None]


def test_narrowed_blocks_go_to_int4_whitened_by_the_kept_neurons():
    from test_width import _feeds, ffn_model

    m = ffn_model()
    calib, held = _feeds(400), _feeds(200, seed=7)
    res = compress(m, ffn_keep=0.5, data_aware=True, energy=1.0, calib=calib, min_params=0, quantize="int4",
                   int4_correction=4)
    sec = res.sections["int4"]
    assert res.totals.narrowed == 4 and sec["weights_quantized"] == 4  # two blocks, two projections each
    assert sec["whitened"] == 4 and sec["statistics"] == "whitened by each layer's input Gram"
    ref = run(m, held)[0]
    narrow = compress(m, ffn_keep=0.5, energy=1.0, calib=calib, min_params=0)
    e_narrow = compare("y", ref, run(narrow.model, held)[0]).rel_l2_error
    e_both = compare("y", ref, run(res.model, held)[0]).rel_l2_error
    assert e_both < 1.5 * e_narrow + 0.02


# ------------------------------------------------------------------ one byte budget over every form

def test_a_byte_budget_sizes_feed_forward_widths_against_factor_pairs():
    from test_width import _feeds, _with_projection, ffn_model

    m = _with_projection(ffn_model("gelu"))
    calib, held = _feeds(300), _feeds(100, seed=7)
    for frac in (0.7, 0.4):
        res = compress(m, ffn_keep="auto", data_aware=True, target_bytes=frac, calib=calib, min_params=0)
        before, after = res.totals.tensor_bytes["matmul weights"]
        assert after <= frac * before  # the blocks' bytes are in the budget, at the width written
        widths = {d.weight: d.width for d in res.layers if d.width is not None}
        assert widths and widths["W1_0"] == widths["W2_0"] and {b["kept"] for b in res.sections["width"]["blocks"]}
    adaptive = compress(m, ffn_keep="auto", adaptive=True, target_bytes=0.5, calib=calib, min_params=0)
    before, after = adaptive.totals.tensor_bytes["matmul weights"]
    assert after <= 0.5 * before and adaptive.sections["adaptive"]["blocks_measured"] == 2
    # float32 weights: bytes are four per parameter, so the choice is the parameter budget's
    by_params = compress(m, ffn_keep="auto", data_aware=True, target_params=0.4, calib=calib, min_params=0)
    assert [(d.rank, d.width) for d in res.layers] == [(d.rank, d.width) for d in by_params.layers]
    # a uniform width counts at its narrowed bytes: the rest of the budget goes to Q
    res = compress(m, ffn_keep=0.5, data_aware=True, target_bytes=0.5, calib=calib, min_params=0)
    before, after = res.totals.tensor_bytes["matmul weights"]
    assert after <= 0.5 * before and {d.weight: d for d in res.layers}["Q"].params_after > 0
    assert compare("y", run(m, held)[0], run(res.model, held)[0]).rel_l2_error < 0.5


def test_a_byte_budget_prices_narrowed_blocks_in_int4_with_one_branch_rank_per_block():
    from test_width import _feeds, _with_projection, ffn_model

    m = _with_projection(ffn_model("gelu"))
    calib, held = _feeds(400), _feeds(200, seed=7)
    ref = run(m, held)[0]
    errors = {}
    for frac in (0.12, 0.25):
        res = compress(m, ffn_keep="auto", data_aware=True, target_bytes=frac, quantize="int4", calib=calib, min_params=0)
        before, after = res.totals.tensor_bytes["matmul weights"]
        assert after <= frac * before  # widths, 4-bit blocks and branches priced as written
        assert after == int4.weight_bytes(res.model)  # int8 factor codes and scales count as MatMul weights
        layers = {l["weight"]: l["rank"] for l in res.sections["int4"]["layers"]}
        assert {"W1_0", "W2_0", "W1_1", "W2_1"} <= set(layers)  # both projections of each block in 4 bits
        assert layers["W1_0"] == layers["W2_0"] and layers["W1_1"] == layers["W2_1"]
        errors[frac] = compare("y", ref, run(res.model, held)[0]).rel_l2_error
        widths = {d.weight: d.width for d in res.layers if d.width is not None}
        assert all(widths[f"W1_{b}"] == widths[f"W2_{b}"] for b in (0, 1) if f"W1_{b}" in widths)
    # more bytes, less error; at 12 % of fp32 the blocks must also narrow (4 bits alone are about 16 %)
    assert errors[0.25] < errors[0.12] and errors[0.25] < 0.2
    tight = compress(m, ffn_keep="auto", data_aware=True, target_bytes=0.12, quantize="int4", calib=calib, min_params=0)
    assert tight.totals.narrowed > 0


def test_adaptive_mode_measures_narrowed_blocks_in_int4_under_one_byte_budget():
    from test_width import _feeds, _with_projection, ffn_model

    m = _with_projection(ffn_model("gelu"))
    calib = _feeds(300)
    for data_aware in (False, True):  # with statistics, the projections' mean correction is measured too
        res = compress(m, ffn_keep="auto", adaptive=True, target_bytes=0.12, quantize="int4", calib=calib, min_params=0,
                       data_aware=data_aware)
        before, after = res.totals.tensor_bytes["matmul weights"]
        assert after <= 0.12 * before
        layers = {l["weight"]: l for l in res.sections["int4"]["layers"]}
        assert {"W1_0", "W2_0", "W1_1", "W2_1"} <= set(layers) and layers["W1_0"]["rank"] == layers["W2_0"]["rank"]
        corrected = {w for w, l in layers.items() if l["mean_corrected"]}
        assert corrected == ({"W1_0", "W2_0", "W1_1", "W2_1"} if data_aware else set())
        numbers = res.sections["adaptive"]
        assert numbers["blocks_measured"] == 2 and res.totals.narrowed > 0
        # a narrowed block in 4 bits was measured by feeding, at the shapes found, what its sliced
        # 4-bit projections compute: the search saw the drop of the written model
        assert numbers["final_drop"] == pytest.approx(numbers["measured_drop"], rel=0.02, abs=1e-6)


def test_a_gated_block_takes_4_bit_blocks_on_all_three_projections_under_a_byte_budget():
    from test_width import D, _gated_model

    m, rng = _gated_model(), np.random.default_rng(0)
    mix = rng.standard_normal((4, D))
    calib, held = ({"x": (rng.standard_normal((n, 4)) @ mix + 0.1 * rng.standard_normal((n, D))).astype(np.float32)}
                   for n in (400, 100))
    for adaptive in (False, True):
        res = compress(m, ffn_keep="auto", data_aware=True, adaptive=adaptive, target_bytes=0.2, quantize="int4",
                       calib=calib, min_params=0)
        before, after = res.totals.tensor_bytes["matmul weights"]
        assert after <= 0.2 * before and after == int4.weight_bytes(res.model)  # the gate priced as written
        layers = {l["weight"]: l["rank"] for l in res.sections["int4"]["layers"]}
        assert {"Wg", "Wu", "Wd"} <= set(layers) and layers["Wg"] == layers["Wu"] == layers["Wd"]
        widths = {d.weight: d.width for d in res.layers if d.width is not None}
        assert widths.get("Wg") == widths.get("Wu") == widths.get("Wd")
        assert compare("y", run(m, held)[0], run(res.model, held)[0]).rel_l2_error < 0.3
        if adaptive:  # what was measured (the gate fed in its 4-bit form too) is what the written model loses
            numbers = res.sections["adaptive"]
            assert numbers["final_drop"] == pytest.approx(numbers["measured_drop"], rel=0.02, abs=1e-6)


def test_int4_prices_of_column_selections_are_those_of_the_selected_weights():
    rng = np.random.default_rng(4)
    w = _w(64, 48)
    x = rng.standard_normal((500, 64))
    gram = x.T @ x
    cols = np.sort(rng.choice(48, 20, replace=False))
    got = quant.column_correction_errors(w, gram, [0, 4, 16], [cols, None], block=32)
    assert np.allclose(got[0], quant.correction_errors(w[:, cols], gram, [0, 4, 16], block=32))
    assert np.allclose(got[1], quant.correction_errors(w, gram, [0, 4, 16], block=32))

def test_a_byte_budget_chooses_between_factor_pairs_and_int4_and_is_kept():
    src = model()
    calib = {"x": _inputs(400, 128, seed=2)}
    held = _inputs(200, 128, seed=9)
    ref = run(src, {"x": held})[0]
    errors = {}
    for frac in (0.1, 0.3):
        res = compress(src, target_bytes=frac, quantize="int4", data_aware=True, calib=calib, min_params=0)
        before, after = res.totals.tensor_bytes["matmul weights"]
        assert after <= frac * before  # the allocator prices exactly what is written
        forms = {row.weight: ("pair" if row.factorized else row.reason) for row in res.layers}
        int4_rows = [r for r in forms.values() if r != "pair"]
        assert all(r.startswith("int4 blocks with a rank-") for r in int4_rows)
        layers = {l["weight"]: l["rank"] for l in res.sections["int4"]["layers"]}
        assert len(layers) == len(int4_rows) and res.sections["int4"]["correction"] == "ranks chosen by the byte budget"
        errors[frac] = compare("y", ref, run(res.model, {"x": held})[0]).rel_l2_error
    assert errors[0.3] < errors[0.1] / 3
    # at 10 % one layer cannot afford 4 bits and takes a factor pair; at 30 % both take 4 bits with a branch
    assert res.totals.factorized == 0 and min(layers.values()) > 0


def test_adaptive_mode_measures_int4_and_factor_pairs_under_one_byte_budget():
    src = model()
    calib = {"x": _inputs(400, 128, seed=2)}
    for frac in (0.1, 0.3):
        res = compress(src, target_bytes=frac, quantize="int4", data_aware=True, adaptive=True, calib=calib, min_params=0)
        before, after = res.totals.tensor_bytes["matmul weights"]
        assert after <= frac * before
        numbers = res.sections["adaptive"]
        int4_rows = [r for r in res.layers if not r.factorized and r.reason and r.reason.startswith("int4 blocks")]
        assert numbers["int4_layers"] == len(int4_rows) == len(res.sections["int4"]["layers"]) > 0
        # each form was measured by feeding the weight it computes (blocks as the runtime
        # dequantizes them, plus the branch): the search saw the drop of the written model
        assert numbers["final_drop"] == pytest.approx(numbers["measured_drop"], rel=0.02)
    assert res.totals.factorized == 0  # at 30 % both weights take 4 bits with a branch


def test_without_int4_a_byte_budget_is_a_parameter_budget_for_float32_weights():
    src = model()
    by_bytes = compress(src, target_bytes=0.3, min_params=0)
    by_params = compress(src, target_params=0.3, min_params=0)
    assert [r.rank for r in by_bytes.layers] == [r.rank for r in by_params.layers]
    assert by_bytes.totals.factorized == 2


@pytest.mark.parametrize("flags,needle", [
    (dict(target_bytes=0.2, target_params=0.5, quantize="int4"), "--target-bytes is the budget"),
    (dict(target_bytes=0.2, adaptive=True, quantize="int4", max_drop=0.01, metric="cosine"), "--max-drop"),
    (dict(target_bytes=0.2, ffn_keep=0.5, quantize="int4", data_aware=True), "--ffn-keep"),
    (dict(target_bytes=1.5), "--target-bytes"),
    (dict(target_bytes=0.2, quantize="int4", int4_correction=8), "--int4-correction"),
    (dict(quantize="int4", latency_aware=True), "--latency-aware"),
])
def test_byte_budget_combinations_that_cannot_work_are_refused(flags, needle):
    with pytest.raises(UsageError) as err:
        compress(model(), min_params=0, calib={"x": _inputs(10, 128)}, **flags)
    assert needle.replace("--", "").replace("-", "_") in str(err.value).replace("--", "").replace("-", "_")


def test_whole_valued_corrections_are_ranks():
    from onnx_lowrank.config import CompressConfig

    assert CompressConfig(quantize="int4", int4_correction="2.0").int4_correction == 2
    assert CompressConfig(quantize="int4", int4_correction=0.0).int4_correction == 0
    assert CompressConfig(quantize="int4", int4_correction="0.4").int4_correction == 0.4


# ------------------------------------------------------------------ biases folded into MatMulNBits

def _biased(bias_shape=(48,), bias_as_constant_after=False, second_reader=False):
    #   x[rows, 64] --MatMul(W)--> m --Add(b)--> y   (b an initializer, or a Constant made after the MatMul)
    rng = np.random.default_rng(5)
    b = rng.standard_normal(bias_shape).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="fc")]
    inits = [init("W", _w(64, 48, 6))]
    if bias_as_constant_after:
        nodes.append(helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(b, "b")))
    else:
        inits.append(init("b", b))
    nodes.append(helper.make_node("Add", ["m", "b"], ["y"], name="bias"))
    outputs = [vi("y", ["rows", 48])]
    if second_reader:
        nodes.append(helper.make_node("Relu", ["m"], ["r"], name="other"))
        outputs.append(vi("r", ["rows", 48]))
    model = make_model(nodes, [vi("x", ["rows", 64])], outputs, inits)
    model.graph.value_info.append(vi("m", ["rows", 48]))
    return model


@pytest.mark.parametrize("as_constant", [False, True])
def test_a_bias_after_the_product_goes_into_matmulnbits(as_constant):
    x = _inputs(40, 64)
    calib = [{"x": x}]
    folded = compress(_biased(bias_as_constant_after=as_constant), energy=1.0, min_params=0, quantize="int4",
                      data_aware=True, calib=calib, int4_correction=8).model
    onnx.checker.check_model(folded, full_check=True)
    ops = [n.op_type for n in folded.graph.node if n.op_type != "Constant"]
    nbits = next(n for n in folded.graph.node if n.op_type == "MatMulNBits")
    # with statistics the bias carries the 4-bit error's mean too (a corrected copy; b is no longer read)
    assert nbits.input[4] == "" and nbits.input[5] == "b_mean_corrected"
    assert "b" not in {t.name for t in folded.graph.initializer} | {o for n in folded.graph.node for o in n.output}
    assert ops.count("Add") == 1, "only the branch's Add is left"
    assert [v.name for v in folded.graph.value_info] == [], "the product's output is no longer computed"
    # the same weights with a bias that cannot be folded (shape (1, 48)) compute the same
    kept = compress(_biased(bias_shape=(1, 48)), energy=1.0, min_params=0, quantize="int4", data_aware=True,
                    calib=calib, int4_correction=8).model
    # (its product takes a new bias: the error's mean alone; the (1, 48) bias keeps its Add)
    assert next(n for n in kept.graph.node if n.op_type == "MatMulNBits").input[5] == "W_mean_corrected"
    assert any(n.op_type == "Add" and "b" in n.input for n in kept.graph.node)
    np.testing.assert_allclose(run(folded, {"x": x})[0], run(kept, {"x": x})[0], rtol=1e-5, atol=1e-4)


def test_a_product_read_elsewhere_keeps_its_bias_add():
    res = compress(_biased(second_reader=True), energy=1.0, min_params=0, quantize="int4")
    assert [n.op_type for n in res.model.graph.node].count("Add") == 1
    assert len(next(n for n in res.model.graph.node if n.op_type == "MatMulNBits").input) == 4


def test_a_gemm_bias_goes_into_matmulnbits():
    src = model()
    x = np.random.default_rng(2).standard_normal((8, 128)).astype(np.float32)
    res = compress(src, energy=1.0, min_params=0, quantize="int4")
    fc1 = [n for n in res.model.graph.node if n.op_type == "MatMulNBits" and n.input[0] == "x"]
    assert len(fc1) == 1 and fc1[0].input[5] == "b1" and fc1[0].output[0] == "h"
    assert compare("y", run(src, {"x": x})[0], run(res.model, {"x": x})[0]).rel_l2_error < 0.1


def test_a_runtime_without_the_bias_input_keeps_the_add(monkeypatch):
    real = int4.runtime_problem
    monkeypatch.setattr(int4, "runtime_problem",
                        lambda block=32, level=0, bias=False: "no bias input" if bias else real(block, level))
    res = compress(_biased(), energy=1.0, min_params=0, quantize="int4")
    assert len(next(n for n in res.model.graph.node if n.op_type == "MatMulNBits").input) == 4
    assert [n.op_type for n in res.model.graph.node].count("Add") == 1


# ------------------------------------------------------------------ stacked branches

def test_a_stacked_branch_refits_a_to_the_4bit_b_and_its_blocks_read_as_one_weight():
    k, n, r = 64, 96, 8
    w, x = _w(k, n), _inputs(800, k)
    gram = x.T.astype(np.float64) @ x
    f = quant.fit(w, gram, block=32, rank=r)
    st = quant.stacked(w, f.q, f.correction, gram)
    assert st.rank == r and (st.b.k, st.b.n) == (r, n)
    # A = R B^+ is the least-squares A for the 4-bit B under any input weighting: never worse
    # than keeping the float fit's A, and the branch still repairs most of what it did in float
    bh = quant.dequantize(st.b).astype(np.float64)
    residual = w - quant.dequantize(f.q)
    refit = np.linalg.norm(x @ (residual - st.a @ bh))
    assert refit <= np.linalg.norm(x @ (residual - f.correction.a @ bh)) * (1 + 1e-6)
    assert f.error <= st.error < min(1.1 * f.error, f.error_int4)
    # the stacked blocks read as [Q(W); Q(B)], and cost what stacked_bytes says (with A in int8)
    both = quant.stack_blocks(f.q, st.b)
    assert (both.k, both.blocks) == (k + r, f.q.blocks + 1)
    np.testing.assert_array_equal(quant.dequantize(both), np.vstack([quant.dequantize(f.q), bh.astype(np.float32)]))
    assert both.nbytes - f.q.nbytes + r * k + 4 * r == quant.stacked_bytes(k, n, r, 32)
    with pytest.raises(ValueError, match="stack"):
        quant.stack_blocks(quant.quantize_blocks(_w(64, n), 16), st.b)  # blocks of another size
    # K = 40 rows end in a padded block: B starts the next block, the padded rows (zeros) between
    odd = quant.quantize_blocks(_w(40, n), 32)
    both = quant.stack_blocks(odd, st.b)
    assert both.k == 64 + r
    np.testing.assert_array_equal(quant.dequantize(both), np.vstack([quant.dequantize(odd), np.zeros((24, n), np.float32),
                                                                      bh.astype(np.float32)]))
    assert both.nbytes - odd.nbytes + (24 + r) * 40 + 4 * (24 + r) == quant.stacked_bytes(40, n, r, 32)
    with pytest.raises(ValueError, match="rank"):
        quant.stacked(w, f.q, quant.fit(w, gram, block=32).correction)


def test_the_runtime_reads_a_partial_last_block():
    assert int4.runtime_problem(32, 0, partial=True) is None


def test_a_branch_is_stacked_only_where_it_costs_at_most_an_eighth_more_bytes():
    opts = int4.Int4Options(block=64)
    assert opts.stacks(384, 384, 32, 17) and opts.stacks(384, 1536, 64, 17)  # B fills half a block or more
    assert not opts.stacks(384, 384, 8, 17) and not opts.stacks(120, 6625, 1, 17)  # a padded block per column
    assert not opts.stacks(1536, 384, 64, 17)  # narrower than its input: the concatenated copy costs more
    assert not opts.stacks(384, 384, 32, 10)  # Concat takes axis -1 from opset 11
    for other in (int4.Int4Options(block=64, factors="float"), int4.Int4Options(block=64, branch="separate")):
        assert not other.stacks(384, 384, 32, 17)
    assert opts.branch_bytes(384, 384, 32, 17) == quant.stacked_bytes(384, 384, 32, 64)
    assert opts.branch_bytes(384, 384, 8, 17) == quant.branch_bytes(384, 384, 8)


def _wide(k=64):
    #   x[rows, k] --MatMul(W1: k x 96)--> Add(b1) --> Relu --MatMul(W2: 96 x k)--> y
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"), helper.make_node("Add", ["h", "b1"], ["hb"], name="bias"),
             helper.make_node("Relu", ["hb"], ["a"], name="act"), helper.make_node("MatMul", ["a", "W2"], ["y"], name="down")]
    return make_model(nodes, [vi("x", ["rows", k])], [vi("y", ["rows", k])],
                      [init("W1", _w(k, 96, 1) * 0.2), init("b1", rng.standard_normal(96).astype(np.float32) * 0.1),
                       init("W2", _w(96, k, 2) * 0.2)])


def test_a_layer_whose_input_is_not_a_whole_number_of_blocks_stacks_after_the_padding():
    src = _wide(k=40)  # 40 inputs: blocks of 16 leave 8 padded rows, which x [0, A] meets with zeros
    calib = {"x": _inputs(300, 40, seed=2)}
    held = {"x": _inputs(100, 40, seed=9)}
    outs = {}
    for branch in ("auto", "separate"):
        res = compress(src, energy=1.0, min_params=0, quantize="int4", data_aware=True, calib=calib, int4_block=16,
                       int4_correction=16, int4_branch=branch)
        onnx.checker.check_model(res.model, full_check=True)
        outs[branch] = run(res.model, held)[0]
        if branch == "auto":
            up = next(n for n in res.model.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "hb")
            assert next(a.i for a in up.attribute if a.name == "K") == 40 + 8 + 16
            layer = next(l for l in res.sections["int4"]["layers"] if l["weight"] == "W1")
            assert layer["branch"] == "stacked"
            assert layer["bytes_after"] == quant.block_bytes(40, 96, 16) + quant.stacked_bytes(40, 96, 16, 16)
    outs["none"] = run(compress(src, energy=1.0, min_params=0, quantize="int4", int4_block=16, int4_correction=0).model, held)[0]
    ref = run(src, held)[0]
    e = {k: compare("y", ref, v).rel_l2_error for k, v in outs.items()}
    # B in 4 bits costs a little of the repair (a misplaced row would cost all of it)
    assert e["separate"] < e["auto"] < min(1.25 * e["separate"], 0.5 * e["none"])


def test_a_wide_layer_takes_its_branch_inside_the_blocks_and_a_narrow_one_keeps_it_separate():
    src = _wide()
    calib, held = {"x": _inputs(400, 64, seed=2)}, {"x": _inputs(200, 64, seed=9)}
    ref = run(src, held)[0]
    got = {}
    for branch in ("auto", "separate"):
        res = compress(src, energy=1.0, min_params=0, quantize="int4", data_aware=True, calib=calib, int4_block=16,
                       int4_correction=16, int4_branch=branch)
        onnx.checker.check_model(res.model, full_check=True)
        sec = res.sections["int4"]
        forms = {l["weight"]: (l["branch"], l["rank"]) for l in sec["layers"]}
        ops = [n.op_type for n in res.model.graph.node]
        got[branch] = (compare("y", ref, run(res.model, held)[0]).rel_l2_error, sec["matmul_weight_bytes_after"])
        if branch == "separate":
            assert forms == {"W1": ("separate", 16), "W2": ("separate", 16)} and sec["stacked"] == 0 and "Concat" not in ops
            continue
        assert forms == {"W1": ("stacked", 16), "W2": ("separate", 16)} and sec["stacked"] == 1
        quantized = {row.weight: row.quantized for row in res.layers}
        assert quantized == {"W1": "int4 (block 16) + rank-16 correction (stacked)", "W2": "int4 (block 16) + rank-16 correction"}
        assert "; 1 inside the 4-bit blocks; the error's mean in the bias of 2); the weights and factors it stored" in render_sections(res.sections)
        # W1: MatMulNBits(Concat(x, x A)) over 64 + 8 rows, its bias folded in; W2: the product, x A B and an Add
        producer = {o: n for n in res.model.graph.node for o in n.output}
        up = next(n for n in res.model.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "hb")
        assert next(a.i for a in up.attribute if a.name == "K") == 80 and up.input[5] == "b1_mean_corrected"
        cat = producer[up.input[0]]
        assert cat.op_type == "Concat" and cat.input[0] == "x" and producer[cat.input[1]].op_type == "MatMul"
        assert ops.count("MatMul") == 3 and ops.count("Add") == 1
        # bytes: W1's codes grow by one block per column, its B leaves the int8 factors
        layer = next(l for l in res.sections["int4"]["layers"] if l["weight"] == "W1")
        assert layer["bytes_after"] == quant.block_bytes(64, 96, 16) + quant.stacked_bytes(64, 96, 16, 16)
    assert got["auto"][0] < 1.1 * got["separate"][0]
    assert got["auto"][1] == int4.weight_bytes(compress(src, energy=1.0, min_params=0, quantize="int4", data_aware=True,
                                                        calib=calib, int4_block=16, int4_correction=16).model)


def test_a_byte_budget_prices_stacked_branches_as_written_and_adaptive_mode_measures_them():
    src = _wide()
    calib = {"x": _inputs(400, 64, seed=2)}
    for adaptive in (False, True):
        res = compress(src, target_bytes=0.3, quantize="int4", data_aware=True, calib=calib, min_params=0, adaptive=adaptive,
                       int4_block=16)
        before, after = res.totals.tensor_bytes["matmul weights"]
        assert after <= 0.3 * before
        layers = {l["weight"]: l for l in res.sections["int4"]["layers"]}
        assert layers["W1"]["rank"] > 0 and layers["W1"]["branch"] == "stacked"
        if adaptive:  # the emulated weight is the stacked form's: the search saw the written model's drop
            numbers = res.sections["adaptive"]
            assert numbers["final_drop"] == pytest.approx(numbers["measured_drop"], rel=0.02)


# ------------------------------------------------------------------ mean correction

@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_the_mean_of_the_4bit_error_goes_into_the_bias_and_the_calibration_rows_average_no_error(rounding):
    src = _biased()
    x = _inputs(600, 64, seed=3) + np.linspace(-2.0, 4.0, 64, dtype=np.float32)  # inputs with a mean
    held = _inputs(300, 64, seed=4) + np.linspace(-2.0, 4.0, 64, dtype=np.float32)
    gram = x.T.astype(np.float64) @ x
    mean = (x.astype(np.float64).mean(axis=0), len(x))
    errs = {}
    for rank in (0, 8):
        opts = int4.Int4Options(rank=rank, rounding=rounding)
        plain, _ = int4.quantize_int4(src, options=opts, grams={"W": gram})
        fixed, summary = int4.quantize_int4(src, options=opts, grams={"W": gram}, means={"W": mean})
        assert [l.mean_corrected for l in summary.layers] == [True]
        onnx.checker.check_model(fixed, full_check=True)
        y_ref = run(src, {"x": x})[0]
        # what the layer gets wrong on the calibration rows averages to zero (the bias took it)
        bias_err = (run(fixed, {"x": x})[0] - y_ref).mean(axis=0)
        assert np.abs(bias_err).max() < 1e-3 * np.abs(y_ref).max()
        assert np.abs((run(plain, {"x": x})[0] - y_ref).mean(axis=0)).max() > 10 * np.abs(bias_err).max()
        y_held = run(src, {"x": held})[0]
        errs[rank] = tuple(compare("y", y_held, run(m, {"x": held})[0]).rel_l2_error for m in (plain, fixed))
    # held-out rows of the same distribution: the bias alone repairs the mean part of 4-bit error;
    # with a branch, the plain fit had spent a direction on the mean, and the two end about even.
    # Error feedback by the (uncentred) Gram already works against the mean direction: the bias
    # then repays less, and must not cost
    gain = 0.95 if rounding == "nearest" else 1.0
    assert errs[0][1] < gain * errs[0][0] and errs[8][1] < 1.05 * errs[8][0]


def test_the_mean_correction_leaves_a_shared_bias_and_gemm_alone():
    # a bias the Add shares with another reader: the corrected copy is new, the original stays
    src = _biased()
    src.graph.node.append(helper.make_node("Add", ["y", "b"], ["z"], name="again"))
    src.graph.output.append(vi("z", ["rows", 48]))
    x = _inputs(200, 64, seed=3) + 1.0
    gram, mean = x.T.astype(np.float64) @ x, (x.astype(np.float64).mean(axis=0), len(x))
    out, summary = int4.quantize_int4(src, options=int4.Int4Options(rank=4), grams={"W": gram}, means={"W": mean})
    assert summary.layers[0].mean_corrected and "b" in {t.name for t in out.graph.initializer}
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in src.graph.initializer if t.name == "b")),
                                  numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "b")))
    # inputs that never vary: nothing to centre on (the layer still takes 4 bits, fitted as before)
    xc = np.ones((50, 64), np.float32)
    out, summary = int4.quantize_int4(_biased(), options=int4.Int4Options(rank=4), grams={"W": xc.T.astype(np.float64) @ xc},
                                      means={"W": (np.ones(64), 50)})
    assert [l.mean_corrected for l in summary.layers] == [False] and not summary.left_float
    # a Gemm (transB, C the bias) takes it in its folded bias; with alpha != 1 it keeps the plain fit
    g = model()
    xg = _inputs(300, 128, seed=3) + np.linspace(-1.0, 3.0, 128, dtype=np.float32)
    stats = dict(grams={"W1": xg.T.astype(np.float64) @ xg}, means={"W1": (xg.astype(np.float64).mean(axis=0), len(xg))})
    out, s2 = int4.quantize_int4(g, options=int4.Int4Options(rank=4), **stats)
    assert [l.weight for l in s2.layers if l.mean_corrected] == ["W1"]
    onnx.checker.check_model(out, full_check=True)
    fc1 = next(n for n in out.graph.node if n.op_type == "MatMulNBits" and n.input[0] == "x")
    assert fc1.input[5] == "b1_mean_corrected" and "b1" not in {t.name for t in out.graph.initializer}
    plain, _ = int4.quantize_int4(g, options=int4.Int4Options(rank=4), grams=stats["grams"])
    y_ref = run(g, {"x": xg})[0]
    assert compare("y", y_ref, run(out, {"x": xg})[0]).rel_l2_error < compare("y", y_ref, run(plain, {"x": xg})[0]).rel_l2_error
    scaled = model()
    next(n for n in scaled.graph.node if n.op_type == "Gemm").attribute.append(helper.make_attribute("alpha", 0.5))
    _, s3 = int4.quantize_int4(scaled, options=int4.Int4Options(rank=4), **stats)
    assert not any(l.mean_corrected for l in s3.layers)


def test_adaptive_mode_measures_the_mean_correction_where_it_can_feed_the_bias():
    # W1's bias is an Add adaptive mode can feed shifted; W2 has none (its correction would add
    # a bias the search never ran), so only W1 is measured, and written, mean-corrected
    src = _wide()
    calib = {"x": _inputs(300, 64, seed=2) + np.linspace(-1.0, 2.0, 64, dtype=np.float32)}
    res = compress(src, target_bytes=0.3, quantize="int4", data_aware=True, calib=calib, min_params=0, adaptive=True,
                   int4_block=16)
    layers = {l["weight"]: l for l in res.sections["int4"]["layers"]}
    assert layers["W1"]["mean_corrected"] and not layers["W2"]["mean_corrected"]
    numbers = res.sections["adaptive"]
    assert numbers["final_drop"] == pytest.approx(numbers["measured_drop"], rel=0.02)
    up = next(n for n in res.model.graph.node if n.op_type == "MatMulNBits" and n.output[0] == "hb")
    assert up.input[5] == "b1_mean_corrected"
    # a bias another node also reads cannot be fed for one layer alone: no correction there
    shared = _wide()
    shared.graph.node.append(helper.make_node("Add", ["hb", "b1"], ["z"], name="again"))
    shared.graph.output.append(vi("z", ["rows", 96]))
    res = compress(shared, target_bytes=0.3, quantize="int4", data_aware=True, calib=calib, min_params=0, adaptive=True,
                   int4_block=16)
    assert res.sections["int4"]["mean_corrected"] == 0
    assert res.sections["adaptive"]["final_drop"] == pytest.approx(res.sections["adaptive"]["measured_drop"], rel=0.02)


def test_a_bias_every_reader_of_which_took_a_corrected_copy_leaves_the_file():
    # one (48,) bias after two MatMuls, both mean-corrected: each product takes its own copy, and
    # the original, read by nothing, is not left behind
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"]), helper.make_node("Add", ["m1", "b"], ["y1"]),
             helper.make_node("MatMul", ["x", "W2"], ["m2"]), helper.make_node("Add", ["b", "m2"], ["y2"])]
    src = make_model(nodes, [vi("x", ["rows", 64])], [vi("y1", ["rows", 48]), vi("y2", ["rows", 48])],
                     [init("W1", _w(64, 48, 1)), init("W2", _w(64, 48, 2)), init("b", _w(1, 48, 3).reshape(48))])
    x = _inputs(300, 64, seed=3) + 1.0
    gram, mean = x.T.astype(np.float64) @ x, (x.astype(np.float64).mean(axis=0), len(x))
    out, summary = int4.quantize_int4(src, options=int4.Int4Options(rank=4), grams={"W1": gram, "W2": gram},
                                      means={"W1": mean, "W2": mean})
    assert [l.mean_corrected for l in summary.layers] == [True, True]
    onnx.checker.check_model(out, full_check=True)
    read = {i for n in out.graph.node for i in n.input}
    assert "b" not in {t.name for t in out.graph.initializer} and {t.name for t in out.graph.initializer} <= read
    for got, ref in zip(run(out, {"x": x}), run(src, {"x": x})):
        assert compare("y", ref, got).rel_l2_error < 0.05


def test_a_byte_budget_prices_factor_pairs_the_int4_stage_stores_int8_as_int8():
    # factor pairs inside an If body are stored int8 as in the main graph, and the budget prices them so
    k, n = 100, 200
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "Wt"], ["t"])], "then", [], [vi("t", ["rows", n])],
                               [init("Wt", lowrank(k, n, 12, seed=1))])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "We"], ["e"])], "else", [], [vi("e", ["rows", n])])
    nodes = [helper.make_node("If", ["cond"], ["yi"], then_branch=then_g, else_branch=else_g),
             helper.make_node("MatMul", ["x", "Wo"], ["yo"]), helper.make_node("Add", ["yo", "yi"], ["y"])]
    src = make_model(nodes, [vi("x", ["rows", k]), vi("cond", [], onnx.TensorProto.BOOL)], [vi("y", ["rows", n])],
                     [init("We", lowrank(k, n, 12, seed=2)), init("Wo", lowrank(k, n, 12, seed=3))])
    res = compress(src, target_bytes=0.3, quantize="int4", min_params=0)
    before, after = res.totals.tensor_bytes["matmul weights"]
    assert before == 3 * k * n * 4  # the body's own weight and the outer one it reads count as MatMul weights
    assert after <= 0.3 * before
    assert not res.sections["int4"]["left_float"]
    assert [f["storage"] for f in res.sections["int4"]["factors"]] == ["int8"] * 6
    x = np.random.default_rng(0).standard_normal((20, k)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        assert compare("y", run(src, feeds)[0], run(res.model, feeds)[0]).rel_l2_error < 0.05
    # IR 3 lists every initializer as a graph input: the factors are stored int8 all the same
    ir3 = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", ["rows", k]), vi("W", [k, n])],
                     [vi("y", ["rows", n])], [init("W", lowrank(k, n, 12, seed=4))], opset=9, ir_version=3)
    res = compress(ir3, target_bytes=0.3, quantize="int4", min_params=0, allow_input_weights=True)
    before, after = res.totals.tensor_bytes["matmul weights"]
    assert after <= 0.3 * before and not res.sections["int4"]["left_float"]
    x = np.random.default_rng(0).standard_normal((20, k)).astype(np.float32)
    assert compare("y", run(ir3, {"x": x})[0], run(res.model, {"x": x})[0]).rel_l2_error < 0.05


def test_adaptive_mode_measures_a_factor_pair_with_the_int8_factors_the_int4_stage_writes():
    # an exactly rank-8 weight: the byte budget takes the pair, whose factors are written int8;
    # measured as float, the search would have seen no drop at all where the written model has one
    src = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", ["rows", 128])], [vi("y", ["rows", 96])],
                     [init("W", lowrank(128, 96, 8, seed=3))])
    res = compress(src, target_bytes=0.3, quantize="int4", data_aware=True, calib={"x": _inputs(300, 128, seed=2)},
                   min_params=0, adaptive=True)
    assert [f["storage"] for f in res.sections["int4"]["factors"]] == ["int8", "int8"]
    numbers = res.sections["adaptive"]
    assert numbers["final_drop"] > 0
    assert numbers["final_drop"] == pytest.approx(numbers["measured_drop"], rel=0.02)


def test_the_summary_says_which_ranks_ran_when_the_asked_one_cannot():
    m = model()
    shapes = [tuple(t.dims) for t in m.graph.initializer if len(t.dims) == 2]
    res = compress(m, quantize="int4", energy=1.0, int4_correction=1000, min_params=0)
    section = res.sections["int4"]
    used = sorted({l["rank"] for l in section["layers"]})
    assert max(used) <= min(min(s) for s in shapes) < 1000
    assert section["correction"] == f"rank 1000; ranks used {used[0]}" + (f"-{used[-1]}" if len(used) > 1 else "")
    assert compress(m, quantize="int4", energy=1.0, int4_correction=4, min_params=0).sections["int4"]["correction"] == "rank 4"


def test_the_summary_line_without_a_branch_says_what_stands_in_for_it_once():
    from onnx_lowrank.report import render_sections

    src = model()
    res = compress(src, energy=1.0, min_params=0, quantize="int4", data_aware=True, calib={"x": _correlated(400, 128, seed=2)})
    line = render_sections(res.sections).splitlines()[-2]
    assert line.startswith("int4:          2 weight(s) as MatMulNBits (block 32), no correction branch (the 4-bit error's "
                           "mean in the bias of 2 of 2 weight(s); 2 rounded with error feedback (gptq)); the weights and "
                           "factors it stored: ")
    assert line.count("mean") == 1
    plain = compress(src, energy=1.0, min_params=0, quantize="int4", int4_correction=0).sections["int4"]
    assert plain["statistics"] == "no input statistics; pass data_aware with calib to whiten and correct"


def test_int4_that_quantized_nothing_because_everything_was_factorized_says_so(caplog):
    import logging

    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", ["b", 64])], [vi("y", ["b", 48])],
                   [init("W", lowrank(64, 48, 4))])
    with caplog.at_level(logging.WARNING, logger="onnx_lowrank"):
        res = compress(m, quantize="int4", min_params=0)
    assert res.layers[0].factorized and res.sections["int4"]["weights_quantized"] == 0
    said = [r.getMessage() for r in caplog.records if "put no weight in 4-bit blocks" in r.getMessage()]
    assert len(said) == 1 and "quantize='int4'" in said[0] and "energy=1" in said[0]
    caplog.clear()
    full = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", ["b", 64])], [vi("y", ["b", 48])],
                      [init("W", _w(64, 48))])
    with caplog.at_level(logging.WARNING, logger="onnx_lowrank"):
        assert compress(full, quantize="int4", energy=1.0, min_params=0).sections["int4"]["weights_quantized"] == 1
    assert not any("put no weight" in r.getMessage() for r in caplog.records)


def test_adaptive_mode_warns_that_it_cannot_see_accuracy_level_4_rounding(caplog):
    import logging

    calib = {"x": _inputs(200, 128, seed=2)}
    kw = dict(target_bytes=0.3, quantize="int4", data_aware=True, adaptive=True, calib=calib, min_params=0)
    with caplog.at_level(logging.WARNING, logger="onnx_lowrank"):
        compress(model(), int4_accuracy_level=4, **kw)
    said = [r.getMessage() for r in caplog.records if "rounds activations to int8" in r.getMessage()]
    assert len(said) == 1 and "int4_accuracy_level=4" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="onnx_lowrank"):
        compress(model(), **kw)
    assert not any("rounds activations" in r.getMessage() for r in caplog.records)


def test_a_row_stored_in_4_bits_shows_no_factorization_it_did_not_get():
    from onnx_lowrank.report import render_table

    res = compress(model(), quantize="int4", energy=1.0, int4_correction=8, min_params=0)
    rows = [line.split() for line in render_table(res.layers).splitlines()[2:]]
    assert rows and all(r[3:6] == ["-", "-", "-"] and "int4" in r for r in rows)
    assert all(d.rank is not None for d in res.layers)  # (the JSON report keeps the spectrum's numbers)


# ------------------------------------------------------------------ weights read inside If/Loop bodies

def _decoder_like(k=64, n=48):
    """An optimum merged decoder in miniature: the main graph's weight W and bias b are read by
    MatMul + Add in both branches of an If; the else branch also holds a Constant-node weight of
    its own, and a Loop body an initializer of its own."""
    w, bias, wc, wl = _w(k, n, 1) * 0.1, _w(1, n, 2)[0], _w(n, n, 3) * 0.1, _w(k, k, 4) * 0.1
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["tm"]), helper.make_node("Add", ["tm", "b"], ["t"])],
                               "then", [], [vi("t", ["rows", n])])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["em"]), helper.make_node("Add", ["b", "em"], ["e1"]),
                                helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(wc, "Wc")),
                                helper.make_node("MatMul", ["e1", "Wc"], ["e"])],
                               "else", [], [vi("e", ["rows", n])])
    body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                              helper.make_node("MatMul", ["h", "Wl"], ["h2"]), helper.make_node("Relu", ["h2"], ["h_out"])],
                             "body", [vi("i", [], onnx.TensorProto.INT64), vi("cond_in", [], onnx.TensorProto.BOOL),
                                      vi("h", ["rows", k])],
                             [vi("cond_out", [], onnx.TensorProto.BOOL), vi("h_out", ["rows", k])], [init("Wl", wl)])
    nodes = [helper.make_node("Loop", ["trips", "", "x0"], ["x"], body=body),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [vi("x0", ["rows", k]), vi("cond", [], onnx.TensorProto.BOOL),
                              vi("trips", [], onnx.TensorProto.INT64)], [vi("y", ["rows", n])],
                      [init("W", w), init("b", bias)])


def _flat(w, bias, k, n):
    """The then branch's product in the main graph."""
    return make_model([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                      [vi("x", ["rows", k])], [vi("y", ["rows", n])], [init("W", w), init("b", bias)])


def test_int4_rewrites_readers_inside_if_and_loop_bodies_where_they_are():
    k, n = 64, 48
    src = _decoder_like(k, n)
    before = src.SerializeToString()
    out, summary = int4.quantize_int4(src, options=int4.Int4Options(rank=0))
    assert src.SerializeToString() == before  # the input model is untouched
    assert sorted(l.weight for l in summary.layers) == ["W", "Wc", "Wl"] and not summary.left_float
    assert [sorted(l.nodes) for l in summary.layers if l.weight == "W"] == [["em", "tm"]]  # one weight, a reader in each branch
    onnx.checker.check_model(out)
    graphs = list(onnx_lowrank_graphs(out))
    # no float weight is left anywhere, the new initializers are in the main graph, the bias Adds folded
    assert not any(t.name in ("W", "Wl") for g in graphs for t in g.initializer)
    assert not any(n_.op_type == "Constant" and n_.output[0] == "Wc" for g in graphs for n_ in g.node)
    by_name = {g.name: [n_.op_type for n_ in g.node] for g in graphs}
    assert by_name["then"] == ["MatMulNBits"] and by_name["else"] == ["MatMulNBits", "MatMulNBits"]
    assert "MatMulNBits" in by_name["body"] and "MatMul" not in by_name["body"]
    assert int4.weight_bytes(out) < 0.2 * int4.weight_bytes(src)
    # each branch computes what the same weight quantized in a flat graph computes
    x = np.random.default_rng(0).standard_normal((7, k)).astype(np.float32)
    w = numpy_helper.to_array(next(t for t in src.graph.initializer if t.name == "W"))
    bias = numpy_helper.to_array(next(t for t in src.graph.initializer if t.name == "b"))
    flat, _ = int4.quantize_int4(_flat(w, bias, k, n), options=int4.Int4Options(rank=0))
    feeds = {"x0": x, "cond": np.array(True), "trips": np.array(0, np.int64)}
    np.testing.assert_allclose(run(out, feeds)[0], run(flat, {"x": x})[0], rtol=1e-5, atol=1e-5)
    for cond, trips in ((True, 2), (False, 0), (False, 3)):
        feeds = {"x0": x, "cond": np.array(cond), "trips": np.array(trips, np.int64)}
        assert compare("y", run(src, feeds)[0], run(out, feeds)[0]).rel_l2_error < 0.1


def onnx_lowrank_graphs(model):
    from onnx_lowrank.io import iter_graphs

    return iter_graphs(model.graph)


def test_int4_in_bodies_leaves_a_weight_that_a_body_returns_float():
    k, n = 32, 16
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"])], "then", [], [vi("t", ["rows", n])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["e0"])], "else", [], [vi("W", [k, n])])
    src = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                     [vi("x", ["rows", k]), vi("cond", [], onnx.TensorProto.BOOL)], [vi("y", None)], [init("W", _w(k, n))])
    out, summary = int4.quantize_int4(src, options=int4.Int4Options(rank=0))
    assert not summary.layers and "output of an If/Loop/Scan body" in summary.left_float["W"]


def test_compress_quantizes_weights_of_if_branches_whitened_by_what_reaches_them(tmp_path):
    k, n = 64, 48
    src = _decoder_like(k, n)
    res = compress(src, energy=1.0, quantize="int4", int4_correction=8, min_params=0)
    sec = res.sections["int4"]
    assert sorted(l["weight"] for l in sec["layers"]) == ["W", "Wc", "Wl"]
    before, after = res.totals.tensor_bytes["matmul weights"]
    assert after < 0.4 * before
    x = np.random.default_rng(1).standard_normal((9, k)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x0": x, "cond": np.array(cond), "trips": np.array(1, np.int64)}
        assert compare("y", run(src, feeds)[0], run(res.model, feeds)[0]).rel_l2_error < 0.1
    # with calibration data the statistics reach the If branches (W in both, Wc in the else
    # branch's own activation); the Loop body's weight keeps the plain residual, and says why
    calib = [{"x0": x, "cond": np.array(c), "trips": np.array(1, np.int64)} for c in (True, False)]
    res = compress(src, energy=1.0, quantize="int4", int4_correction=8, min_params=0, data_aware=True, calib=calib,
                   int4_rounding="nearest")
    white = {l["weight"]: l["whitened"] for l in res.sections["int4"]["layers"]}
    assert white == {"W": True, "Wc": True, "Wl": False}
    assert "Loop/Scan body" in res.sections["int4"]["statistics"]
    # a feed that never takes the else branch gives Wc no statistics: it says so
    res = compress(src, energy=1.0, quantize="int4", int4_correction=8, min_params=0, data_aware=True, calib=calib[:1],
                   int4_rounding="nearest")
    white = {l["weight"]: l["whitened"] for l in res.sections["int4"]["layers"]}
    assert white == {"W": True, "Wc": False, "Wl": False}


def test_statistics_of_a_weight_in_if_branches_are_those_of_the_rows_that_reach_it():
    from onnx_lowrank.passes.discover import discover
    from onnx_lowrank.passes.statistics import capture_grams

    k, n = 64, 48
    src = _decoder_like(k, n)
    rng = np.random.default_rng(5)
    feeds = [{"x0": rng.standard_normal((r, k)).astype(np.float32), "cond": np.array(c), "trips": np.array(1, np.int64)}
             for r, c in ((7, True), (5, False), (4, False))]
    found = discover(src, min_params=0)
    groups = {g.weight.name: g for g in found.candidates}
    cap = capture_grams(src, list(groups.values()), feeds, None)
    # x (the Loop's output, read by W in both branches) and e1 (the else branch's own, read by Wc)
    w = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer}
    wl = next(numpy_helper.to_array(t) for n_ in src.graph.node if n_.op_type == "Loop" for a in n_.attribute
              for t in a.g.initializer)
    xs = [np.maximum(f["x0"].astype(np.float64) @ wl, 0) for f in feeds]
    e1 = [x @ w["W"] + w["b"] for x, f in zip(xs, feeds) if not f["cond"]]
    for name, rows in (("W", np.vstack(xs)), ("Wc", np.vstack(e1))):
        g, side = cap.grams[groups[name].key]
        assert side == "left" and cap.rows[groups[name].key] == len(rows)
        assert np.allclose(g, rows.T @ rows, rtol=1e-4, atol=1e-3)
    assert "Loop/Scan body" in cap.skipped[groups["Wl"].key]


def test_byte_budgets_take_weights_read_in_bodies():
    k, n = 64, 48
    src = _decoder_like(k, n)
    res = compress(src, target_bytes=0.3, quantize="int4", min_params=0)
    assert sorted(l["weight"] for l in res.sections["int4"]["layers"]) == ["W", "Wc", "Wl"]
    before, after = res.totals.tensor_bytes["matmul weights"]
    assert after <= 0.3 * before
    # adaptive mode measures the main graph's W (read in both branches) in place; the bodies' own weights stay float
    x = np.random.default_rng(2).standard_normal((30, k)).astype(np.float32)
    calib = [{"x0": x, "cond": np.array(c), "trips": np.array(1, np.int64)} for c in (True, False)]
    res = compress(src, target_bytes=0.8, quantize="int4", min_params=0, adaptive=True, calib=calib)
    sec = res.sections["int4"]
    assert [l["weight"] for l in sec["layers"]] == ["W"]
    assert all("main graph only" in sec["left_float"][w] for w in ("Wc", "Wl"))
    numbers = res.sections["adaptive"]
    assert numbers["final_drop"] == pytest.approx(numbers["measured_drop"], rel=0.02) and numbers["final_drop"] > 0


def test_a_dry_run_words_the_budgets_4_bit_rows_as_the_real_run_does():
    src = _decoder_like()
    real = compress(src, target_bytes=0.3, quantize="int4", min_params=0)
    dry = compress(src, target_bytes=0.3, quantize="int4", min_params=0, dry_run=True)
    rows = [(d.weight, d.quantized) for d in real.layers]
    assert all(q and q.startswith("int4 (block 32) + rank-") for _, q in rows)
    assert [(d.weight, d.quantized) for d in dry.layers] == rows
    from onnx_lowrank.report import render_table

    assert "skipped" not in render_table(dry.layers)


@pytest.mark.parametrize("mode", ["int8", "int8-per-channel"])
def test_int8_quantizes_weights_read_inside_bodies_as_onnxruntimes_quantizer_does_in_the_main_graph(mode):
    # onnxruntime's dynamic quantizer does not reach weights read inside If/Loop bodies; the stage writes them itself
    k, n = 64, 48
    src = _decoder_like(k, n)
    res = compress(src, energy=1.0, quantize=mode, min_params=0)
    q = res.sections["quantize"]
    assert q["body_weights_quantized"] == 3 and "dense_left_float" not in q
    assert "written in int8 as it writes the main graph's" in render_sections(res.sections)
    ops = [n_.op_type for g in onnx_lowrank_graphs(res.model) for n_ in g.node]
    assert "MatMul" not in ops and ops.count("MatMulInteger") == 4 and ops.count("DynamicQuantizeLinear") == 4
    assert all(o.domain in ("", "ai.onnx") for o in res.model.opset_import)  # standard operators, as the quantizer writes
    before, after = res.totals.tensor_bytes["matmul weights"]
    assert after < 0.3 * before
    onnx.checker.check_model(res.model)
    # the then branch computes what onnxruntime's own int8 of the same product in a main graph computes
    w = numpy_helper.to_array(next(t for t in src.graph.initializer if t.name == "W"))
    bias = numpy_helper.to_array(next(t for t in src.graph.initializer if t.name == "b"))
    from onnx_lowrank.passes.quantize import quantize_int8

    flat = quantize_int8(_flat(w, bias, k, n), per_channel=mode == "int8-per-channel")
    x = np.random.default_rng(3).standard_normal((11, k)).astype(np.float32)
    got = run(res.model, {"x0": x, "cond": np.array(True), "trips": np.array(0, np.int64)})[0]
    np.testing.assert_allclose(got, run(flat, {"x": x})[0], rtol=1e-5, atol=1e-5)
    for cond, trips in ((True, 2), (False, 1)):
        feeds = {"x0": x, "cond": np.array(cond), "trips": np.array(trips, np.int64)}
        assert compare("y", run(src, feeds)[0], run(res.model, feeds)[0]).rel_l2_error < 0.03


def test_int8_says_which_dense_weights_it_left_float():
    # a weight a body's Gemm reads with transA=1 has no int8 form there: counted, and int4 named
    k, n = 32, 16
    then_g = helper.make_graph([helper.make_node("Gemm", ["xt", "W"], ["t"], transA=1)], "then", [], [vi("t", [n, n])])
    else_g = helper.make_graph([helper.make_node("Gemm", ["xt", "W"], ["e"], transA=1)], "else", [], [vi("e", [n, n])])
    src = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                     [vi("xt", [k, n]), vi("cond", [], onnx.TensorProto.BOOL)], [vi("y", [n, n])], [init("W", _w(k, n))])
    res = compress(src, energy=1.0, quantize="int8", min_params=0)
    q = res.sections["quantize"]
    if "dense_left_float" in q:  # (unless onnxruntime's quantizer rewrote the Gemm into something it quantized)
        assert q["dense_left_float"] == ["W"] and q["dense_left_float_in_bodies"] == 1
        assert "--quantize int4 takes Gemm readers too" in render_sections(res.sections)
    feeds = {"xt": _w(k, n, 5), "cond": np.array(True)}
    assert compare("y", run(src, feeds)[0], run(res.model, feeds)[0]).rel_l2_error < 0.03
    # a model it quantizes whole says nothing of the kind
    res = compress(model(), energy=1.0, quantize="int8", min_params=0)
    assert "dense_left_float" not in res.sections["quantize"] and "body_weights_quantized" not in res.sections["quantize"]


def test_int8_shares_the_quantizers_codes_with_a_body_that_reads_the_same_weight():
    # W is read in the main graph (onnxruntime quantizes that reader) and in an If branch (done here): one set of codes
    k, n = 64, 48
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"])], "then", [], [vi("t", ["rows", n])])
    else_g = helper.make_graph([helper.make_node("Identity", ["m"], ["e"])], "else", [], [vi("e", ["rows", n])])
    src = make_model([helper.make_node("MatMul", ["x", "W"], ["m"]),
                      helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                     [vi("x", ["rows", k]), vi("cond", [], onnx.TensorProto.BOOL)], [vi("y", ["rows", n])], [init("W", _w(k, n))])
    for mode in ("int8", "int8-per-channel"):
        res = compress(src, energy=1.0, quantize=mode, min_params=0)
        codes = [t.name for t in res.model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
        assert codes == ["W_quantized"], mode
        x = _w(5, k, 6)
        for cond in (True, False):
            got = run(res.model, {"x": x, "cond": np.array(cond)})[0]
            assert compare("y", run(src, {"x": x, "cond": np.array(cond)})[0], got).rel_l2_error < 0.03
        a, b = (run(res.model, {"x": x, "cond": np.array(c)})[0] for c in (True, False))
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # the same codes in both places


def test_a_value_two_ifs_deep_is_fetched_on_the_runs_that_reach_it_and_empty_on_the_others():
    from onnx_lowrank.runtime import expose

    k = 6
    inner_then = helper.make_graph([helper.make_node("Relu", ["x"], ["deep"]), helper.make_node("Neg", ["deep"], ["it"])],
                                   "inner_then", [], [vi("it", ["rows", k])])
    inner_else = helper.make_graph([helper.make_node("Identity", ["x"], ["ie"])], "inner_else", [], [vi("ie", ["rows", k])])
    outer_then = helper.make_graph([helper.make_node("If", ["c2"], ["ot"], then_branch=inner_then, else_branch=inner_else)],
                                   "outer_then", [], [vi("ot", ["rows", k])])
    outer_else = helper.make_graph([helper.make_node("Abs", ["x"], ["oe"])], "outer_else", [], [vi("oe", ["rows", k])])
    m = make_model([helper.make_node("If", ["c1"], ["y"], then_branch=outer_then, else_branch=outer_else)],
                   [vi("x", ["rows", k]), vi("c1", [], onnx.TensorProto.BOOL), vi("c2", [], onnx.TensorProto.BOOL)],
                   [vi("y", ["rows", k])])
    fetch = expose(m, {"deep", "x"})
    assert set(fetch) == {"deep"} and len(fetch["deep"]) == 1 and fetch["deep"][0] != "deep"  # (x is an input: the feed's own)
    onnx.checker.check_model(m)
    x = np.random.default_rng(0).standard_normal((3, k)).astype(np.float32)
    import onnxruntime as ort

    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    for c1, c2, reached in ((True, True, True), (True, False, False), (False, True, False)):
        y, deep = sess.run(["y", fetch["deep"][0]], {"x": x, "c1": np.array(c1), "c2": np.array(c2)})
        if reached:
            assert np.array_equal(deep, np.maximum(x, 0)) and np.array_equal(y, -np.maximum(x, 0))
        else:
            assert deep.size == 0


def _same_names(returned=False):
    """Two If branches with the same value names (as optimum's merge leaves them), each reading the
    main graph's W through an activation of its own: ``a = Relu(x)`` or ``a = Neg(x)``; with
    ``returned``, the activation is also what the branch returns."""
    k, n = 8, 6

    def branch(tag, op):
        nodes = [helper.make_node(op, ["x"], ["a"]), helper.make_node("MatMul", ["a", "W"], ["m"], name="mm")]
        outs = ["a"] if returned else ["m"]
        return helper.make_graph(nodes + ([helper.make_node("MatMul", ["m", "V"], ["unused"])] if returned else []), tag, [],
                                 [vi(outs[0], ["rows", k if returned else n])])

    return make_model([helper.make_node("If", ["c"], ["y"], then_branch=branch("then", "Relu"), else_branch=branch("else", "Neg"))],
                      [vi("x", ["rows", k]), vi("c", [], onnx.TensorProto.BOOL)], [vi("y", None)],
                      [init("W", _w(k, n)), init("V", _w(n, n))])


@pytest.mark.parametrize("returned", [False, True])
def test_statistics_reach_both_branches_where_they_name_their_values_alike(returned):
    from onnx_lowrank.passes.discover import discover
    from onnx_lowrank.passes.statistics import capture_grams

    src = _same_names(returned)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((r, 8)).astype(np.float32), "c": np.array(c)} for r, c in ((5, True), (7, False), (3, True))]
    group = next(g for g in discover(src, min_params=0).candidates if g.weight.name == "W")
    cap = capture_grams(src, [group], feeds, None)
    rows = np.vstack([np.maximum(f["x"], 0) if f["c"] else -f["x"] for f in feeds]).astype(np.float64)
    g, _ = cap.grams[group.key]
    assert cap.rows[group.key] == 15 and np.allclose(g, rows.T @ rows, rtol=1e-5, atol=1e-4)


def test_statistics_in_a_branch_type_their_stand_in_by_the_weight_where_inference_cannot():
    from onnx_lowrank.runtime import expose

    src = _same_names()
    for t in src.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    src.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    src.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    for n in src.graph.node[0].attribute:  # a value inference cannot type: an op of another domain
        n.g.node[0].op_type, n.g.node[0].domain = ("Gelu", "com.microsoft")
        n.g.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    src.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    fetch = expose(src, {"a"})
    assert len(fetch["a"]) == 2
    empties = [n for a in src.graph.node[0].attribute for n in a.g.node if n.op_type == "Constant"]
    assert empties and all(n.attribute[0].t.data_type == onnx.TensorProto.FLOAT16 for n in empties)
    import onnxruntime as ort

    sess = ort.InferenceSession(src.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ones((2, 8), np.float16)
    assert [np.size(v) for v in sess.run(fetch["a"], {"x": x, "c": np.array(True)})] == [16, 0] or \
        [np.size(v) for v in sess.run(fetch["a"], {"x": x, "c": np.array(True)})] == [0, 16]


def test_a_weight_both_branches_read_says_why_it_takes_no_mean_correction():
    x = np.random.default_rng(1).standard_normal((30, 64)).astype(np.float32)
    calib = [{"x0": x, "cond": np.array(c), "trips": np.array(1, np.int64)} for c in (True, False)]
    res = compress(_decoder_like(), energy=1.0, quantize="int4", min_params=0, data_aware=True, calib=calib)
    sec = res.sections["int4"]
    flags = {l["weight"]: (l["mean_corrected"], l["mean_shared"]) for l in sec["layers"]}
    assert flags == {"W": (False, True), "Wc": (True, False), "Wl": (False, False)}  # (Wl: in a Loop body, no statistics)
    assert "no mean correction for 1 weight(s) several nodes read" in sec["statistics"]
