"""Width reduction of feed-forward blocks: the math, the block finder, and the pass end to end."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnx_lowrank as ol
from models import init, make_model, ops, run, vi
from onnx_lowrank import linalg
from onnx_lowrank.errors import UsageError
from onnx_lowrank.passes.discover import discover
from onnx_lowrank.passes.ffn import find_blocks

D, F, E = 24, 96, 20


def _hidden(n=3000, seed=0):
    """Correlated hidden activations: a ReLU of a few directions (so dropped neurons are predictable)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D))
    w1 = rng.standard_normal((D, F)) / np.sqrt(D)
    return np.maximum(x @ w1 + 0.1, 0.0), rng.standard_normal((F, E))


def test_the_refit_is_the_least_squares_fit_and_its_error_is_the_residual():
    h, w2 = _hidden()
    c, s, n = h.T @ h, h.sum(0), len(h)
    for sums in (s, None):
        fit = linalg.refit_width(c, w2, 40, sums=sums, count=n, damping=1e-12, selection="energy")
        z = h[:, fit.keep] if sums is None else np.hstack([h[:, fit.keep], np.ones((n, 1))])
        want = np.linalg.lstsq(z, h @ w2, rcond=None)[0]
        got = fit.w2 if sums is None else np.vstack([fit.w2, fit.shift[None]])
        assert np.allclose(got, want, atol=1e-6 * np.abs(want).max())
        y, approx = h @ w2, z @ got
        assert fit.error == pytest.approx(np.sum((y - approx) ** 2) / np.sum(y ** 2), rel=1e-6, abs=1e-12)
    # the neurons kept are those of most output energy, in order; dropping them with no refit is worse
    scores = np.sum(h ** 2, 0) * np.sum(w2 ** 2, 1)
    assert list(fit.keep) == sorted(np.argsort(-scores)[:40])
    drop = np.sum((h @ w2 - h[:, fit.keep] @ w2[fit.keep]) ** 2) / np.sum((h @ w2) ** 2)
    assert fit.error < 0.5 * drop
    errors = linalg.width_errors(c, w2, [10, 40, 80, F], sums=s, count=n, damping=1e-12)
    assert np.all(np.diff(errors) < 0) and errors[-1] < 1e-9


def _greedy_by_refits(c, w2, s, n):
    """The elimination order spelled out: at each step refit without each remaining neuron in turn."""
    alive, order, total = list(range(len(c))), [], float(np.sum(w2 * (c @ w2)))
    while len(alive) > 1:
        errs = [linalg.width._fit(c, w2, s, n, np.array([a for a in alive if a != j]), 1e-12, total).error for j in alive]
        order.append(alive.pop(int(np.argmin(errs))))
    return order + alive


def test_refit_selection_drops_first_the_neuron_the_others_recover_best():
    h, w2 = _hidden(n=2000, seed=3)
    h, w2 = h[:, :12], w2[:12]
    c, s, n = h.T @ h, h.sum(0), len(h)
    for sums in (s, None):
        order = linalg.removal_order(c, w2, sums=sums, count=n, damping=1e-12)
        assert list(order) == _greedy_by_refits(c, w2, sums, n)


def test_each_step_of_the_elimination_drops_the_neurons_an_exact_refit_finds_cheapest():
    # 300 neurons: two at a time from 256 up, the inverse carried as a downdate between refreshes;
    # steps are replayed against the inverse of the neurons then left, computed from scratch: the
    # first ones (two at a time), those around the refresh at 150 left, and the last ones
    rng = np.random.default_rng(7)
    f, rows = 300, 1500
    h = rng.standard_normal((rows, f)) * np.exp(-np.arange(f) / 100.0)
    h[:, 11] = 2.0 * h[:, 4] + 0.01 * rng.standard_normal(rows)
    w2 = rng.standard_normal((f, 16))
    c, s = h.T @ h, h.sum(0)
    order = linalg.removal_order(c, w2, sums=s, count=rows, damping=1e-3, until=40)
    g = c - np.outer(s, s) / rows
    lam = 1e-3 * np.mean(np.diag(c))
    alive, at, steps = list(range(f)), 0, 0
    while len(alive) > 40:
        m = min(max(1, len(alive) // 128), len(alive) - 40)
        if steps < 6 or 140 <= len(alive) <= 160 or len(alive) <= 45:
            inv = np.linalg.inv(g[np.ix_(alive, alive)] + lam * np.eye(len(alive)))
            cur = inv @ (g[alive] @ w2)
            cost = np.sum(cur ** 2, axis=1) / np.diag(inv)
            assert set(order[at:at + m]) == {alive[i] for i in np.argsort(cost)[:m]}, f"step {steps}"
        gone = set(order[at:at + m])
        alive = [a for a in alive if a not in gone]
        at, steps = at + m, steps + 1
    assert sorted(order[at:]) == list(order[at:]) == alive  # the rest closes the order by index
    assert sorted(order) == list(range(f))


def test_refit_selection_drops_a_duplicated_neuron_that_energy_keeps():
    h, w2 = _hidden()
    h = np.hstack([h, 3.0 * h[:, [0]]])  # neuron F repeats neuron 0: either one predicts the other exactly
    w2 = np.vstack([w2, 10.0 * w2[[0]]])
    c, n = h.T @ h, len(h)
    energy = linalg.neuron_priority(c, w2, selection="energy")
    refit = linalg.neuron_priority(c, w2, damping=1e-9)
    assert energy[0] > np.median(energy) and energy[F] == energy.max()  # large: energy keeps both
    order = linalg.removal_order(c, w2, damping=1e-9)
    assert {order[0]} <= {0, F}  # free to drop: the other takes its share in the refit
    assert refit[order[0]] == 0
    fit = linalg.refit_width(c, w2, F, damping=1e-9)  # one neuron fewer
    assert fit.error < 1e-6 and not {0, F} <= set(fit.keep)


def test_refit_selection_loses_less_than_energy_and_its_sets_are_nested():
    rng = np.random.default_rng(5)
    f = 300  # wide enough that several neurons leave at each step
    x = rng.standard_normal((4000, 16))
    h = np.maximum(x @ rng.standard_normal((16, f)) + 0.3 * rng.standard_normal((4000, f)), 0.0)
    w2 = rng.standard_normal((f, 10)) * rng.gamma(0.5, 1.0, (f, 1))
    c, s, n = h.T @ h, h.sum(0), len(h)
    order = linalg.removal_order(c, w2, sums=s, count=n, damping=1e-3)
    assert sorted(order) == list(range(f))
    ks = [10, 30, 75, 150, 250]
    refit = linalg.width_errors(c, w2, ks, sums=s, count=n, damping=1e-3)
    energy = linalg.width_errors(c, w2, ks, sums=s, count=n, damping=1e-3, selection="energy")
    # greedy, so not best at every width, but clearly better where most neurons go
    assert np.all(refit[:3] < 0.95 * energy[:3]) and np.all(refit < 1.1 * energy)
    kept = [set(linalg.refit_width(c, w2, k, sums=s, count=n, damping=1e-3).keep) for k in ks]
    assert all(a < b for a, b in zip(kept, kept[1:]))
    full = linalg.neuron_priority(c, w2, sums=s, count=n, damping=1e-3)
    for k in ks:  # stopping the elimination at k neurons (refit_width does) keeps the same k
        part = linalg.removal_order(c, w2, sums=s, count=n, damping=1e-3, until=k)
        assert sorted(part) == list(range(f)) and set(part[-k:]) == set(linalg.keep_neurons(full, k))
    with pytest.raises(ValueError, match="unknown neuron selection 'best'"):
        linalg.neuron_priority(c, w2, selection="best")


def test_refit_rejects_what_cannot_be_fitted():
    h, w2 = _hidden()
    with pytest.raises(ValueError, match="cannot keep 0 of 96"):
        linalg.refit_width(h.T @ h, w2, 0)
    with pytest.raises(ValueError, match="does not match 96 neurons"):
        linalg.refit_width(np.eye(5), w2, 3)
    bad = h.T @ h
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        linalg.refit_width(bad, w2, 3)


def _gelu(x, out, nodes, inits, tag):
    """The Erf form exporters write: 0.5 x (1 + erf(x / sqrt 2))."""
    inits += [init(f"{tag}s2", np.array(1.4142135, np.float32)), init(f"{tag}one", np.array(1.0, np.float32)),
              init(f"{tag}half", np.array(0.5, np.float32))]
    nodes += [helper.make_node("Div", [x, f"{tag}s2"], [f"{tag}d"]), helper.make_node("Erf", [f"{tag}d"], [f"{tag}e"]),
              helper.make_node("Add", [f"{tag}e", f"{tag}one"], [f"{tag}a"]), helper.make_node("Mul", [x, f"{tag}a"], [f"{tag}m"]),
              helper.make_node("Mul", [f"{tag}m", f"{tag}half"], [out])]


def ffn_model(act="gelu", gemm=False, bias2=True, extra_output=False, vector_scale=False, seed=0):
    """x [B, S, D] -> two stacked feed-forward blocks (with a residual between them)."""
    rng = np.random.default_rng(seed)
    nodes, inits, outputs = [], [], [vi("y", ["B", D] if gemm else ["B", "S", D])]
    x = "x"
    for b in range(2):
        w1 = (rng.standard_normal((D, F)) / np.sqrt(D)).astype(np.float32)
        w2 = (rng.standard_normal((F, D)) / np.sqrt(F)).astype(np.float32)
        b1 = (0.1 * rng.standard_normal(F)).astype(np.float32)
        b2 = (0.1 * rng.standard_normal(D)).astype(np.float32)
        if gemm:  # Gemm with transB: weights stored (out, in)
            inits += [init(f"W1_{b}", w1.T.copy()), init(f"b1_{b}", b1), init(f"W2_{b}", w2.T.copy()), init(f"b2_{b}", b2)]
            nodes.append(helper.make_node("Gemm", [x, f"W1_{b}", f"b1_{b}"], [f"u{b}"], transB=1))
        else:
            inits += [init(f"W1_{b}", w1), init(f"b1_{b}", b1), init(f"W2_{b}", w2), init(f"b2_{b}", b2)]
            nodes += [helper.make_node("MatMul", [x, f"W1_{b}"], [f"p{b}"]), helper.make_node("Add", [f"p{b}", f"b1_{b}"], [f"u{b}"])]
        if act == "gelu":
            _gelu(f"u{b}", f"h{b}", nodes, inits, f"g{b}")
        elif act == "silu":
            nodes += [helper.make_node("Sigmoid", [f"u{b}"], [f"sg{b}"]), helper.make_node("Mul", [f"u{b}", f"sg{b}"], [f"h{b}"])]
        else:
            nodes.append(helper.make_node("Relu", [f"u{b}"], [f"h{b}"]))
        if vector_scale and b == 0:  # a per-neuron scale inside the activation: not elementwise-with-scalars
            inits.append(init("scale", np.full(F, 0.5, np.float32)))
            nodes.append(helper.make_node("Mul", [f"h{b}", "scale"], [f"hs{b}"]))
            hin = f"hs{b}"
        else:
            hin = f"h{b}"
        if gemm:
            nodes.append(helper.make_node("Gemm", [hin, f"W2_{b}"] + ([f"b2_{b}"] if bias2 else []), [f"o{b}"], transB=1))
        else:
            nodes.append(helper.make_node("MatMul", [hin, f"W2_{b}"], [f"q{b}"]))
            nodes.append(helper.make_node("Add", [f"q{b}", f"b2_{b}"], [f"o{b}"]) if bias2 else
                         helper.make_node("Identity", [f"q{b}"], [f"o{b}"]))
        nodes.append(helper.make_node("Add", [f"o{b}", x], ["y" if b == 1 else f"r{b}"]))
        x = f"r{b}"
        if extra_output and b == 0:
            outputs.append(vi(hin, ["B", "S", F]))
    return make_model(nodes, [vi("x", ["B", D] if gemm else ["B", "S", D])], outputs, inits)


def _feeds(n, gemm=False, seed=1):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, D) if gemm else (n, 4, D)).astype(np.float32)}


@pytest.mark.parametrize("act", ["gelu", "silu", "relu"])
@pytest.mark.parametrize("gemm", [False, True])
def test_blocks_are_found_in_every_form(act, gemm):
    m = ffn_model(act, gemm)
    found = find_blocks(m, discover(m, min_params=0))
    assert len(found.blocks) == 2 and found.skipped == []
    b = found.blocks[0]
    assert (b.hidden, b.up_t, b.down_t) == (F, gemm, gemm)
    assert b.up_bias is not None and b.up_bias.name == "b1_0" and b.down_bias is not None and b.down_bias.name == "b2_0"


def test_near_misses_say_why_and_other_products_are_not_blocks():
    m = ffn_model(extra_output=True)
    found = find_blocks(m, discover(m, min_params=0))
    assert len(found.blocks) == 1 and len(found.skipped) == 1
    assert "graph output" in found.skipped[0][1]
    m = ffn_model(vector_scale=True)
    found = find_blocks(m, discover(m, min_params=0))
    assert len(found.blocks) == 1 and "not a single value" in found.skipped[0][1]
    # a projection into a residual add and a norm is no block, and not listed as one
    nodes = [helper.make_node("MatMul", ["x", "W"], ["p"]), helper.make_node("Add", ["p", "x"], ["r"]),
             helper.make_node("LayerNormalization", ["r", "g"], ["n"]), helper.make_node("MatMul", ["n", "V"], ["y"])]
    m = make_model(nodes, [vi("x", [2, D])], [vi("y", [2, D])],
                   [init("W", np.ones((D, D), np.float32)), init("V", np.ones((D, D), np.float32)), init("g", np.ones(D, np.float32))])
    found = find_blocks(m, discover(m, min_params=0))
    assert found.blocks == [] and found.skipped == []


@pytest.mark.parametrize("gemm", [False, True])
def test_the_pass_narrows_blocks_without_new_nodes_and_the_refit_beats_dropping(gemm):
    m = ffn_model("gelu", gemm)
    calib, held = _feeds(400, gemm), _feeds(200, gemm, seed=7)
    res = ol.compress(m, ffn_keep=0.5, calib=calib, min_params=0, energy=1.0)
    assert ops(res.model) == ops(m)  # the same nodes: only the tensors are narrower
    weights = {t.name: tuple(t.dims) for t in res.model.graph.initializer}
    assert weights["W1_0"] == ((F // 2, D) if gemm else (D, F // 2)) and weights["b1_0"] == (F // 2,)
    assert weights["W2_0"] == ((D, F // 2) if gemm else (F // 2, D)) and weights["b2_0"] == (D,)
    assert res.totals.narrowed == 4 and res.totals.factorized == 0 and res.modified
    rows = {d.weight: d for d in res.layers}
    assert rows["W1_0"].width == (F // 2, F) and rows["W1_0"].params_after == D * F // 2 and rows["W1_0"].reason is None
    assert res.totals.params_after == res.totals.params_before // 2
    assert len(res.sections["width"]["blocks"]) == 2
    want, got = run(m, held)[0], run(res.model, held)[0]
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    # the same neurons dropped with no refit
    plain = onnx.ModelProto()
    plain.CopyFrom(m)
    by_name = {t.name: t for t in plain.graph.initializer}
    for b in range(2):
        w1 = onnx.numpy_helper.to_array(by_name[f"W1_{b}"])
        new_w1 = onnx.numpy_helper.to_array(next(t for t in res.model.graph.initializer if t.name == f"W1_{b}"))
        cols = [j for j in range(F) if any(np.array_equal(w1[j] if gemm else w1[:, j], new_w1[i] if gemm else new_w1[:, i])
                                            for i in range(F // 2))]
        assert len(cols) == F // 2
        mask = np.zeros(F, np.float32)
        mask[cols] = 1.0
        w2 = onnx.numpy_helper.to_array(by_name[f"W2_{b}"])
        by_name[f"W2_{b}"].CopyFrom(onnx.numpy_helper.from_array(w2 * (mask[None, :] if gemm else mask[:, None]), f"W2_{b}"))
    dropped = run(plain, held)[0]
    assert err < 0.7 * np.linalg.norm(dropped - want) / np.linalg.norm(want)


def test_narrowed_blocks_take_per_channel_int8_like_dense_ones():
    """Width reduction adds no node, so onnxruntime's int8 kernels take the narrowed projections
    as they take the original ones (the form that runs MiniLM x1.9 faster than fp32)."""
    m = ffn_model("gelu")
    calib, held = _feeds(400), _feeds(200, seed=7)
    res = ol.compress(m, ffn_keep=0.75, calib=calib, min_params=0, energy=1.0, quantize="int8-per-channel")
    assert res.totals.narrowed == 4 and res.totals.factorized == 0
    q = res.sections["quantize"]
    assert q["factors"] == 0 and "dense_left_float" not in q
    integer = [n for n in res.model.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    assert len(integer) == 4
    narrowed = {t.name: tuple(t.dims) for t in res.model.graph.initializer if t.name.endswith("_quantized")}
    assert narrowed["W1_0_quantized"] == (D, 3 * F // 4) and narrowed["W2_1_quantized"] == (3 * F // 4, D)
    float_only = ol.compress(m, ffn_keep=0.75, calib=calib, min_params=0, energy=1.0)
    want, got, ref = run(m, held)[0], run(res.model, held)[0], run(float_only.model, held)[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(want) < 0.05


def test_both_selections_end_to_end_and_the_report_says_which(tmp_path):
    m = ffn_model("gelu")
    calib, held = _feeds(400), _feeds(200, seed=7)
    want = run(m, held)[0]
    errs = {}
    for sel in ("refit", "energy"):
        res = ol.compress(m, ffn_keep=0.25, ffn_select=sel, calib=calib, min_params=0, energy=1.0)
        assert res.sections["width"]["selection"] == sel
        errs[sel] = sum(b["refit_error"] for b in res.sections["width"]["blocks"])
    assert errs["refit"] < errs["energy"]  # the layer-local error each block's refit leaves
    with pytest.raises(UsageError, match="--ffn-select chooses the neurons --ffn-keep keeps|ffn_select chooses"):
        ol.compress(m, ffn_select="energy", calib=calib, min_params=0)
    onnx.save(m, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", **calib)
    from onnx_lowrank.cli import main
    assert main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s.onnx"), "--ffn-keep", "0.25", "--ffn-select", "energy",
                 "--energy", "1", "--min-params", "0", "--calib", str(tmp_path / "c.npz")]) == 0
    got = run(onnx.load(str(tmp_path / "s.onnx")), held)[0]
    assert np.linalg.norm(got - want) < np.linalg.norm(want)


def test_width_needs_calibration_data_and_a_dry_run_changes_nothing():
    m = ffn_model()
    with pytest.raises(UsageError, match="--ffn-keep needs calibration data|ffn_keep needs calibration data"):
        ol.compress(m, ffn_keep=0.5, min_params=0)
    with pytest.raises(UsageError, match="calib_mask"):
        ol.compress(m, calib_mask="x", min_params=0)
    res = ol.compress(m, ffn_keep=0.5, calib=_feeds(64), min_params=0, energy=1.0, dry_run=True)
    assert res.totals.narrowed == 4 and res.model.graph == m.graph


def test_width_and_factorization_together_on_a_model_with_external_data(tmp_path):
    m = ffn_model("relu")
    # attention-like square projection before the blocks, for the factorization
    rng = np.random.default_rng(3)
    q = (rng.standard_normal((D, 6)) @ rng.standard_normal((6, D))).astype(np.float32)
    m.graph.initializer.append(init("Q", q))
    m.graph.node.insert(0, helper.make_node("MatMul", ["x", "Q"], ["xq"]))
    for node in m.graph.node[1:]:
        node.input[:] = ["xq" if i == "x" else i for i in node.input]
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    out = tmp_path / "o.onnx"
    res = ol.compress(path, ffn_keep=0.75, energy=0.99, calib=_feeds(200), min_params=0)
    res.save(out)
    rows = {d.weight: d for d in res.layers}
    assert rows["Q"].factorized and rows["Q"].rank == 6 and rows["W1_1"].width == (72, F)
    feeds = _feeds(50, seed=9)
    want, got = run(onnx.load(str(path)), feeds)[0], run(onnx.load(str(out)), feeds)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.2
    assert len(res.sections["width"]["blocks"]) == 2


def _with_projection(m):
    """A square low-rank projection in front of the blocks, for the factorization to compete."""
    rng = np.random.default_rng(3)
    q = (rng.standard_normal((D, 6)) @ rng.standard_normal((6, D)) + 0.05 * rng.standard_normal((D, D))).astype(np.float32)
    m.graph.initializer.append(init("Q", q))
    m.graph.node.insert(0, helper.make_node("MatMul", ["x", "Q"], ["xq"]))
    for node in m.graph.node[1:]:
        node.input[:] = ["xq" if i == "x" else i for i in node.input]
    return m


def test_refine_fits_the_layer_after_a_narrowed_block_on_what_the_block_now_gives():
    """A projection after the blocks, refitted with --refine: its inputs carry the narrowed
    blocks' error (they are in place in the compressed runs), and the check that keeps the refit
    measures the model as written."""
    m = ffn_model("gelu")
    rng = np.random.default_rng(4)
    p = (rng.standard_normal((D, 5)) @ rng.standard_normal((5, D)) + 0.05 * rng.standard_normal((D, D))).astype(np.float32)
    out = m.graph.output[0].name
    for node in m.graph.node:
        node.output[:] = ["pre" if o == out else o for o in node.output]
    m.graph.node.append(helper.make_node("MatMul", ["pre", "P"], [out], name="proj"))
    m.graph.initializer.append(init("P", p))
    calib, held = _feeds(600), _feeds(300, seed=8)
    opts = dict(ffn_keep=0.25, energy=0.97, calib=calib, min_params=0)
    base, refined = ol.compress(m, **opts), ol.compress(m, refine=True, **opts)
    assert {d.weight: d.rank for d in base.layers} == {d.weight: d.rank for d in refined.layers}
    assert {d.weight for d in base.layers if d.factorized} == {"P"} and base.totals.narrowed == 4
    sec = refined.sections["refine"]
    y_cal, y = run(m, calib)[0], run(m, held)[0]
    assert sec["rel_l2_truncated"] == pytest.approx(np.linalg.norm(run(base.model, calib)[0] - y_cal) / np.linalg.norm(y_cal), rel=1e-3)
    assert sec["kept"] is True and sec["rel_l2_refitted"] < sec["rel_l2_truncated"]
    err = {k: np.linalg.norm(run(r.model, held)[0] - y) / np.linalg.norm(y) for k, r in (("base", base), ("refined", refined))}
    assert err["refined"] < 0.95 * err["base"]  # (0.343 against 0.387; a refit blind to the widths: 0.387)


@pytest.mark.parametrize("target", [0.7, 0.4])
def test_a_budget_sizes_the_blocks_against_the_factorization(target):
    m = _with_projection(ffn_model("gelu"))
    res = ol.compress(m, ffn_keep="auto", data_aware=True, target_params=target, calib=_feeds(300), min_params=0)
    t = res.totals
    assert t.params_after <= target * t.params_before  # one budget over both forms
    widths = {d.weight: d.width for d in res.layers if d.width is not None}
    assert widths and all(k < F and f == F for k, f in widths.values())
    assert widths["W1_0"] == widths["W2_0"] and widths["W1_1"] == widths["W2_1"]  # a block's two weights narrow together
    section = res.sections["width"]
    assert section["ffn_keep"] == "auto" and {b["kept"] for b in section["blocks"]} == {k for k, _ in widths.values()}
    feeds = _feeds(50, seed=9)
    want, got = run(m, feeds)[0], run(res.model, feeds)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.5


def test_a_uniform_width_counts_against_the_budget_at_its_narrowed_size():
    m = _with_projection(ffn_model("relu"))
    res = ol.compress(m, ffn_keep=0.5, data_aware=True, target_params=0.5, calib=_feeds(300), min_params=0)
    # the blocks alone already reach about half: Q is left its whole budget share
    assert res.totals.params_after <= 0.5 * res.totals.params_before
    rows = {d.weight: d for d in res.layers}
    assert rows["W1_0"].width == (F // 2, F) and rows["Q"].params_after > 0
    with pytest.raises(UsageError, match="ffn_keep='auto' under a budget weighs each block's widths on whitened errors: add data_aware"):
        ol.compress(m, ffn_keep="auto", target_params=0.5, calib=_feeds(30), min_params=0)


def test_adaptive_mode_measures_widths_and_ranks_under_one_budget():
    m = _with_projection(ffn_model("gelu"))
    res = ol.compress(m, ffn_keep="auto", adaptive=True, target_params=0.6, calib=_feeds(300), min_params=0)
    t = res.totals
    assert t.params_after <= 0.6 * t.params_before
    widths = {d.weight: d.width for d in res.layers if d.width is not None}
    assert widths and widths["W1_0"] == widths["W2_0"] and all(k < F for k, _ in widths.values())
    numbers = res.sections["adaptive"]
    assert numbers["blocks_measured"] == 2 and res.sections["width"]["ffn_keep"] == "auto"
    assert {b["kept"] for b in res.sections["width"]["blocks"]} == {k for k, _ in widths.values()}
    # widths were measured by overriding W2 and b2 at their found shapes; the rewrite slices them:
    # the drop the search measured is the drop of the written model
    assert numbers["final_drop"] == pytest.approx(numbers["measured_drop"], rel=1e-4, abs=1e-7)


def test_adaptive_mode_bounds_the_drop_over_widths_and_ranks():
    m = _with_projection(ffn_model("relu"))
    res = ol.compress(m, ffn_keep="auto", adaptive=True, max_drop=0.02, metric="cosine", calib=_feeds(300), min_params=0)
    numbers = res.sections["adaptive"]
    assert numbers["final_drop"] <= 0.02 + 1e-6 and res.totals.narrowed > 0
    assert res.totals.params_after < 0.8 * res.totals.params_before


def test_adaptive_mode_counts_a_uniform_width_at_its_narrowed_size_and_measures_with_it():
    m = _with_projection(ffn_model("relu"))
    res = ol.compress(m, ffn_keep=0.5, adaptive=True, target_params=0.5, calib=_feeds(300), min_params=0)
    rows = {d.weight: d for d in res.layers}
    # the blocks alone reach about half; Q keeps the rest of the budget instead of paying for them
    assert rows["W1_0"].width == (F // 2, F) and rows["Q"].factorized and rows["Q"].rank >= 6
    assert res.totals.params_after <= 0.5 * res.totals.params_before
    numbers = res.sections["adaptive"]
    assert numbers["final_drop"] == pytest.approx(numbers["measured_drop"], rel=1e-4, abs=1e-7)


def _saved(tmp_path, model, feeds, name="c.npz"):
    p, c = tmp_path / "m.onnx", tmp_path / name
    onnx.save(model, str(p))
    np.savez(c, **feeds)
    return str(p), str(c)


def test_a_dry_run_shows_the_widths_it_would_keep(tmp_path, capsys):
    from onnx_lowrank.cli import main

    p, c = _saved(tmp_path, ffn_model("relu"), _feeds(300))
    assert main([p, "--ffn-keep", "0.5", "--calib", c, "--dry-run", "--min-params", "0"]) == 0
    out = capsys.readouterr().out
    assert f"2 feed-forward block(s) keep {F} of {2 * F} neurons" in out
    assert "dry run: 0 layer(s) would be factorized, 4 narrowed (feed-forward width); nothing written." in out
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.npz", "m.onnx"]


def test_the_command_line_warns_of_an_in_sample_check_and_of_too_few_rows_for_the_refit(tmp_path, capsys):
    from onnx_lowrank.cli import main

    p, c = _saved(tmp_path, ffn_model("relu"), _feeds(8))  # 8 x 4 = 32 rows for F hidden neurons
    assert main([p, "-o", str(tmp_path / "o.onnx"), "--ffn-keep", "0.5", "--calib", c, "--min-params", "0"]) == 0
    err = capsys.readouterr().err
    assert f"32 calibration row(s) for {F} hidden neurons" in err and "pass more --calib data" in err
    assert "the check ran on the calibration data the compression was fitted to" in err
    p, c = _saved(tmp_path, ffn_model("relu"), _feeds(300), "d.npz")
    assert main([p, "-o", str(tmp_path / "o2.onnx"), "--ffn-keep", "0.5", "--calib", c, "--min-params", "0"]) == 0
    assert "calibration row(s)" not in capsys.readouterr().err


def test_a_padding_mask_that_keeps_nothing_or_fits_nothing_is_refused():
    m = ffn_model("relu")
    feeds = _feeds(20)
    mask = np.zeros((20, 4), np.int64)
    with pytest.raises(ol.CalibrationError, match="zero everywhere, so every row would be left out"):
        ol.compress(_with_mask_input(m), ffn_keep=0.5, calib={**feeds, "mask": mask}, calib_mask="mask", min_params=0)
    with pytest.raises(ol.CalibrationError, match=r"its shape \[20, 3\] matches the leading dimensions of no layer input"):
        ol.compress(_with_mask_input(m, 3), ffn_keep=0.5, calib={**feeds, "mask": np.ones((20, 3), np.int64)}, calib_mask="mask",
                    min_params=0)
    res = ol.compress(_with_mask_input(m), ffn_keep=0.5, calib={**feeds, "mask": np.ones((20, 4), np.int64)}, calib_mask="mask",
                      min_params=0)
    assert res.totals.narrowed == 4


def _with_mask_input(m, seq=4):
    """The model with an extra int64 input ``mask`` [B, seq] that only an output reads (as a padding
    mask, it is only ever read by the statistics)."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    out.graph.input.append(onnx.helper.make_tensor_value_info("mask", onnx.TensorProto.INT64, ["B", seq]))
    out.graph.node.append(helper.make_node("Identity", ["mask"], ["mask_out"]))
    out.graph.output.append(onnx.helper.make_tensor_value_info("mask_out", onnx.TensorProto.INT64, ["B", seq]))
    return out


def test_non_finite_calibration_data_is_refused_before_any_statistics_or_sensitivity():
    m = ffn_model("relu")
    feeds = _feeds(20)
    feeds["x"][3, 1, 5] = np.nan
    with pytest.raises(ol.CalibrationError, match="holds NaN or Inf on the calibration data, so no statistics can be taken"):
        ol.compress(m, ffn_keep=0.5, calib=feeds, min_params=0, dry_run=True)
    with pytest.raises(ol.CalibrationError, match="holds NaN or Inf on the calibration data, so no sensitivity can be measured"):
        ol.compress(m, adaptive=True, target_params=0.5, calib=feeds, min_params=0, dry_run=True)


def test_the_model_parameter_total_counts_the_first_bias_entries_a_narrowing_drops():
    m = ffn_model("relu")
    res = ol.compress(m, ffn_keep=0.5, calib=_feeds(300), min_params=0)
    held = sum(int(np.prod(t.dims)) for t in res.model.graph.initializer)
    assert res.totals.model_params_after == held
    assert res.totals.model_params_before == sum(int(np.prod(t.dims)) for t in m.graph.initializer)


def _in_if_body() -> onnx.ModelProto:
    """One feed-forward block inside both branches of an If (weights in the main graph)."""
    rng = np.random.default_rng(3)
    w1, w2 = (rng.standard_normal((D, F)) / 5).astype(np.float32), (rng.standard_normal((F, D)) / 10).astype(np.float32)

    def branch(tag):
        return helper.make_graph([helper.make_node("MatMul", ["x", "W1"], [f"{tag}u"], name=f"{tag}1"),
                                  helper.make_node("Relu", [f"{tag}u"], [f"{tag}h"]),
                                  helper.make_node("MatMul", [f"{tag}h", "W2"], [f"{tag}y"], name=f"{tag}2")],
                                 tag, [], [vi(f"{tag}y", ["B", D])])

    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], name="iff", then_branch=branch("t"), else_branch=branch("e"))]
    return make_model(nodes, [vi("x", ["B", D])], [vi("y", ["B", D])],
                      [init("W1", w1), init("W2", w2), init("zero", np.array(0.0, np.float32))])


def test_a_block_in_both_branches_of_an_if_is_narrowed_once_in_both():
    # a merged decoder's feed-forward block: each branch reads the main graph's W1 and W2
    rng = np.random.default_rng(0)
    m = _in_if_body()
    calib = {"x": rng.standard_normal((300, D)).astype(np.float32)}
    res = ol.compress(m, ffn_keep=0.5, calib=calib, min_params=0)
    section = res.sections["width"]
    assert [(b["node"], b["twins"], b["kept"]) for b in section["blocks"]] == [
        ("iff/else_branch/e1", ["iff/then_branch/t1"], F // 2)] and not section["not_reduced"]
    assert res.totals.narrowed == 4  # (two projections in each branch)
    onnx.checker.check_model(res.model, full_check=True)
    new = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in res.model.graph.initializer}
    x = rng.standard_normal((40, D)).astype(np.float32)
    for sign in (1, -1):  # the If takes the then branch where the sum of x is positive
        xs = np.abs(x) * sign
        want = np.maximum(xs.astype(np.float64) @ new["W1"], 0) @ new["W2"]
        assert np.allclose(run(res.model, {"x": xs})[0], want, atol=1e-4)
    # the refit saw both branches' rows: calibration data taking one branch only gives a different W2
    one = ol.compress(m, ffn_keep=0.5, calib={"x": np.abs(calib["x"])}, min_params=0)
    assert not np.allclose(onnx.numpy_helper.to_array(next(t for t in one.model.graph.initializer if t.name == "W2")), new["W2"])


def test_a_block_in_a_loop_body_says_why():
    rng = np.random.default_rng(3)
    body = helper.make_graph([helper.make_node("Identity", ["c_in"], ["c_out"]),
                              helper.make_node("MatMul", ["h", "W1"], ["u"], name="l1"), helper.make_node("Relu", ["u"], ["a"]),
                              helper.make_node("MatMul", ["a", "W2"], ["h_out"], name="l2")],
                             "body", [vi("i", [], onnx.TensorProto.INT64), vi("c_in", [], onnx.TensorProto.BOOL), vi("h", ["B", D])],
                             [vi("c_out", [], onnx.TensorProto.BOOL), vi("h_out", ["B", D])])
    m = make_model([helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body)],
                   [vi("x", ["B", D]), vi("trips", [], onnx.TensorProto.INT64)], [vi("y", ["B", D])],
                   [init("W1", (rng.standard_normal((D, F)) / 5).astype(np.float32)),
                    init("W2", (rng.standard_normal((F, D)) / 10).astype(np.float32))])
    found = find_blocks(m, discover(m, min_params=0))
    assert found.blocks == [] and [why for _, why in found.skipped] == [
        "inside a Loop/Scan body: width reduction looks for blocks in the main graph and in If branches"]
    from onnx_lowrank.report import render_sections

    res = ol.compress(m, ffn_keep=0.5, calib={"x": rng.standard_normal((64, D)).astype(np.float32),
                                              "trips": np.array(1, np.int64)}, min_params=0)
    assert "no feed-forward block narrowed (ffn_keep 0.5" in render_sections(res.sections)
    two = ol.compress(ffn_model("relu"), ffn_keep=0.5, calib=_feeds(300), min_params=0).sections["width"]
    assert len(two["blocks"]) == 2 and not two["not_reduced"]  # the second projection of one block is no unmatched block


def _gated_model():
    """x -> gate (SiLU) * up -> down, LLaMA's feed-forward, no biases; then a residual add and an
    RMS-style norm into two projections."""
    rng = np.random.default_rng(3)
    w = {n: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
         for n, s in (("Wg", (D, F)), ("Wu", (D, F)), ("Wd", (F, D)), ("Wq", (D, D)), ("Wk", (D, D)))}
    nodes = [helper.make_node("MatMul", ["x", "Wg"], ["g"], name="gate"), helper.make_node("MatMul", ["x", "Wu"], ["u"], name="up"),
             helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["act"]),
             helper.make_node("Mul", ["act", "u"], ["h"]), helper.make_node("MatMul", ["h", "Wd"], ["d"], name="down"),
             helper.make_node("Add", ["d", "x"], ["r"]), helper.make_node("Mul", ["r", "r"], ["r2"]),
             helper.make_node("ReduceMean", ["r2"], ["ms"], axes=[-1]), helper.make_node("Sqrt", ["ms"], ["rms"]),
             helper.make_node("Div", ["r", "rms"], ["n"]),
             helper.make_node("MatMul", ["n", "Wq"], ["q"], name="q"), helper.make_node("MatMul", ["n", "Wk"], ["k"], name="k"),
             helper.make_node("Add", ["q", "k"], ["y"])]
    return make_model(nodes, [vi("x", ["B", D])], [vi("y", ["B", D])], [init(n, a) for n, a in w.items()], opset=13)


def test_a_gated_block_is_found_and_a_residual_path_is_no_near_miss():
    m = _gated_model()
    found = find_blocks(m, discover(m, min_params=0))
    assert found.skipped == []  # (the residual add and norm into q and k: no line)
    [b] = found.blocks
    assert (b.name, b.gate.layers[0].display_name, b.down.layers[0].display_name) == ("gate", "up", "down")
    assert b.dense_params == 3 * D * F and len(b.keys) == 3


def _gated_by_hand(m, keep, w2, feeds):
    """The gated block of :func:`_gated_model` narrowed to ``keep`` with ``w2`` as its rows, in numpy."""
    w = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    x = feeds["x"].astype(np.float64)
    g, u = x @ w["Wg"][:, keep], x @ w["Wu"][:, keep]
    r = (g / (1 + np.exp(-g)) * u) @ w2 + x
    n = r / np.sqrt(np.mean(r * r, axis=-1, keepdims=True))
    return n @ w["Wq"] + n @ w["Wk"]


def test_a_gated_block_narrows_its_gate_and_up_projections_column_for_column():
    m, rng = _gated_model(), np.random.default_rng(0)
    mix = rng.standard_normal((4, D))  # inputs on a few directions: the hidden neurons are correlated, a refit recovers them
    feeds, held = ({"x": (rng.standard_normal((n, 4)) @ mix).astype(np.float32)} for n in (400, 50))
    res = ol.compress(m, ffn_keep=0.5, energy=1.0, min_params=0, calib=feeds)
    assert res.totals.narrowed == 3
    onnx.checker.check_model(res.model, full_check=True)
    shapes = {t.name: tuple(t.dims) for t in res.model.graph.initializer}
    assert shapes["Wg"] == shapes["Wu"] == (D, F // 2) and shapes["Wd"] == (F // 2, D)
    # the model computes the block with the same columns of both first projections and the refitted rows
    w = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    new = {t.name: onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer}
    keep = [int(np.flatnonzero(np.all(w["Wg"] == col[:, None], axis=0))[0]) for col in new["Wg"].T]
    assert np.array_equal(w["Wu"][:, keep], new["Wu"])
    got = run(res.model, held)[0]
    assert np.allclose(got, _gated_by_hand(m, keep, new["Wd"].astype(np.float64), held), atol=1e-4)
    # the refit does its job: far closer to the original than the kept rows of W2 unrefitted
    want = run(m, held)[0]
    plain = _gated_by_hand(m, keep, w["Wd"][keep].astype(np.float64), held)
    assert np.linalg.norm(got - want) < 0.5 * np.linalg.norm(plain - want)
    blocks = res.sections["width"]["blocks"]
    assert [(b["node"], b.get("paired"), b["kept"]) for b in blocks] == [("gate", "up", F // 2)]


def _i64(*v):
    return np.array(v, np.int64)


def conv1d_model(style="traced", plain=False, seed=5, width_reader=None):
    """Two GPT-2 feed-forward blocks as exporters write GPT-2's Conv1D: rows flattened to 2-D for
    each Gemm, the activation (tanh GELU) on 3-D.  ``traced``: TorchScript's targets, built at run
    time (``Concat`` of the batch and sequence sizes with a constant width for the first Reshape,
    the block's own width read by ``Shape``/``Slice`` for the second); ``static``: constant
    targets, shared by both blocks.  ``plain``: the same blocks as 3-D MatMuls, no Reshape.
    ``width_reader``: an operator that also reads the first block's width from its shape."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], [init("c.5", np.array(0.5, np.float32)), init("c1", np.array(1.0, np.float32)),
                        init("c.0447", np.array(0.044715, np.float32)), init("c.798", np.array(0.7978846, np.float32)),
                        init("c3", np.array(3.0, np.float32)), init("flat", _i64(-1, D)), init("i0", _i64(0)),
                        init("i1", _i64(1)), init("last", _i64(-1)), init("big", _i64(2**62)), init("minus1", _i64(-1)),
                        init("cF", _i64(F)), init("cD", _i64(D)), init("t3", _i64(-1, 4, F)), init("t2", _i64(-1, F))]
    x = "x"
    for b in range(2):
        w1, w2 = (rng.standard_normal((D, F)) / np.sqrt(D)).astype(np.float32), (rng.standard_normal((F, D)) / np.sqrt(F)).astype(np.float32)
        b1, b2 = (0.1 * rng.standard_normal(F)).astype(np.float32), (0.1 * rng.standard_normal(D)).astype(np.float32)
        inits += [init(f"W1_{b}", w1), init(f"b1_{b}", b1), init(f"W2_{b}", w2), init(f"b2_{b}", b2)]
        p = f"k{b}_"
        if plain:
            nodes += [helper.make_node("MatMul", [x, f"W1_{b}"], [p + "m1"]), helper.make_node("Add", [p + "m1", f"b1_{b}"], [p + "u"])]
        else:
            nodes += [helper.make_node("Reshape", [x, "flat"], [p + "x2"]),
                      helper.make_node("Gemm", [p + "x2", f"W1_{b}", f"b1_{b}"], [p + "u2"], name=f"fc{b}")]
            if style == "static":
                nodes.append(helper.make_node("Reshape", [p + "u2", "t3"], [p + "u"], name=f"to3d_{b}"))
            else:
                nodes += [helper.make_node("Shape", [x], [p + "sx"]), helper.make_node("Gather", [p + "sx", "i0"], [p + "n"]),
                          helper.make_node("Gather", [p + "sx", "i1"], [p + "s"]),
                          helper.make_node("Concat", [p + "n", p + "s", "cF"], [p + "t3"], axis=0),
                          helper.make_node("Reshape", [p + "u2", p + "t3"], [p + "u"], name=f"to3d_{b}")]
        u = p + "u"
        nodes += [helper.make_node("Mul", [u, "c.5"], [p + "half"]), helper.make_node("Pow", [u, "c3"], [p + "cube"]),
                  helper.make_node("Mul", [p + "cube", "c.0447"], [p + "cc"]), helper.make_node("Add", [u, p + "cc"], [p + "in"]),
                  helper.make_node("Mul", [p + "in", "c.798"], [p + "sc"]), helper.make_node("Tanh", [p + "sc"], [p + "th"]),
                  helper.make_node("Add", [p + "th", "c1"], [p + "th1"]), helper.make_node("Mul", [p + "half", p + "th1"], [p + "h"])]
        h, out = p + "h", ("y" if b == 1 else f"r{b}")
        if plain:
            nodes += [helper.make_node("MatMul", [h, f"W2_{b}"], [p + "m2"]), helper.make_node("Add", [p + "m2", f"b2_{b}"], [p + "o"])]
        elif style == "static":
            nodes += [helper.make_node("Reshape", [h, "t2"], [p + "h2"], name=f"to2d_{b}"),
                      helper.make_node("Gemm", [p + "h2", f"W2_{b}", f"b2_{b}"], [p + "o2"], name=f"proj{b}"),
                      helper.make_node("Reshape", [p + "o2", "flat3"], [p + "o"])]
        else:
            nodes += [helper.make_node("Shape", [h], [p + "sh"]), helper.make_node("Slice", [p + "sh", "last", "big"], [p + "w1"]),
                      helper.make_node("Squeeze", [p + "w1", "i0"], [p + "w0"]), helper.make_node("Unsqueeze", [p + "w0", "i0"], [p + "w"]),
                      helper.make_node("Concat", ["minus1", p + "w"], [p + "t2"], axis=0),
                      helper.make_node("Reshape", [h, p + "t2"], [p + "h2"], name=f"to2d_{b}"),
                      helper.make_node("Gemm", [p + "h2", f"W2_{b}", f"b2_{b}"], [p + "o2"], name=f"proj{b}"),
                      # the output's batch and sequence sizes, read from the activation's shape (narrowing leaves them)
                      helper.make_node("Shape", [h], [p + "sh3"]), helper.make_node("Gather", [p + "sh3", "i0"], [p + "on"]),
                      helper.make_node("Gather", [p + "sh3", "i1"], [p + "os"]),
                      helper.make_node("Concat", [p + "on", p + "os", "cD"], [p + "t3o"], axis=0),
                      helper.make_node("Reshape", [p + "o2", p + "t3o"], [p + "o"])]
            if width_reader is not None and b == 0:
                nodes += [helper.make_node(width_reader, [p + "w", "i1"], [p + "wr"]), helper.make_node("Cast", [p + "wr"], [p + "wf"], to=1),
                          helper.make_node("ReduceSum", [p + "wf"], [p + "ws"], keepdims=0)]
        nodes.append(helper.make_node("Add", [p + "o", x], [out]))
        if width_reader is not None and b == 1:
            nodes.append(helper.make_node("Add", ["y", "k0_ws"], ["y2"]))
        x = out
    if style == "static" and not plain:
        inits.append(init("flat3", _i64(-1, 4, D)))
    outputs = [vi("y2" if width_reader else "y", ["B", 4, D])]
    return make_model(nodes, [vi("x", ["B", 4, D])], outputs, inits, opset=13)


@pytest.mark.parametrize("style", ["traced", "static"])
def test_blocks_with_reshapes_inside_narrow_exactly_as_the_same_blocks_without(style):
    m, plain = conv1d_model(style), conv1d_model(plain=True)
    found = find_blocks(m, discover(m, min_params=0))
    assert [b.name for b in found.blocks] == ["fc0", "fc1"] and found.skipped == []
    edits = [(e.reshape.name, e.name, e.concat is not None) for e in found.blocks[0].reshapes]
    if style == "traced":  # the batch and sequence sizes joined to a constant width; the width read at run time
        assert edits == [("to3d_0", "cF", True)] and found.blocks[0].follows == ("to2d_0",)
    else:
        assert edits == [("to3d_0", "t3", False), ("to2d_0", "t2", False)] and found.blocks[0].follows == ()
    feeds, held = _feeds(256), _feeds(16, seed=9)
    got = ol.compress(m, ffn_keep=0.5, energy=1.0, min_params=0, calib=feeds)
    want = ol.compress(plain, ffn_keep=0.5, energy=1.0, min_params=0, calib=feeds)
    assert got.totals.narrowed == want.totals.narrowed == 4
    onnx.checker.check_model(got.model, full_check=True)
    y, y_plain = run(got.model, held)[0], run(want.model, held)[0]
    assert np.allclose(y, y_plain, atol=1e-5) and not np.allclose(y, run(m, held)[0], atol=1e-3)
    names = {t.name for t in got.model.graph.initializer}
    if style == "static":  # both blocks read their own narrowed targets; the shared originals are gone
        assert {"t3", "t2"}.isdisjoint(names) and {"t3__width48", "t2__width48", "t3__width48_1", "t2__width48_1"} <= names
    else:  # each block's own Concat takes its own width; the Concat of the output's sizes is untouched
        concats = {n.name or n.output[0]: list(n.input) for n in got.model.graph.node if n.op_type == "Concat"}
        assert concats["k0_t3"][-1] == "cF__width48" and concats["k0_t3o"][-1] == "cD" and "cF" not in names


@pytest.mark.parametrize("reader, why", [("Mul", "the block's width is read by Mul"),
                                         ("ConstantOfShape", "the block's width is read by ConstantOfShape")])
def test_a_block_whose_width_is_read_for_something_else_is_reported(reader, why):
    m = conv1d_model(width_reader=reader) if reader == "Mul" else None
    if m is None:  # ConstantOfShape takes one input
        m = conv1d_model(width_reader="Mul")
        for n in m.graph.node:
            if n.op_type == "Mul" and n.output[0] == "k0_wr":
                n.op_type, n.input[:] = "ConstantOfShape", ["k0_w"]
    found = find_blocks(m, discover(m, min_params=0))
    assert [b.name for b in found.blocks] == ["fc1"] and found.skipped[0][0] == "fc0" and why in found.skipped[0][1]


def test_a_layout_change_inside_a_block_is_reported_with_its_reason():
    rng = np.random.default_rng(4)
    w1, w2 = (rng.standard_normal((D, F)) / 4).astype(np.float32), (rng.standard_normal((F, D)) / 8).astype(np.float32)
    base = [helper.make_node("Gemm", ["x", "W1"], ["p"], name="fc")]
    inits = [init("W1", w1), init("W2", w2), init("flat", _i64(-1)), init("s2", _i64(4, F)), init("perm", _i64(1, 0))]
    cases = {  # a target that does not keep the neurons last; a transpose
        "Reshape 'flat'": [helper.make_node("Reshape", ["p", "flat"], ["p1"], name="flat"), helper.make_node("Relu", ["p1"], ["h1"]),
                           helper.make_node("Reshape", ["h1", "s2"], ["h"], name="back")],
        "Transpose 'tr'": [helper.make_node("Transpose", ["p"], ["p1"], name="tr", perm=[1, 0]), helper.make_node("Relu", ["p1"], ["h1"]),
                           helper.make_node("Transpose", ["h1"], ["h"], name="tr2", perm=[1, 0])],
    }
    for label, mid in cases.items():
        nodes = base + mid + [helper.make_node("Gemm", ["h", "W2"], ["y"], name="proj")]
        m = make_model(nodes, [vi("x", [4, D])], [vi("y", [4, D])], inits)
        found = find_blocks(m, discover(m, min_params=0))
        assert found.blocks == [] and len(found.skipped) == 1 and found.skipped[0][1].startswith(label), found.skipped


def test_initializer_value_info_follows_the_narrowing():
    # an exporter's value_info for the initializers (torch's dynamo writes it) must follow the narrowed shapes
    m = ffn_model("relu")
    for t in list(m.graph.initializer):
        m.graph.value_info.append(vi(t.name, list(t.dims)))
    res = ol.compress(m, ffn_keep=0.75, energy=1.0, min_params=0, calib=_feeds(64))
    assert res.totals.narrowed == 4
    onnx.checker.check_model(res.model, full_check=True)


def test_a_reshape_target_piece_held_in_constant_value_ints_is_read_and_rewritten():
    m = conv1d_model("traced")
    for b in range(2):  # TorchScript-era exporters write the width as Constant(value_ints=[F])
        m.graph.node.insert(0, helper.make_node("Constant", [], [f"cF{b}"], value_ints=[F]))
        next(n for n in m.graph.node if n.output[0] == f"k{b}_t3").input[2] = f"cF{b}"
    found = find_blocks(m, discover(m, min_params=0))
    assert [b.name for b in found.blocks] == ["fc0", "fc1"] and found.skipped == []
    res = ol.compress(m, ffn_keep=0.5, energy=1.0, min_params=0, calib=_feeds(256))
    want = ol.compress(conv1d_model(plain=True), ffn_keep=0.5, energy=1.0, min_params=0, calib=_feeds(256))
    held = _feeds(16, seed=9)
    assert np.allclose(run(res.model, held)[0], run(want.model, held)[0], atol=1e-5)
    assert not any(n.output[0] in ("cF0", "cF1") for n in res.model.graph.node)  # (targets no Reshape reads are gone)


def test_a_gemm_second_projection_with_alpha_shifts_its_bias_in_its_own_units():
    m, folded = ffn_model("relu", gemm=True), ffn_model("relu", gemm=True)
    for n in m.graph.node:
        if n.op_type == "Gemm" and n.input[1] == "W2_0":
            n.attribute.append(helper.make_attribute("alpha", 0.25))
    for t in folded.graph.initializer:
        if t.name == "W2_0":
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * np.float32(0.25), "W2_0"))
    feeds, held = _feeds(400, gemm=True), _feeds(50, gemm=True, seed=9)
    assert np.allclose(run(m, held)[0], run(folded, held)[0], atol=1e-5)
    got = ol.compress(m, ffn_keep=0.75, energy=1.0, min_params=0, calib=feeds)
    want = ol.compress(folded, ffn_keep=0.75, energy=1.0, min_params=0, calib=feeds)
    assert np.allclose(run(got.model, held)[0], run(want.model, held)[0], atol=1e-4)


def _block_with(extra):
    """x -> MatMul W1 + b1 -> Relu -> (``extra``: nodes from 'h' to 'h2') -> MatMul W2 -> y."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["p"], name="fc"), helper.make_node("Add", ["p", "b1"], ["u"]),
             helper.make_node("Relu", ["u"], ["h"]), *extra, helper.make_node("MatMul", ["h2", "W2"], ["y"], name="proj")]
    inits = [init("W1", (rng.standard_normal((D, F)) / 5).astype(np.float32)), init("b1", np.full(F, 0.1, np.float32)),
             init("W2", (rng.standard_normal((F, D)) / 10).astype(np.float32)), init("i1", _i64(-1)), init("big", _i64(2**62))]
    return make_model(nodes, [vi("x", ["B", 4, D])], [vi("y", ["B", 4, D])], inits, opset=18)


@pytest.mark.parametrize("extra, needle", [
    # a norm over the neurons (ConvNeXt-V2's GRN): computed from the block itself
    ([helper.make_node("ReduceL2", ["h"], ["nrm"], keepdims=1, axes=None), helper.make_node("Div", ["h", "nrm"], ["h2"])],
     "computed from the block's own tensors by ReduceL2"),
    # the width read at run time for arithmetic: h / sqrt(width)
    ([helper.make_node("Shape", ["h"], ["sh"]), helper.make_node("Slice", ["sh", "i1", "big"], ["w"]),
      helper.make_node("Cast", ["w"], ["wf"], to=1), helper.make_node("Sqrt", ["wf"], ["sw"]),
      helper.make_node("Div", ["h", "sw"], ["h2"])], "computed from the block's own tensors by Shape"),
])
def test_a_block_whose_activation_depends_on_the_whole_width_says_why(extra, needle):
    m = _block_with(extra)
    found = find_blocks(m, discover(m, min_params=0))
    assert found.blocks == [] and len(found.skipped) == 1 and found.skipped[0][0] == "fc" and needle in found.skipped[0][1]


def _fused_gated_model(style):
    """:func:`_gated_model` with its gate and up projections in one weight, cut in two halves
    before the activation (Phi-3's gate_up_proj): by Split (``num_outputs``, or a ``split`` input)
    or by two Slices with constant bounds."""
    m = _gated_model()
    w = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    inits = [init("Wgu", np.concatenate([w["Wg"], w["Wu"]], axis=1))] + [t for t in m.graph.initializer if t.name not in ("Wg", "Wu")]
    cut = {"split18": [helper.make_node("Split", ["gu"], ["g", "u"], axis=-1, num_outputs=2)],
           "split13": [helper.make_node("Split", ["gu", "halves"], ["g", "u"], axis=1)],
           "slices": [helper.make_node("Slice", ["gu", "s1", "e2", "ax"], ["u"]), helper.make_node("Slice", ["gu", "s0", "e1", "ax"], ["g"])],
           # torch.chunk(2, -1) as TorchScript writes it: bounds ((width + 1) // 2) * i, read from the output's shape
           "chunk": [helper.make_node("Shape", ["gu"], ["sh"]), helper.make_node("Gather", ["sh", "ax"], ["w"]),
                     helper.make_node("Add", ["w", "one"], ["w1"]), helper.make_node("Div", ["w1", "two"], ["hw"]),
                     helper.make_node("Mul", ["hw", "one"], ["b1"]), helper.make_node("Mul", ["hw", "two"], ["b2"]),
                     helper.make_node("Slice", ["gu", "s0", "b1", "ax"], ["g"]), helper.make_node("Slice", ["gu", "b1", "b2", "ax"], ["u"])],
           }[style]
    inits += [init("halves", _i64(F, F)), init("s0", _i64(0)), init("e1", _i64(F)), init("s1", _i64(F)), init("e2", _i64(2**62)),
              init("ax", _i64(-1)), init("one", _i64(1)), init("two", _i64(2))]
    rest = [n for n in m.graph.node if n.name not in ("gate", "up")]
    if style == "split18":  # (ReduceMean takes its axes as an input from opset 18)
        rest = [helper.make_node("ReduceMean", ["r2", "rax"], ["ms"]) if n.op_type == "ReduceMean" else n for n in rest]
        inits.append(init("rax", _i64(-1)))
    nodes = [helper.make_node("MatMul", ["x", "Wgu"], ["gu"], name="gate_up"), *cut, *rest]
    return make_model(nodes, list(m.graph.input), list(m.graph.output), inits, opset=18 if style == "split18" else 13)


@pytest.mark.parametrize("style", ["split18", "split13", "slices", "chunk"])
def test_a_fused_gate_and_up_projection_narrows_as_the_two_projections_do(style):
    m, two = _fused_gated_model(style), _gated_model()
    found = find_blocks(m, discover(m, min_params=0))
    assert found.skipped == [] and [(b.name, b.hidden) for b in found.blocks] == [("gate_up", F)]
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((4, D))
    feeds, held = ({"x": (rng.standard_normal((n, 4)) @ mix + 0.1 * rng.standard_normal((n, D))).astype(np.float32)}
                   for n in (400, 50))
    assert np.allclose(run(m, held)[0], run(two, held)[0], atol=1e-4)
    got = ol.compress(m, ffn_keep=0.5, energy=1.0, min_params=0, calib=feeds)
    want = ol.compress(two, ffn_keep=0.5, energy=1.0, min_params=0, calib=feeds)
    onnx.checker.check_model(got.model, full_check=True)
    assert {t.name: tuple(t.dims) for t in got.model.graph.initializer}["Wgu"] == (D, F)
    assert np.allclose(run(got.model, held)[0], run(want.model, held)[0], atol=1e-4)
    assert got.totals.params_after == want.totals.params_after


def test_a_fused_projection_cut_otherwise_than_in_halves_says_why():
    m = _fused_gated_model("split13")
    for t in m.graph.initializer:
        if t.name == "halves":
            t.CopyFrom(init("halves", _i64(F + 8, F - 8)))
    found = find_blocks(m, discover(m, min_params=0))
    assert found.blocks == [] and len(found.skipped) == 1 and "not two halves" in found.skipped[0][1]
    m = _fused_gated_model("chunk")  # the width read for the cut, and for something else too
    m.graph.node.append(helper.make_node("Cast", ["hw"], ["hwf"], to=1))
    m.graph.node.append(helper.make_node("Mul", ["y", "hwf"], ["y2"]))
    m.graph.output[0].name = "y2"
    found = find_blocks(m, discover(m, min_params=0))
    assert found.blocks == [] and len(found.skipped) == 1 and "read by Shape for something other than the cut" in found.skipped[0][1]


def test_paths_with_no_activation_are_no_near_misses():
    # a projection into a residual add read by a norm and by the next layer's projection (ELECTRA's
    # embeddings_project); two projections summed (ALBERT's embedding projection and attention output)
    rng = np.random.default_rng(1)
    w = {n: (rng.standard_normal((D, D)) / 5).astype(np.float32) for n in ("Wp", "Wa", "Wq")}
    nodes = [helper.make_node("MatMul", ["x", "Wp"], ["p"], name="project"), helper.make_node("MatMul", ["x", "Wa"], ["a"], name="attn"),
             helper.make_node("Add", ["p", "a"], ["s"]), helper.make_node("LayerNormalization", ["s", "g", "bb"], ["n"], axis=-1),
             helper.make_node("MatMul", ["s", "Wq"], ["q"], name="q"), helper.make_node("Add", ["q", "n"], ["y"])]
    m = make_model(nodes, [vi("x", ["B", D])], [vi("y", ["B", D])],
                   [init(k, v) for k, v in w.items()] + [init("g", np.ones(D, np.float32)), init("bb", np.zeros(D, np.float32))])
    found = find_blocks(m, discover(m, min_params=0))
    assert found.blocks == [] and found.skipped == []


def test_a_gated_near_miss_is_said_once_and_a_filtered_projection_is_named():
    m = _gated_model()
    for t in m.graph.initializer:  # the up projection one neuron wide: its output broadcasts against the gate's
        if t.name == "Wu":
            t.CopyFrom(init("Wu", np.ones((D, 1), np.float32)))
    found = find_blocks(m, discover(m, min_params=0))
    assert found.blocks == [] and len(found.skipped) == 1 and "joins 96 neurons with up's 1" in found.skipped[0][1]
    m = _gated_model()
    found = find_blocks(m, discover(m, min_params=0, exclude="down"))
    assert found.blocks == [] and len(found.skipped) == 1
    assert found.skipped[0][1].startswith("down is left out: ") and "exclude" in found.skipped[0][1]


def test_width_reduction_that_narrows_nothing_warns(caplog):
    with caplog.at_level("WARNING"):
        ol.compress(conv1d_model(plain=True, width_reader=None), ffn_keep=0.5, energy=1.0, min_params=10**6, calib=_feeds(64))
    said = [r.getMessage() for r in caplog.records if "no feed-forward block narrowed" in r.getMessage()]
    assert len(said) == 1 and "is left out" in said[0]


def test_a_bias_behind_an_exporters_identity_says_so():
    m = ffn_model("relu")
    m.graph.node.insert(0, helper.make_node("Identity", ["b1_0"], ["b1_0_copy"], name="shared_copy"))
    for n in m.graph.node:
        if n.op_type == "Add" and "b1_0" in n.input:
            n.input[list(n.input).index("b1_0")] = "b1_0_copy"
    found = find_blocks(m, discover(m, min_params=0))
    assert len(found.blocks) == 1 and len(found.skipped) == 1
    assert "made by Identity 'shared_copy' from 'b1_0', a copy of a tensor other layers may share" in found.skipped[0][1]


@pytest.mark.parametrize("copy_op", ["Cast", "Identity"])
@pytest.mark.parametrize("bias", [True, False])
def test_a_dense_on_3d_input_as_tf2onnx_writes_it_is_a_block(copy_op, bias):
    """tf2onnx's Keras Dense on [B, S, D]: Reshape to 2-D, MatMul, Reshape back to a target built
    at run time (Shape, Cast to int32, Gather, Concat with the width, Cast to int64), then the
    bias Add; the same again for the second projection."""
    rng = np.random.default_rng(4)
    it = np.int32 if copy_op == "Cast" else np.int64

    def copy(src, dst, to):
        return helper.make_node(copy_op, [src], [dst], **({"to": to} if copy_op == "Cast" else {}))

    inits = [init("W1", (rng.standard_normal((D, F)) / np.sqrt(D)).astype(np.float32)),
             init("W2", (rng.standard_normal((F, D)) / np.sqrt(F)).astype(np.float32)),
             init("flat_d", np.array([-1, D], np.int64)), init("flat_f", np.array([-1, F], np.int64)),
             init("lead", np.array([0, 1], np.int64)), init("width_f", np.array([F], it)), init("width_d", np.array([D], it))]
    nodes = [helper.make_node("Shape", ["x"], ["s0"]), copy("s0", "s", TensorProto.INT32),
             helper.make_node("Gather", ["s", "lead"], ["bs"], axis=0),
             helper.make_node("Concat", ["bs", "width_f"], ["tf32"], axis=0), copy("tf32", "tf", TensorProto.INT64),
             helper.make_node("Concat", ["bs", "width_d"], ["td32"], axis=0), copy("td32", "td", TensorProto.INT64),
             helper.make_node("Reshape", ["x", "flat_d"], ["x2"]), helper.make_node("MatMul", ["x2", "W1"], ["m1"], name="up"),
             helper.make_node("Reshape", ["m1", "tf"], ["m1b"])]
    if bias:
        inits.append(init("b1", 0.1 * rng.standard_normal(F).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["m1b", "b1"], ["h0"]))
    nodes += [helper.make_node("Relu", ["h0" if bias else "m1b"], ["h"]), helper.make_node("Reshape", ["h", "flat_f"], ["h2"]),
              helper.make_node("MatMul", ["h2", "W2"], ["m2"], name="down"), helper.make_node("Reshape", ["m2", "td"], ["y"])]
    m = make_model(nodes, [vi("x", ["B", "S", D])], [vi("y", ["B", "S", D])], inits)
    found = find_blocks(m, discover(m, min_params=0))
    assert len(found.blocks) == 1 and found.skipped == []
    assert (found.blocks[0].up_bias.name if bias else found.blocks[0].up_bias) == ("b1" if bias else None)
    res = ol.compress(m, ffn_keep=0.5, calib=_feeds(300), min_params=0, energy=1.0)
    assert res.totals.narrowed == 2
    widths = {t.name: tuple(t.dims) for t in res.model.graph.initializer}
    assert widths["W1"] == (D, F // 2) and (widths["b1"] == (F // 2,) if bias else True)
    onnx.checker.check_model(res.model, full_check=True)
    x = np.random.default_rng(9).standard_normal((3, 5, D)).astype(np.float32)  # (another batch and length)
    want, got = run(m, {"x": x})[0], run(res.model, {"x": x})[0]
    assert got.shape == want.shape
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.4  # (0.28 here; the wrong columns give about 1)
