"""Latency-aware mode: decisions from an injected, deterministic probe; one real smoke test."""

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from models import init, lowrank, make_model, run, vi
from onnx_lowrank import UsageError, compress, latency
from onnx_lowrank.cli import main
from onnx_lowrank.latency import MatMulCase, OrtProbe


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNX_LOWRANK_CACHE_DIR", str(tmp_path / "cache"))


class MacProbe:
    """Times proportional to MACs plus a fixed cost per MatMul call: deterministic, machine-free.

    A factored layer pays two calls, so at break-even rank (same MACs) it is slower, and tiny
    layers gain nothing at any rank: the shape of what onnxruntime shows on a CPU.
    """

    def __init__(self, call_cost: float = 1000.0, model_speedup: float = 1.3):
        self.call_cost = call_cost
        self.speedup = model_speedup
        self.cases: list[MatMulCase] = []
        self.model_checks: list[tuple[int, dict]] = []

    def layer_times(self, case):
        self.cases.append(case)
        dense = case.rows * case.k_in * case.k_out + self.call_cost
        factored = case.rows * case.rank * (case.k_in + case.k_out) + 2 * self.call_cost
        return dense * 1e-9, factored * 1e-9

    def model_speedup(self, before, after, *, threads, shapes):
        self.model_checks.append((threads, dict(shapes)))
        return self.speedup


#   x[batch, 256] --MatMul(Wlow[256,256], rank 8)--> h --MatMul(Wfull[256,256], full rank)--> y
def two_layer_model() -> onnx.ModelProto:
    rng = np.random.default_rng(5)
    return make_model(
        [helper.make_node("MatMul", ["x", "Wlow"], ["h"], name="low"),
         helper.make_node("MatMul", ["h", "Wfull"], ["y"], name="full")],
        [vi("x", ["batch", 256])], [vi("y", ["batch", 256])],
        [init("Wlow", lowrank(256, 256, 8, 1)), init("Wfull", rng.standard_normal((256, 256)).astype(np.float32))],
    )


def test_layer_near_break_even_is_skipped_and_says_why():
    probe = MacProbe()
    # rank 120 is below break-even (128): the plain rule factorizes both layers...
    plain = compress(two_layer_model(), rank=120, min_params=0)
    assert [d.factorized for d in plain.layers] == [True, True]
    # ...but two calls doing 94 % of the MACs are no faster than one call
    res = compress(two_layer_model(), rank=120, min_params=0, latency_aware=True, batch=(1, 64), threads=(1, 2), probe=probe)
    assert [d.factorized for d in res.layers] == [False, False]
    for d in res.layers:
        assert d.reason == "no latency gain (x1.05 at 1 thread, batch 1; needs x1.1)"
    assert [n.op_type for n in res.model.graph.node] == ["MatMul", "MatMul"]
    assert res.sections["latency"]["layers"]["Wfull"]["kept"] is False


def test_a_slower_layer_kept_under_a_low_min_speedup_is_called_slower(caplog):
    with caplog.at_level("INFO", logger="onnx_lowrank"):
        res = compress(two_layer_model(), rank=127, min_params=0, latency_aware=True, min_speedup=0.5, probe=MacProbe(call_cost=1e6))
    assert [d.factorized for d in res.layers] == [True, True]
    said = [r.getMessage() for r in caplog.records if "at rank 127" in r.getMessage()]
    assert said and all("at worst, slower (kept: min_speedup 0.5 allows it)" in m and "faster" not in m for m in said), said


def test_low_rank_layer_is_kept_and_the_slow_one_skipped():
    probe = MacProbe()
    # energy 0.999: Wlow keeps rank 8; Wfull (random, full rank) would need more than break-even
    res = compress(two_layer_model(), energy=0.999, min_params=0, latency_aware=True, batch=(1, 64), probe=probe)
    low, full = res.layers
    assert low.factorized and low.rank == 8
    assert not full.factorized and "saves nothing" in full.reason  # the break-even guard acts first
    # the same weights at a fixed rank just under break-even: slower factored, skipped
    res = compress(two_layer_model(), rank=127, min_params=0, latency_aware=True, batch=(64,), probe=probe)
    assert [d.reason.split(" at ")[0] for d in res.layers] == ["no latency gain (x1.01"] * 2
    res = compress(two_layer_model(), rank=8, min_params=0, latency_aware=True, batch=(64,), probe=probe)
    assert [d.factorized for d in res.layers] == [True, True]
    assert res.sections["latency"]["model"] == [{"threads": 1, "batch": 64, "speedup": 1.3}]
    assert res.sections["latency"]["layers"]["Wlow"]["kept"] is True


def test_tiny_layer_at_batch_one_gains_nothing():
    probe = MacProbe(call_cost=1e6)
    res = compress(two_layer_model(), rank=8, min_params=0, latency_aware=True, batch=(1,), probe=probe)
    assert all(not d.factorized and d.reason.startswith("no latency gain") for d in res.layers)
    assert "model" not in res.sections["latency"]  # nothing factorized: nothing to check
    assert [n.op_type for n in res.model.graph.node] == ["MatMul", "MatMul"]


def test_every_setting_is_measured_with_real_row_counts():
    probe = MacProbe()
    compress(two_layer_model(), rank=8, min_params=0, latency_aware=True, batch=(1, 64), threads=(1, 2), probe=probe)
    seen = {(c.k_in, c.k_out, c.rank, c.rows, c.threads) for c in probe.cases}
    assert seen == {(256, 256, 8, rows, t) for rows in (1, 64) for t in (1, 2)}
    assert sorted(probe.model_checks, key=lambda c: (c[0], c[1]["x"])) == [
        (1, {"x": (1, 256)}), (1, {"x": (64, 256)}), (2, {"x": (1, 256)}), (2, {"x": (64, 256)})]


def test_whole_model_slower_undoes_the_factorization():
    probe = MacProbe(model_speedup=0.9)
    model = two_layer_model()
    res = compress(model, rank=8, min_params=0, latency_aware=True, batch=(64,), probe=probe)
    assert res.totals.factorized == 0
    assert all("whole model measured x0.90 at 1 thread, batch 64; factorization undone" in d.reason for d in res.layers)
    assert res.sections["latency"]["undone"] is True
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    np.testing.assert_array_equal(run(res.model, {"x": x})[0], run(model, {"x": x})[0])


#   x[batch, seq, 64] --MatMul(W[64, 64])--> y   (rows = batch * seq)
def test_rows_are_batch_times_sequence():
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [vi("x", ["batch", "seq", 64])], [vi("y", ["batch", "seq", 64])], [init("W", lowrank(64, 64, 4, 2))])
    probe = MacProbe()
    compress(model, rank=4, min_params=0, latency_aware=True, batch=(8,), input_shape=("x:1x16x64",), probe=probe)
    assert {c.rows for c in probe.cases} == {128}


#   x[batch, 64] --Gemm(W[48, 64], transB=1)--> y[batch, 48]
def test_gemm_trans_b_is_timed_as_x_at_w_transposed():
    model = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], name="g", transB=1)],
                       [vi("x", ["batch", 64])], [vi("y", ["batch", 48])], [init("W", lowrank(48, 64, 4, 3))])
    probe = MacProbe()
    compress(model, rank=4, min_params=0, latency_aware=True, batch=(5,), probe=probe)
    assert {(c.k_in, c.k_out, c.rows) for c in probe.cases} == {(64, 48, 5)}


def test_missing_input_shape_is_a_usage_error(tmp_path, capsys):
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [vi("x", ["batch", "seq", 64])], [vi("y", ["batch", "seq", 64])], [init("W", lowrank(64, 64, 4, 2))])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert main([str(path), "-o", str(tmp_path / "o.onnx"), "--latency-aware", "--min-params", "0"]) == 2
    assert "--input-shape x:1x" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_config_values_are_validated(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(two_layer_model(), str(path))
    for flags, needle in ((["--threads", "0"], "--threads"), (["--batch", "x"], "--batch"),
                          (["--min-speedup", "-1"], "--min-speedup"), (["--quantize", "int2"], "--quantize"),
                          (["--input-shape", "x"], "--input-shape"),
                          (["--min-speedup", "1.2"], "add --latency-aware or drop --min-speedup"),
                          (["--batch", "1,64"], "add --latency-aware or drop --batch")):
        assert main([str(path), "-o", str(tmp_path / "o.onnx"), *flags]) == 2
        assert needle in capsys.readouterr().err
    rep = tmp_path / "r.json"
    assert main([str(path), "--dry-run", "--min-params", "0", "--rank", "8", "--threads", "1,2", "--report", str(rep)]) == 0
    assert "--" not in capsys.readouterr().err


def test_real_probe_smoke_and_disk_cache(tmp_path, monkeypatch):
    probe = OrtProbe(tmp_path, runs=2, min_seconds=0.0, warmup=1)
    case = MatMulCase(64, 48, 8, 4, 1)
    dense, factored = probe.layer_times(case)
    assert dense > 0 and factored > 0
    doc = json.loads((tmp_path / "latency.json").read_text())
    assert list(doc.values())[0][case.key()] == [dense, factored]
    # a new probe reads the cache and does not time again
    monkeypatch.setattr(latency.bench, "time_interleaved", lambda *a, **k: pytest.fail("timed a cached case"))
    assert OrtProbe(tmp_path).layer_times(case) == (dense, factored)


def test_real_probe_end_to_end_structure(tmp_path):
    probe = OrtProbe(tmp_path, runs=2, min_seconds=0.0, warmup=1, model_runs=2, model_seconds=0.0)
    res = compress(two_layer_model(), rank=8, min_params=0, latency_aware=True, batch=(2,), probe=probe)
    lat = res.sections["latency"]
    assert set(lat["layers"]) == {"Wlow", "Wfull"}
    for entry in lat["layers"].values():
        assert entry["settings"][0]["speedup"] > 0 and entry["settings"][0]["batch"] == 2
    for d in res.layers:
        assert d.factorized or d.reason.startswith("no latency gain")


def test_conv_plans_are_left_to_the_whole_model_check(tmp_path):
    #   x[1,8,16,16] --Conv(K[16,8,3,3], exactly rank 2 channel-wise)--> y
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k = (rng.standard_normal((16, 2)) @ rng.standard_normal((2, 8 * 9))).reshape(16, 8, 3, 3).astype(np.float32)
    g = helper.make_graph([helper.make_node("Conv", ["x", "K"], ["y"], name="conv", pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 16, 16])],
                          [numpy_helper.from_array(k, "K")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    class NoLayerTimes(MacProbe):
        def layer_times(self, case):
            raise AssertionError("Conv layers are not micro-benchmarked as MatMuls")

    probe = NoLayerTimes(model_speedup=1.5)
    res = compress(m, energy=1.0, min_params=0, latency_aware=True, probe=probe)
    assert res.layers[0].factorized
    assert res.sections["latency"]["layers"]["K"]["note"].startswith("Conv")
    assert len(probe.model_checks) == 1  # the whole model was timed instead


def test_default_batch_on_a_fixed_batch_model_times_that_batch():
    model = two_layer_model()
    for v in (*model.graph.input, *model.graph.output):
        v.type.tensor_type.shape.dim[0].dim_value = 4
    probe = MacProbe()
    res = compress(model, rank=8, min_params=0, latency_aware=True, probe=probe)
    assert {c.rows for c in probe.cases} == {4}
    assert [shapes["x"] for _, shapes in probe.model_checks] == [(4, 256)]
    assert res.totals.factorized >= 1
    with pytest.raises(UsageError, match="batch=2"):
        compress(model, rank=8, min_params=0, latency_aware=True, batch=(2,), probe=MacProbe())


@pytest.mark.parametrize("content", ["[1, 2]", "null", '{"%s": [1]}'])
def test_a_latency_cache_of_another_shape_is_ignored_and_rewritten(tmp_path, content, caplog):
    from onnx_lowrank.passes.latency import OrtProbe

    probe = OrtProbe(tmp_path)
    (tmp_path / "latency.json").write_text(content.replace("%s", probe.machine_key) if "%s" in content else content)
    with caplog.at_level("WARNING", logger="onnx_lowrank"):
        probe = OrtProbe(tmp_path)  # it failed every latency-aware run ('list' object has no attribute 'get')
    assert "ignoring the latency cache" in caplog.text
    probe._memory["k"] = (1.0, 2.0)
    probe._save_disk()
    assert json.loads((tmp_path / "latency.json").read_text()) == {probe.machine_key: {"k": [1.0, 2.0]}}
