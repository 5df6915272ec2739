"""Least-squares refit of one factor after truncation, on propagated activations."""

import numpy as np
import onnx
import pytest

import onnx_lowrank as ol
from onnx_lowrank import decompose
from onnx_lowrank.activations import capture_grams, capture_refit_stats, refit_factors, refit_levels
from onnx_lowrank.cli import main
from onnx_lowrank.discovery import discover
from onnx_lowrank.rewrite import NameScope, factorize_group
from models import run
from test_rank_selection import anisotropic, chain_model, decaying


def _problem(seed=0, rows=300, m=30, n=20, r=4):
    rng = np.random.default_rng(seed)
    x = anisotropic(rows, m, seed=seed).astype(np.float64)
    xt = x + 0.3 * rng.standard_normal(x.shape) * x.std(axis=0)  # inputs disturbed upstream
    w = decaying(m, n, seed=seed + 1, decay=0.9).astype(np.float64)
    a = rng.standard_normal((m, r))
    b = rng.standard_normal((r, n))
    return x, xt, w, a, b


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_left_refit_is_the_least_squares_optimum(damping):
    x, xt, w, a, b = _problem()
    g, c = xt.T @ xt, xt.T @ x
    a2, b2 = decompose.refit_factor(a, b, w, g, c, "left", damping)
    assert a2 is not None and np.array_equal(a2, a)
    # min_B ||X~ A B - X W||^2 + d ||A B - W||^2 as one stacked least-squares problem
    d = damping * np.mean(np.diag(g))
    lhs = np.vstack([xt @ a, np.sqrt(d) * a])
    rhs = np.vstack([x @ w, np.sqrt(d) * w])
    best = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    assert np.allclose(b2, best, rtol=1e-7, atol=1e-9)
    # and it beats the factor it replaced
    assert np.linalg.norm(lhs @ b2 - rhs) < np.linalg.norm(lhs @ b - rhs)


def test_right_refit_is_the_least_squares_optimum():
    # y = W @ x, activations are columns: min_A ||A B X~ - W X||
    x, xt, w, a, b = _problem(seed=3, m=24, n=30)
    xc, xtc = x.T, xt.T  # (30, rows)
    wr = w.T  # (n=20... ) stored matrix (20, 30): 20 outputs, 30 features on its columns
    ar, br = b.T, a.T  # (20, r), (r, 30)
    a2, b2 = decompose.refit_factor(ar, br, wr, xtc @ xtc.T, xtc @ xc.T, "right", 0.0)
    assert np.array_equal(b2, br)
    best = np.linalg.lstsq(xtc.T @ br.T, xc.T @ wr.T, rcond=None)[0].T
    assert np.allclose(a2, best, rtol=1e-7, atol=1e-9)


def test_refit_without_propagated_error_returns_the_whitened_factors():
    # With X~ = X the whitened truncation is already optimal: the refit changes nothing.
    x, _, w, _, _ = _problem(seed=5)
    g = x.T @ x
    spec = decompose.whitened_spectrum(w, g, "left", damping=0.01)
    a, b = decompose.factors(spec, 5)
    _, b2 = decompose.refit_factor(a, b, w, g, g, "left", damping=0.01)
    assert np.allclose(b2, b, rtol=1e-6, atol=1e-9 * np.abs(b).max())


def test_refit_rejects_bad_statistics():
    x, xt, w, a, b = _problem()
    with pytest.raises(ValueError, match="expected"):
        decompose.refit_factor(a, b, w, np.eye(3), np.eye(3), "left")
    with pytest.raises(ValueError, match="side"):
        decompose.refit_factor(a, b, w, xt.T @ xt, xt.T @ x, "up")
    with pytest.raises(ValueError, match="zero"):
        decompose.refit_factor(a, b, w, np.zeros((30, 30)), np.zeros((30, 30)), "left")


def _compressed(model, found, factors):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    groups = {g.weight.name: g for g in discover(m, min_params=0).groups}
    names = NameScope(m)
    for g in found.groups:
        a, b = factors[g.key]
        factorize_group(m, groups[g.weight.name], a.astype(np.float32), b.astype(np.float32), names)
    return m


def _chain_problem():
    # x -> W0 -> Relu -> W1 -> Relu -> W2 -> y with calibration and held-out data and its statistics
    model = chain_model()
    found = discover(model, min_params=0)
    calib = [{"x": anisotropic(200, 96, seed=s)} for s in (11, 12)]
    held = {"x": anisotropic(400, 96, seed=13)}
    cap = capture_grams(model, found.groups, calib, None)
    weights = {g.key: onnx.numpy_helper.to_array(g.weight.tensor) for g in found.groups}
    return model, found, calib, held, cap, weights


def test_propagated_refit_lowers_the_chain_output_error():
    # x -> W0 -> Relu -> W1 -> Relu -> W2 -> y, all three truncated in the whitened space.
    model, found, calib, held, cap, weights = _chain_problem()
    factors = {}
    for g in found.groups:
        gram, side = cap.grams[g.key]
        factors[g.key] = decompose.factors(decompose.whitened_spectrum(weights[g.key], gram, side), 6)
    y = run(model, held)[0]

    def err(f):
        return float(np.linalg.norm(run(_compressed(model, found, f), held)[0] - y))

    before = err(factors)
    one, runs1 = refit_factors(model, found.groups, factors, weights, calib, None, passes=1)
    two, runs2 = refit_factors(model, found.groups, factors, weights, calib, None, passes=2)
    assert runs1 == 4 and runs2 == 8  # two runs (original, compressed) per feed and pass
    # the first layer sees the original input: nothing to correct there
    g0 = found.groups[0].key
    assert np.allclose(one[g0][1], factors[g0][1], rtol=1e-5, atol=1e-6)
    assert err(one) < 0.95 * before
    assert err(two) < 0.95 * before
    both, _ = refit_factors(model, found.groups, factors, weights, calib, None, passes=2, both=True)
    assert err(both) < 0.95 * before


def test_refit_stats_pair_original_and_compressed_rows_under_a_mask():
    model = chain_model()
    found = discover(model, min_params=0)
    x = anisotropic(10, 96, seed=2)
    g1 = found.groups[1]
    w1 = onnx.numpy_helper.to_array(found.groups[0].weight.tensor)
    w0_small = (0.5 * w1).astype(np.float32)
    stats = capture_refit_stats(model, [g1], {found.groups[0].weight.name: w0_small}, [{"x": x}], None)
    orig = np.maximum(x @ w1, 0).astype(np.float64)
    comp = np.maximum(x @ w0_small, 0).astype(np.float64)
    gram, side = stats.grams[g1.key]
    assert side == "left" and stats.runs == 2
    assert np.allclose(gram, comp.T @ comp, rtol=1e-5, atol=1e-6)
    assert np.allclose(stats.cross[g1.key], comp.T @ orig, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_refit_of_both_factors_is_the_best_rank_r_product(side):
    x, xt, w, _, _ = _problem(seed=7, m=24, n=24)
    r, damping = 4, 0.02
    if side == "right":  # activations as columns, the stored matrix meets them with its columns
        g, c = xt.T @ xt, xt.T @ x  # same numbers, (24, 24)
    else:
        g, c = xt.T @ xt, xt.T @ x
    a, b = decompose.refit_lowrank(w, g, c, r, side, damping)
    d = damping * np.mean(np.diag(g))
    if side == "left":
        z, t = np.vstack([xt, np.sqrt(d) * np.eye(24)]), np.vstack([x @ w, np.sqrt(d) * w])
        loss = lambda m: np.linalg.norm(z @ m - t)  # noqa: E731
    else:
        z, t = np.vstack([xt, np.sqrt(d) * np.eye(24)]), np.vstack([x @ w.T, np.sqrt(d) * w.T])
        loss = lambda m: np.linalg.norm(z @ m.T - t)  # noqa: E731
    # reduced-rank regression optimum: project the least-squares fit onto the top-r directions of Z M_ls
    mt = w if side == "left" else w.T
    m_ls = np.linalg.lstsq(z, t, rcond=None)[0]
    u, s, vt = np.linalg.svd(z @ m_ls, full_matrices=False)
    best_fit = u[:, :r] * s[:r] @ vt[:r]
    best = np.linalg.norm(best_fit - t)
    assert loss(a @ b) == pytest.approx(best, rel=1e-6)
    # one-factor refit from the same A can only be worse or equal
    if side == "left":
        _, b1 = decompose.refit_factor(a, b, mt, g, c, "left", damping)
        assert loss(a @ b1) == pytest.approx(loss(a @ b), rel=1e-6)


def test_sequential_refit_goes_level_by_level():
    model = chain_model(shared=True)  # W2 has two users on the same activation
    found = discover(model, min_params=0)
    levels = refit_levels(model.graph, found.groups)
    assert sorted(levels[g.key] for g in found.groups) == [0, 1, 2]
    assert levels[found.groups[0].key] == 0
    model, found, calib, held, cap, weights = _chain_problem()
    factors = {g.key: decompose.factors(decompose.whitened_spectrum(weights[g.key], *cap.grams[g.key]), 6) for g in found.groups}
    y = run(model, held)[0]
    before = float(np.linalg.norm(run(_compressed(model, found, factors), held)[0] - y))
    seq, runs = refit_factors(model, found.groups, factors, weights, calib, None, sequential=True)
    assert runs == 3 * 4  # three levels, two runs per feed each
    assert float(np.linalg.norm(run(_compressed(model, found, seq), held)[0] - y)) < 0.95 * before


# ------------------------------------------------------------------ wired in: --refine


def test_compress_refine_lowers_the_output_error_on_held_out_data():
    model = chain_model()
    calib = [{"x": anisotropic(200, 96, seed=s)} for s in (11, 12)]
    held = {"x": anisotropic(400, 96, seed=13)}
    y = run(model, held)[0]
    opts = dict(data_aware=True, target_params=0.3, min_params=0, calib=calib)
    base = ol.compress(model, **opts)
    refined = ol.compress(model, refine=True, **opts)
    assert [d.rank for d in refined.layers] == [d.rank for d in base.layers]
    assert refined.totals.params_after == base.totals.params_after
    assert refined.sections["refine"]["layers_refitted"] == 3
    sec = refined.sections["refine"]
    assert sec["kept"] is True and sec["rel_l2_refitted"] < sec["rel_l2_truncated"]
    err_base = np.linalg.norm(run(base.model, held)[0] - y)
    err_refined = np.linalg.norm(run(refined.model, held)[0] - y)
    assert err_refined < 0.97 * err_base


def _conv_then_matmul(seed=0):
    """x[N,4,6,6] -> Conv(16 filters, 3x3, full rank) -> Relu -> Flatten -> MatMul(W[256,10], nearly low-rank) -> y."""
    from onnx import helper
    from models import init, make_model, vi

    rng = np.random.default_rng(seed)
    k = rng.standard_normal((16, 4, 3, 3)).astype(np.float32) / 6
    w = decaying(256, 10, seed=seed + 1, decay=0.5).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "K"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("MatMul", ["f", "W"], ["y"], name="head")]
    return make_model(nodes, [vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 10])], [init("K", k), init("W", w)])


def test_refine_fits_on_inputs_that_carry_the_convs_error_too():
    """A MatMul after a truncated Conv: the refit sees the Conv in its compressed form (it had
    refitted on the MatMul's own error only, which left the Conv's in place), and the check
    that keeps it measures the model as it will be written."""
    model = _conv_then_matmul()
    rng = np.random.default_rng(5)
    calib = [{"x": rng.standard_normal((2000, 4, 6, 6)).astype(np.float32)}]
    held = {"x": rng.standard_normal((300, 4, 6, 6)).astype(np.float32)}
    opts = dict(energy=0.8, min_params=0, calib=calib)
    base = ol.compress(model, **opts)
    refined = ol.compress(model, refine=True, **opts)
    assert {d.weight: d.rank for d in refined.layers} == {d.weight: d.rank for d in base.layers}
    assert base.totals.factorized == 2
    y = run(model, held)[0]

    def err(m):
        return np.linalg.norm(run(m, held)[0] - y) / np.linalg.norm(y)

    sec = refined.sections["refine"]
    assert sec["kept"] is True and sec["layers_refitted"] == 1
    calib_err = np.linalg.norm(run(base.model, calib[0])[0] - run(model, calib[0])[0]) / np.linalg.norm(run(model, calib[0])[0])
    assert sec["rel_l2_truncated"] == pytest.approx(calib_err, rel=1e-3)  # the check measured the model as written
    assert err(refined.model) < 0.9 * err(base.model)  # (0.42 against 0.51 when written)


def test_refine_keeps_the_truncated_factors_when_the_refit_raises_the_calibration_error(monkeypatch):
    """A refit that fits each layer's output can still move the network's output away (seen on a
    CNN): the stage measures both on the calibration data and keeps the better, and says so."""
    from onnx_lowrank.passes import refit as stage

    def spoilt(model, groups, factors, weights, feeds, data, **kw):
        return {k: (a, 0.5 * b) for k, (a, b) in factors.items()}, 0

    model = chain_model()
    calib = [{"x": anisotropic(200, 96, seed=s)} for s in (11, 12)]
    opts = dict(data_aware=True, target_params=0.3, min_params=0, calib=calib)
    base = ol.compress(model, **opts)
    monkeypatch.setattr(stage, "refit_factors", spoilt)
    refined = ol.compress(model, refine=True, **opts)
    sec = refined.sections["refine"]
    assert sec["kept"] is False and sec["layers_refitted"] == 0
    assert sec["rel_l2_refitted"] > sec["rel_l2_truncated"]
    held = {"x": anisotropic(64, 96, seed=13)}
    np.testing.assert_array_equal(run(refined.model, held)[0], run(base.model, held)[0])
    assert any(w.startswith("--refine: the refitted factors do not lower the output error") for w in refined.warnings)


def test_refine_without_calibration_names_calib():
    with pytest.raises(ol.UsageError, match="refine needs calibration data: pass calib="):
        ol.compress(chain_model(), refine=True, rank=4, min_params=0)
    with pytest.raises(ol.UsageError, match="refine is a switch"):
        ol.compress(chain_model(), refine="yes", rank=4, min_params=0, calib=[{"x": anisotropic(8, 96)}])


def test_cli_refine(tmp_path, capsys):
    src, out, npz = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "c.npz"
    onnx.save(chain_model(), str(src))
    np.savez(npz, x=anisotropic(256, 96, seed=4))
    assert main([str(src), "-o", str(out), "--rank", "8", "--min-params", "0", "--refine", "--calib", str(npz)]) == 0
    assert out.exists()
    assert "factors or feed-forward blocks refitted" in capsys.readouterr().err


def test_refine_with_integer_outputs_only_keeps_the_refit_unchecked():
    """An ArgMax head leaves no float output to compare: the refit stands, and the report gives no
    errors it could not measure."""
    from onnx import TensorProto, helper

    model = chain_model()
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = ["pre" if o == out else o for o in node.output]
    model.graph.node.append(helper.make_node("ArgMax", ["pre"], ["cls"], axis=1))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("cls", TensorProto.INT64, None))
    calib = [{"x": anisotropic(200, 96, seed=s)} for s in (11, 12)]
    res = ol.compress(model, data_aware=True, target_params=0.3, min_params=0, calib=calib, refine=True)
    sec = res.sections["refine"]
    assert sec["layers_refitted"] == 3 and "kept" not in sec and "rel_l2_truncated" not in sec and res.warnings == []


def test_refine_with_nothing_to_refit_says_why():
    """Only a feed-forward block narrowed, no factor pair: the refine line says why it refitted nothing."""
    from test_width import _feeds, ffn_model

    res = ol.compress(ffn_model("gelu"), ffn_keep=0.5, energy=1.0, calib=_feeds(300), min_params=0, refine=True)
    sec = res.sections["refine"]
    assert sec["layers_refitted"] == 0 and sec["why_none"] == "no MatMul/Gemm layer is factorized"
