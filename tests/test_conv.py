"""Conv decomposition: exact splits for every attribute combination, skip reasons, MAC counts, CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank as ol
from onnx_lowrank import decompose
from onnx_lowrank.cli import main
from models import init, lowrank, make_model, ops, run, vi

RNG = np.random.default_rng(7)


def conv_weight(c_out: int, c_in: int, kernel: tuple[int, ...], r: int, mode: str, seed: int = 0) -> np.ndarray:
    """A Conv weight whose ``mode`` matrix view has rank exactly ``r``."""
    if mode == "channel":
        return lowrank(c_out, c_in * int(np.prod(kernel)), r, seed).reshape(c_out, c_in, *kernel)
    kh, kw = kernel
    m = lowrank(c_in * kh, c_out * kw, r, seed)  # M[(c, i), (o, j)] = W[o, c, i, j]
    return np.ascontiguousarray(m.reshape(c_in, kh, c_out, kw).transpose(2, 0, 1, 3))


#   x[1, C_in, *in_size] --Conv(W[C_out, C_in, *kernel], B?; attrs)--> y[1, C_out, *out]
def conv_model(w: np.ndarray, in_size: tuple[int, ...], *, bias: bool = True, dynamic: bool = False, **attrs) -> onnx.ModelProto:
    c_out, c_in = w.shape[:2]
    inputs, inits = ["x", "W"], [init("W", w)]
    if bias:
        inputs.append("B")
        inits.append(init("B", RNG.standard_normal(c_out).astype(np.float32)))
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    x_shape = ["N", c_in, *(["s%d" % i for i in range(len(in_size))] if dynamic else in_size)]
    return make_model([node], [vi("x", x_shape)], [vi("y", [None] * (w.ndim))], inits)


def _reference(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)


def check_same(model: onnx.ModelProto, result, in_size, atol: float = 1e-4) -> None:
    """Run original and result on a batch of 2 random inputs and compare."""
    onnx.checker.check_model(result.model, full_check=True)
    c_in = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1]
    x = RNG.standard_normal((2, c_in, *in_size)).astype(np.float32)
    # onnxruntime refuses dilation > 1 with SAME_* auto_pad ("Dilation not supported"), for the
    # original as much as for the split; ONNX's reference evaluator runs those.
    refused = any(a.name == "auto_pad" and a.s.startswith(b"SAME") for n in model.graph.node for a in n.attribute) and any(
        a.name == "dilations" and max(a.ints) > 1 for n in model.graph.node for a in n.attribute)
    engine = _reference if refused else run
    (before,), (after,) = engine(model, {"x": x}), engine(result.model, {"x": x})
    assert after.shape == before.shape
    np.testing.assert_allclose(after, before, atol=atol, rtol=1e-4)


def attrs_of(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ---- the math ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,shape", [("channel", (6, 4, 3, 3)), ("channel", (5, 3, 7)), ("channel", (4, 2, 2, 3, 3)),
                                        ("spatial", (6, 4, 3, 5)), ("spatial", (3, 7, 1, 4))])
def test_kernels_compose_back_to_the_weight(mode, shape):
    w = np.random.default_rng(3).standard_normal(shape)
    m = decompose.conv_matrix(w, mode)
    assert m.shape == decompose.conv_matrix_shape(w.shape, mode)
    assert np.isclose(np.linalg.norm(m), np.linalg.norm(w)), "a reshape keeps ||W||_F, so energies agree across modes"
    spec = decompose.spectrum(m)
    k1, k2 = decompose.conv_kernels(*decompose.factors(spec, spec.full_rank), w.shape, mode)
    if mode == "channel":
        back = np.einsum("ok,kc...->oc...", k2.reshape(k2.shape[0], -1), k1)
    else:
        back = np.einsum("okj,kci->ocij", k2[:, :, 0, :], k1[..., 0])
    np.testing.assert_allclose(back, w, atol=1e-10)


@pytest.mark.parametrize("mode,shape", [("channel", (6, 4, 3, 3)), ("channel", (5, 3, 7)), ("spatial", (6, 4, 3, 5))])
def test_conv_weight_inverts_the_matrix_view(mode, shape):
    from onnx_lowrank import linalg

    w = np.random.default_rng(4).standard_normal(shape)
    np.testing.assert_array_equal(linalg.conv_weight(linalg.conv_matrix(w, mode), w.shape, mode), w)
    with pytest.raises(ValueError, match="view of"):
        linalg.conv_weight(np.ones((2, 2)), w.shape, mode)


def test_spatial_view_of_a_1d_kernel_is_refused():
    with pytest.raises(ValueError, match="spatial-wise needs a 2-D kernel"):
        decompose.conv_matrix(np.ones((4, 2, 3)), "spatial")
    with pytest.raises(ValueError, match="expected one of channel, spatial"):
        decompose.conv_matrix_shape((4, 2, 3, 3), "diagonal")


# ---- exact splits ---------------------------------------------------------------------------

PADDINGS_2D = [("NOTSET", None), ("NOTSET", (1, 2, 0, 1)), ("SAME_UPPER", None), ("SAME_LOWER", None), ("VALID", None)]
CASES_2D = list(itertools.product(["channel", "spatial"], [(1, 1), (2, 2), (2, 3)], [(1, 1), (2, 1)], PADDINGS_2D, [True, False]))


@pytest.mark.parametrize("mode,strides,dilations,padding,bias", CASES_2D)
def test_2d_exactly_low_rank_weight_is_split_exactly(mode, strides, dilations, padding, bias):
    auto_pad, pads = padding
    in_size = (11, 10)  # odd/even so SAME pads are asymmetric on one axis
    w = conv_weight(6, 5, (3, 2), 2, mode)  # kh != kw catches a swapped axis
    attrs = {"kernel_shape": [3, 2], "strides": list(strides), "dilations": list(dilations)}
    if auto_pad != "NOTSET":
        attrs["auto_pad"] = auto_pad
    if pads is not None:
        attrs["pads"] = list(pads)
    m = conv_model(w, in_size, bias=bias, **attrs)
    res = ol.compress(m, energy=1.0, min_params=0, conv_mode=mode)
    d = res.layers[0]
    assert d.factorized and d.rank == 2 and d.conv_mode == mode, d.reason
    check_same(m, res, in_size)
    assert ops(res.model) == ["Conv", "Conv"]
    first, second = res.model.graph.node
    assert (len(first.input), len(second.input)) == (2, 3 if bias else 2), "bias belongs on the second conv only"
    kernels = {t.name: tuple(t.dims) for t in res.model.graph.initializer if t.name != "B"}
    if mode == "channel":
        assert kernels == {"W__lowrank_K1": (2, 5, 3, 2), "W__lowrank_K2": (6, 2, 1, 1)}
        assert attrs_of(second)["kernel_shape"] == [1, 1]
    else:
        assert kernels == {"W__lowrank_K1": (2, 5, 3, 1), "W__lowrank_K2": (6, 2, 1, 2)}
        a1, a2 = attrs_of(first), attrs_of(second)
        assert a1["strides"] == [strides[0], 1] and a2["strides"] == [1, strides[1]]
        assert a1["dilations"] == [dilations[0], 1] and a2["dilations"] == [1, dilations[1]]
        if pads is not None:
            assert a1["pads"] == [pads[0], 0, pads[2], 0] and a2["pads"] == [0, pads[1], 0, pads[3]]


PADDINGS_1D = [("NOTSET", None), ("NOTSET", (2, 1)), ("SAME_UPPER", None), ("SAME_LOWER", None), ("VALID", None)]


@pytest.mark.parametrize("stride,dilation,padding,bias", list(itertools.product([1, 2], [1, 3], PADDINGS_1D, [True, False])))
def test_1d_conv_channel_wise_is_exact(stride, dilation, padding, bias):
    auto_pad, pads = padding
    w = conv_weight(12, 6, (5,), 3, "channel")
    attrs = {"strides": [stride], "dilations": [dilation]}
    if auto_pad != "NOTSET":
        attrs["auto_pad"] = auto_pad
    if pads is not None:
        attrs["pads"] = list(pads)
    m = conv_model(w, (23,), bias=bias, **attrs)
    res = ol.compress(m, energy=1.0, min_params=0)  # auto: a 1-D kernel has only the channel view
    d = res.layers[0]
    assert d.factorized and d.rank == 3 and d.conv_mode == "channel", d.reason
    check_same(m, res, (23,))
    assert [tuple(t.dims) for t in res.model.graph.initializer if t.name != "B"] == [(3, 6, 5), (12, 3, 1)]


def test_3d_conv_channel_wise_is_exact():
    w = conv_weight(8, 3, (2, 3, 3), 2, "channel")
    m = conv_model(w, (5, 6, 7), strides=[1, 2, 1], pads=[0, 1, 1, 1, 0, 1])
    res = ol.compress(m, energy=1.0, min_params=0)
    assert res.layers[0].factorized and res.layers[0].conv_mode == "channel"
    check_same(m, res, (5, 6, 7))


def test_shared_weight_two_convs_with_different_attributes_share_kernels():
    #   x --Conv(W, stride 1)--> h --Relu--> r --Conv(W, stride 2, pads 1)--> y
    w = conv_weight(6, 6, (3, 3), 2, "spatial")
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="c1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "W"], ["y"], name="c2", strides=[2, 2], pads=[1, 1, 1, 1])]
    m = make_model(nodes, [vi("x", ["N", 6, 12, 12])], [vi("y", [None] * 4)], [init("W", w)])
    res = ol.compress(m, energy=1.0, min_params=0, conv_mode="spatial")
    check_same(m, res, (12, 12))
    assert [d.factorized for d in res.layers] == [True, True] and res.layers[1].shared_with == "c1"
    assert sorted(t.name for t in res.model.graph.initializer) == ["W__lowrank_K1", "W__lowrank_K2"]
    assert ops(res.model) == ["Conv", "Conv", "Relu", "Conv", "Conv"]


def test_constant_node_weight_and_float16():
    w = conv_weight(8, 4, (3, 3), 2, "channel").astype(np.float16)
    const = helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(w, "Wc"))
    node = helper.make_node("Conv", ["x", "Wc"], ["y"], name="conv", pads=[1, 1, 1, 1])
    m = make_model([const, node], [vi("x", [1, 4, 8, 8], TensorProto.FLOAT16)], [vi("y", [None] * 4, TensorProto.FLOAT16)])
    res = ol.compress(m, energy=0.999, min_params=0, conv_mode="channel")
    assert res.layers[0].factorized and res.layers[0].rank == 2
    assert ops(res.model) == ["Constant", "Constant", "Conv", "Conv"]
    x = RNG.standard_normal((1, 4, 8, 8)).astype(np.float16)
    np.testing.assert_allclose(run(res.model, {"x": x})[0], run(m, {"x": x})[0], atol=5e-2)


# ---- choosing the mode, MACs, break-even ----------------------------------------------------


def test_macs_match_hand_count_and_auto_picks_channel():
    # C_in 4, C_out 8, 3x3, input 10x12, stride 2, pads 1 -> output 5x6 (30 pixels)
    w = conv_weight(8, 4, (3, 3), 2, "channel")
    m = conv_model(w, (10, 12), strides=[2, 2], pads=[1, 1, 1, 1])
    dense = 8 * 4 * 9 * 30
    channel = 2 * 4 * 9 * 30 + 8 * 2 * 30
    assert decompose.conv_output_size((10, 12), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)) == (5, 6)
    res = ol.compress(m, rank=2, min_params=0)
    d = res.layers[0]
    assert (d.macs_before, d.macs_after, d.macs_per, d.conv_mode) == (dense, channel, "sample", "channel")
    assert (res.totals.macs_before, res.totals.macs_after) == (dense, channel)
    # spatial at rank 2: kh x 1 conv over all 12 input columns of 5 output rows, then 1 x kw
    spatial = 2 * 4 * 3 * 5 * 12 + 8 * 2 * 3 * 5 * 6
    d = ol.compress(m, rank=2, min_params=0, conv_mode="spatial").layers[0]
    assert (d.macs_after, d.conv_mode) == (spatial, "spatial")
    assert spatial > channel
    check_same(m, res, (10, 12))


def test_auto_picks_spatial_when_the_weight_is_spatially_low_rank():
    # 5x5, 8 -> 8, 'same' padding on 16x16: spatial rank 2 beats the full channel rank 8
    w = conv_weight(8, 8, (5, 5), 2, "spatial")
    m = conv_model(w, (16, 16), pads=[2, 2, 2, 2])
    res = ol.compress(m, energy=1.0, min_params=0, conv_mode="auto")
    d = res.layers[0]
    assert d.factorized and d.conv_mode == "spatial" and d.rank == 2
    assert d.macs_after == 2 * 8 * 5 * 256 + 8 * 2 * 5 * 256 and d.macs_before == 8 * 8 * 25 * 256
    check_same(m, res, (16, 16))


def test_macs_of_a_conv_whose_input_shape_comes_from_inference():
    #   x[1,3,20,20] --Conv(3x3, 3->8)--> h --Relu--> r --Conv(W2 3x3, 8->16, stride 2)--> y
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], name="c1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "W2"], ["y"], name="c2", strides=[2, 2])]
    w2 = conv_weight(16, 8, (3, 3), 2, "channel")
    m = make_model(nodes, [vi("x", [1, 3, 20, 20])], [vi("y", [None] * 4)], [init("W1", RNG.standard_normal((8, 3, 3, 3)).astype(np.float32)), init("W2", w2)])
    res = ol.compress(m, energy=1.0, min_params=0, conv_mode="channel")
    c1, c2 = res.layers
    assert c1.macs_before == 8 * 3 * 9 * 18 * 18  # full rank 8 <= 27: left alone, still counted
    assert not c1.factorized and "saves nothing" in c1.reason
    assert c2.macs_before == 16 * 8 * 9 * 8 * 8 and c2.macs_after == 2 * (8 * 9 + 16) * 64
    assert res.totals.macs_before == c1.macs_before + c2.macs_before


def test_dynamic_spatial_size_counts_per_output_pixel_and_says_so():
    w = conv_weight(8, 4, (3, 3), 2, "channel")
    m = conv_model(w, (10, 12), dynamic=True, pads=[1, 1, 1, 1])
    res = ol.compress(m, energy=1.0, min_params=0, conv_mode="channel")
    d = res.layers[0]
    assert d.factorized and d.macs_per == "output pixel"
    assert (d.macs_before, d.macs_after) == (8 * 4 * 9, 2 * (4 * 9 + 8))
    assert res.totals.macs_per == "mixed" and "per output pixel" in res.totals.macs_note
    check_same(m, res, (7, 9))


def test_break_even_uses_macs_of_the_larger_spatial_intermediate():
    # horizontal stride 3: the kh x 1 conv computes all 12 input columns for 4 output columns
    w = conv_weight(8, 8, (3, 3), 8, "spatial")  # spatial rank 8 of 24: saves parameters ...
    m = conv_model(w, (12, 12), strides=[1, 3])
    d = ol.compress(m, energy=1.0, min_params=0, conv_mode="spatial").layers[0]
    assert 8 * (8 * 3 + 8 * 3) < w.size  # ... 384 < 576 parameters, yet
    h_out, w_out = 10, 4
    assert not d.factorized and "saves nothing" in d.reason and "MACs" in d.reason
    per_rank = 8 * 3 * h_out * 12 + 8 * 3 * h_out * w_out
    assert d.break_even == (8 * 8 * 9 * h_out * w_out - 1) // per_rank == 5  # the parameter break-even is 11


def test_rank_multiple_stays_below_mac_break_even():
    w = conv_weight(16, 16, (3, 3), 3, "channel")
    m = conv_model(w, (8, 8), pads=[1, 1, 1, 1])
    d = ol.compress(m, energy=1.0, min_params=0, conv_mode="channel", rank_multiple=4).layers[0]
    assert d.factorized and d.rank == 4 and d.rank <= d.break_even


# ---- skip reasons ---------------------------------------------------------------------------


def _skip_reason(model: onnx.ModelProto, node: str = "conv", **kw) -> str:
    kw.setdefault("min_params", 0)
    kw.setdefault("energy", 1.0)
    res = ol.compress(model, **kw)
    assert res.totals.factorized == 0
    assert res.model.graph.SerializeToString() == model.graph.SerializeToString(), "skipped model must be unchanged"
    return next(d for d in res.layers if d.node == node).reason


def test_skip_grouped_and_depthwise():
    w = conv_weight(8, 4, (3, 3), 1, "channel")  # group 2: C_in 8 -> C_out 8, 4 channels per group
    m = conv_model(w, (6, 6), group=2)
    m.graph.input[0].CopyFrom(vi("x", [1, 8, 6, 6]))
    assert "grouped Conv (group=2)" in _skip_reason(m)
    dw = RNG.standard_normal((8, 1, 3, 3)).astype(np.float32)
    m = conv_model(dw, (6, 6), group=8)
    m.graph.input[0].CopyFrom(vi("x", [1, 8, 6, 6]))
    assert "depthwise Conv (group=8)" in _skip_reason(m)
    res = ol.compress(m, energy=1.0, min_params=0)
    assert res.layers[0].macs_before == 8 * 9 * 16  # still counted in the totals


def test_skip_conv_transpose():
    node = helper.make_node("ConvTranspose", ["x", "W"], ["y"], name="conv")
    m = make_model([node], [vi("x", [1, 4, 5, 5])], [vi("y", [None] * 4)], [init("W", conv_weight(4, 8, (3, 3), 1, "channel"))])
    reason = _skip_reason(m)
    assert "ConvTranspose is left alone" in reason
    assert ol.compress(m).layers[0].shape == (4, 8, 3, 3)


@pytest.mark.parametrize("attrs,needle", [
    ({"kernel_shape": [5, 5]}, "kernel_shape [5, 5] disagrees with the weight's kernel [3, 3]"),
    ({"auto_pad": "SAME_MIDDLE"}, "unknown auto_pad 'SAME_MIDDLE'"),
    ({"strides": [1, 1, 1]}, "strides [1, 1, 1] does not fit a 2-D kernel"),
    ({"strides": [0, 1]}, "strides [0, 1] does not fit"),
    ({"pads": [1, 1]}, "pads [1, 1] does not fit"),
    ({"dilations": [1, -1]}, "dilations [1, -1] does not fit"),
    ({"auto_pad": "SAME_UPPER", "pads": [1, 1, 1, 1]}, "both auto_pad=SAME_UPPER and explicit pads"),
    ({"group": 0}, "group=0"),
])
def test_skip_malformed_attributes(attrs, needle):
    m = conv_model(conv_weight(8, 4, (3, 3), 1, "channel"), (6, 6), **attrs)
    reason = _skip_reason(m)
    assert reason.startswith("malformed Conv") and needle in reason


def test_skip_weight_not_4d():
    m = conv_model(lowrank(8, 4, 1), (6,))
    assert "Conv weight is 2-D" in _skip_reason(m)


def test_skip_saves_nothing():
    m = conv_model(RNG.standard_normal((8, 4, 1, 1)).astype(np.float32), (6, 6))
    assert "saves nothing" in _skip_reason(m)


def test_skip_spatial_requested_for_1d_conv():
    m = conv_model(conv_weight(12, 6, (5,), 1, "channel"), (20,))
    assert "spatial-wise decomposition needs a 2-D kernel" in _skip_reason(m, conv_mode="spatial")
    assert ol.compress(m, energy=1.0, min_params=0, conv_mode="auto").layers[0].factorized


def test_skip_kernel_computed_at_run_time_and_quantized_kernel():
    node = helper.make_node("Conv", ["x", "k"], ["y"], name="conv")
    m = make_model([node], [vi("x", [1, 2, 5, 5]), vi("k", [4, 2, 3, 3])], [vi("y", [None] * 4)])
    assert "kernel (input 1) is computed at run time" in _skip_reason(m)
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"]), helper.make_node("Conv", ["x", "W"], ["y"], name="conv")]
    m = make_model(nodes, [vi("x", [1, 2, 5, 5])], [vi("y", [None] * 4)],
                   [init("Wq", np.ones((4, 2, 3, 3), np.int8)), init("s", np.array(0.1, np.float32)), init("z", np.array(0, np.int8))])
    assert "quantized" in _skip_reason(m)


def test_skip_weight_shared_by_conv_and_matmul():
    #   x --Conv(W[4, 8, 8])--> h ; h --MatMul(W)--> y   (a 3-D W is both a 1-D kernel and a batch of matrices)
    w = RNG.standard_normal((4, 8, 8)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="conv"), helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")]
    m = make_model(nodes, [vi("x", [4, 8, 8])], [vi("y", [None] * 4)], [init("W", w)])
    assert "used by both Conv and MatMul nodes, which cannot share factors" in _skip_reason(m)


def test_skip_weight_also_used_by_conv_transpose():
    w = conv_weight(8, 8, (3, 3), 1, "channel")
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="conv"), helper.make_node("ConvTranspose", ["h", "W"], ["y"], name="up")]
    m = make_model(nodes, [vi("x", [1, 8, 6, 6])], [vi("y", [None] * 4)], [init("W", w)])
    assert "also used by ConvTranspose node 'up'" in _skip_reason(m)


def test_skip_selection_rules_apply_to_conv():
    m = conv_model(conv_weight(8, 4, (3, 3), 1, "channel"), (6, 6))
    assert "min_params" in _skip_reason(m, min_params=10_000)
    assert "excluded by exclude" in _skip_reason(m, exclude="^conv$")
    assert ol.compress(m, energy=1.0, min_params=0, op_types=("MatMul", "Gemm")).layers == []


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_rerun_on_split_conv_reports_factor_pair(mode):
    m = conv_model(conv_weight(16, 8, (3, 3), 2, mode), (8, 8), pads=[1, 1, 1, 1])
    once = ol.compress(m, energy=1.0, min_params=0, conv_mode=mode).model
    twice = ol.compress(once, energy=1.0, min_params=0)
    assert twice.totals.factorized == 0
    assert all("already low-rank" in d.reason for d in twice.layers)


def test_two_full_convs_in_a_row_are_two_layers_not_a_pair():
    # a torch export with BatchNorm folded: Conv 3x3 (8 -> 16) straight into Conv 3x3 (16 -> 16); neither is
    # the 1 x 1 (or 1 x kw) second half of a split, so both are factorized (they were 'already low-rank')
    w1, w2 = conv_weight(16, 8, (3, 3), 3, "channel", 1), conv_weight(16, 16, (3, 3), 3, "channel", 2)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["h", "W2"], ["y"], name="c2", pads=[1, 1, 1, 1])]
    m = make_model(nodes, [vi("x", [1, 8, 8, 8])], [vi("y", [1, 16, 8, 8])], [init("W1", w1), init("W2", w2)])
    res = ol.compress(m, energy=1.0, min_params=0, conv_mode="channel")
    assert res.totals.factorized == 2, [d.reason for d in res.layers]
    x = RNG.standard_normal((1, 8, 8, 8)).astype(np.float32)
    want = run(m, {"x": x})[0]
    assert np.abs(run(res.model, {"x": x})[0] - want).max() < 1e-4 * np.abs(want).max()


# ---- configuration, recipes, CLI ------------------------------------------------------------


def test_config_rejects_unknown_conv_mode():
    with pytest.raises(ol.UsageError, match="conv_mode got 'diagonal'"):
        ol.CompressConfig(conv_mode="diagonal")
    assert "Conv" in ol.CompressConfig().op_types


def test_recipe_key_conv_mode(tmp_path):
    recipe = tmp_path / "cnn.toml"
    recipe.write_text('energy = 1.0\nmin_params = 0\nconv_mode = "spatial"\nop_types = ["Conv"]\n')
    m = conv_model(conv_weight(8, 8, (3, 3), 2, "spatial"), (8, 8))
    res = ol.compress(m, recipe=str(recipe))
    assert res.layers[0].conv_mode == "spatial" and res.to_dict()["config"]["conv_mode"] == "spatial"


def test_cli_conv_mode_and_op_types(tmp_path, capsys):
    src, out, rep = tmp_path / "cnn.onnx", tmp_path / "small.onnx", tmp_path / "r.json"
    #   x --Conv(3x3)--> h --Flatten--> f --Gemm(W_fc)--> y
    w = conv_weight(16, 8, (3, 3), 2, "spatial")
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="conv", pads=[1, 1, 1, 1]), helper.make_node("Flatten", ["h"], ["f"]),
             helper.make_node("Gemm", ["f", "W_fc"], ["y"], name="fc")]
    m = make_model(nodes, [vi("x", [1, 8, 6, 6])], [vi("y", [1, 10])], [init("W", w), init("W_fc", lowrank(16 * 36, 10, 2))])
    onnx.save(m, str(src))
    argv = [str(src), "-o", str(out), "--energy", "1.0", "--min-params", "0", "--report", str(rep)]
    assert main(argv + ["--conv-mode", "spatial", "--op-types", "Conv"]) == 0
    text = capsys.readouterr().out
    assert "factorized (spatial-wise)" in text and "16x8x3x3" in text and "MACs:" in text
    doc = json.loads(rep.read_text())
    assert [l["op_type"] for l in doc["layers"]] == ["Conv"]
    assert doc["layers"][0]["conv_mode"] == "spatial" and doc["layers"][0]["macs_per"] == "sample"
    assert doc["config"]["conv_mode"] == "spatial" and doc["config"]["op_types"] == ["Conv"]
    assert doc["totals"]["macs_before"] == 16 * 8 * 9 * 36
    x = RNG.standard_normal((1, 8, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(run(onnx.load(str(out)), {"x": x})[0], run(m, {"x": x})[0], atol=1e-4)

    assert main(argv + ["--conv-mode", "channel"]) == 0  # default op types: Conv and Gemm
    doc = json.loads(rep.read_text())
    assert [(l["op_type"], l["factorized"]) for l in doc["layers"]] == [("Conv", True), ("Gemm", True)]
    assert doc["layers"][0]["conv_mode"] == "channel"
    capsys.readouterr()

    assert main(argv + ["--conv-mode", "diagonal"]) == 2
    assert "--conv-mode" in capsys.readouterr().err


def test_int8_counts_conv_factors_read_by_integer_convs_as_quantized():
    m = conv_model(conv_weight(16, 8, (3, 3), 2, "channel"), (8, 8), pads=[1, 1, 1, 1])
    res = ol.compress(m, energy=1.0, min_params=0, conv_mode="channel", quantize="int8")
    assert "ConvInteger" in ops(res.model)
    q = res.sections["quantize"]
    assert q["factors"] == 2 and q["factors_quantized"] == 2 and q["unquantized_factors"] == []  # (it said 0 of 2)


def test_a_macs_budget_counts_convs_the_rule_factorized_at_their_factorized_macs():
    # under --target-macs a Conv keeps the per-layer rule; its MACs used to stay counted dense, so a budget the
    # model meets was refused ('cannot be met ... 0.69 remains')
    w = conv_weight(32, 16, (3, 3), 2, "channel", 3)
    nodes = [helper.make_node("Conv", ["x", "K"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "W"], ["y"], name="fc")]
    m = make_model(nodes, [vi("x", [1, 16, 8, 8])], [vi("y", [1, 64])],
                   [init("K", w), init("W", RNG.standard_normal((32, 64)).astype(np.float32))])
    res = ol.compress(m, target_macs=0.3, min_params=0, conv_mode="channel")
    by = {d.node: d for d in res.layers}
    assert by["conv"].factorized and by["fc"].factorized and by["fc"].rank <= 17


def test_data_aware_says_how_many_convs_keep_the_plain_spectrum():
    w = conv_weight(32, 16, (3, 3), 2, "channel", 3)
    nodes = [helper.make_node("Conv", ["x", "K"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "W"], ["y"], name="fc")]
    m = make_model(nodes, [vi("x", ["N", 16, 8, 8])], [vi("y", ["N", 64])],
                   [init("K", w), init("W", RNG.standard_normal((32, 64)).astype(np.float32))])
    calib = {"x": RNG.standard_normal((40, 16, 8, 8)).astype(np.float32)}
    res = ol.compress(m, energy=0.9, min_params=0, data_aware=True, calib=calib)
    assert res.sections["data_aware"]["weights_whitened"] == 1 and res.sections["data_aware"]["convs_plain_svd"] == 1
    assert not next(d for d in res.layers if d.node == "conv").whitened


def test_a_fixed_rank_under_auto_takes_the_view_that_keeps_more_energy():
    # exactly rank 2 channel-wise: at rank 2 the channel split is exact; the spatial one, with fewer MACs, lost most
    m = conv_model(conv_weight(32, 32, (3, 3), 2, "channel", 5), (8, 8), pads=[1, 1, 1, 1])
    res = ol.compress(m, rank=2, min_params=0)  # conv_mode auto
    (row,) = res.layers
    assert row.conv_mode == "channel" and row.energy > 0.9999
    check_same(m, res, (8, 8))
