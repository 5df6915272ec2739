"""The bench command and API: feeds, statistics, interleaving, JSON, profiles.

Nothing here asserts a timing: the machine is shared and noisy.  Ratios are checked with a
fake clock; real runs are checked for structure only.
"""

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from models import init, lowrank, make_model, vi
from onnx_lowrank import bench as B
from onnx_lowrank.cli import main
from onnx_lowrank.errors import UsageError


#   x[batch, 64] --MatMul(W1[64,48])--> h --Relu--> --MatMul(W2[48,32])--> y[batch, 32]
def mlp(seed: int = 0, r1: int = 48) -> onnx.ModelProto:
    return make_model(
        [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
         helper.make_node("Relu", ["h"], ["a"], name="relu"),
         helper.make_node("MatMul", ["a", "W2"], ["y"], name="mm2")],
        [vi("x", ["batch", 64])], [vi("y", ["batch", 32])],
        [init("W1", lowrank(64, 48, r1, seed)), init("W2", lowrank(48, 32, 32, seed + 1))],
    )


#   ids[batch, seq] int64 --Cast--> f[batch, seq] --Unsqueeze--> [batch, seq, 1] --MatMul(W[1, 8])--> y
def seq_model() -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Cast", ["ids"], ["f"], to=onnx.TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["f", "axes"], ["u"]),
         helper.make_node("Add", ["u", "mask_f"], ["v"]),
         helper.make_node("MatMul", ["v", "W"], ["y"], name="mm")],
        [vi("ids", ["batch", "seq"], onnx.TensorProto.INT64), vi("attention_mask", ["batch", "seq"], onnx.TensorProto.INT64)],
        [vi("y", ["batch", "seq", 8])],
        [init("axes", np.array([2], np.int64)), init("W", np.ones((1, 8), np.float32)),
         init("mask_f", np.zeros((1,), np.float32))],
    )


@pytest.fixture
def paths(tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(mlp(), str(a))
    onnx.save(mlp(r1=4), str(b))
    return a, b


def test_parse_input_shapes_syntax():
    assert B.parse_input_shapes(["input_ids:1x128,attention_mask:1x128", "x:0:2x3"]) == {
        "input_ids": (1, 128), "attention_mask": (1, 128), "x:0": (2, 3)}
    assert B.parse_input_shapes(None) == {}
    for bad in ("input_ids", "input_ids:1xN", "x:0x4", ":4"):
        with pytest.raises(UsageError, match="input_shape"):
            B.parse_input_shapes(bad)


def test_resolve_shapes_batch_and_errors():
    m = seq_model()
    with pytest.raises(UsageError, match=r"input_shape='ids:1xN'"):
        B.resolve_shapes(m)
    shapes = B.resolve_shapes(m, batch=4, input_shape={"ids": (1, 16), "attention_mask": (1, 16)})
    assert shapes == {"ids": (4, 16), "attention_mask": (4, 16)}
    with pytest.raises(UsageError, match="does not take"):
        B.resolve_shapes(m, input_shape={"idz": (1, 16)})
    with pytest.raises(UsageError, match="axes"):
        B.resolve_shapes(mlp(), input_shape={"x": (1, 64, 1)})
    with pytest.raises(UsageError, match="fixed to 64"):
        B.resolve_shapes(mlp(), input_shape={"x": (1, 63)})
    assert B.resolve_shapes(mlp(), batch=7) == {"x": (7, 64)}


def test_random_feeds_dtypes_and_masks():
    m = seq_model()
    feeds = B.random_feeds(m, {"ids": (2, 5), "attention_mask": (2, 5)}, seed=3)
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].shape == (2, 5) and feeds["ids"].max() < 100
    assert (feeds["attention_mask"] == 1).all()
    again = B.random_feeds(m, {"ids": (2, 5), "attention_mask": (2, 5)}, seed=3)
    np.testing.assert_array_equal(feeds["ids"], again["ids"])


def test_time_interleaved_alternates_order_and_measures_each_call():
    clock = [0.0]
    order = []

    def call(name, cost):
        def run():
            order.append(name)
            clock[0] += cost
        return run

    times = B.time_interleaved([call("a", 2.0), call("b", 1.0)], runs=4, warmup=1, timer=lambda: clock[0])
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then A B, B A, ...
    assert times == [[2.0] * 4, [1.0] * 4]


def test_bench_two_models_ratio_from_paired_runs(paths, monkeypatch):
    # A fake clock makes a run of a.onnx cost 3 units and one of b.onnx 1 unit: the ratio must be 3.
    clock = [0.0]
    real_session = B.make_session

    class Costly:
        def __init__(self, model, threads):
            self.inner = real_session(model, threads)
            self.cost = 3.0 if str(model).endswith("a.onnx") else 1.0

        def get_outputs(self):
            return self.inner.get_outputs()

        def run(self, names, feeds):
            clock[0] += self.cost
            return self.inner.run(names, feeds)

    monkeypatch.setattr(B, "make_session", Costly)
    rep = B.bench([paths[0], paths[1]], runs=6, warmup=1, timer=lambda: clock[0])
    s = rep.settings[0]
    assert s.speedup == pytest.approx(3.0) and s.speedup_p10 == pytest.approx(3.0)
    assert [t.stats.p50_ms for t in s.timings] == [pytest.approx(3000.0), pytest.approx(1000.0)]
    assert rep.labels == ["a.onnx", "b.onnx"]


def test_bench_real_runs_structure(paths):
    rep = B.bench(list(paths), threads=(1, 2), batch=(1, 4), runs=3, warmup=1)
    assert [(s.threads, s.batch) for s in rep.settings] == [(1, 1), (1, 4), (2, 1), (2, 4)]
    for s in rep.settings:
        assert s.shapes == {"x": (s.batch, 64)}
        assert all(t.stats.runs == 3 and 0 < t.stats.min_ms <= t.stats.p50_ms <= t.stats.p90_ms for t in s.timings)
        assert s.speedup_p10 <= s.speedup <= s.speedup_p90
    doc = rep.to_dict()
    assert doc["machine"]["onnxruntime"] and doc["interleaved"] is True and len(doc["settings"]) == 4


def test_bench_rejects_models_with_different_inputs(paths, tmp_path):
    other = tmp_path / "seq.onnx"
    onnx.save(seq_model(), str(other))
    with pytest.raises(UsageError, match="different inputs"):
        B.bench([paths[0], other], runs=1, warmup=0)


def test_cli_bench_output_and_json(paths, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(paths[0]), str(paths[1]), "--runs", "4", "--warmup", "1", "--batch", "2",
                 "--threads", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime" in text and "p50 ms" in text and "p90 ms" in text and "mean ms" in text
    assert "threads 1, batch 2: x[2x64]" in text
    assert "speed-up of b.onnx over a.onnx: x" in text and "median of 4 paired runs" in text
    doc = json.loads(out.read_text())
    assert doc["runs"] == 4 and doc["warmup"] == 1 and doc["models"] == ["a.onnx", "b.onnx"]
    s = doc["settings"][0]
    assert s["threads"] == 1 and s["batch"] == 2 and s["shapes"] == {"x": [2, 64]}
    assert [m["label"] for m in s["models"]] == ["a.onnx", "b.onnx"] and s["speedup"] > 0
    assert {"p50_ms", "p90_ms", "mean_ms", "runs"} <= set(s["models"][0])


def test_cli_bench_profile_lines_up_layers(tmp_path, capsys):
    from onnx_lowrank import compress

    src, small = tmp_path / "a.onnx", tmp_path / "small.onnx"
    onnx.save(mlp(r1=4), str(src))
    compress(src, rank=4, min_params=0).save(small)
    assert main(["bench", str(src), str(small), "--runs", "2", "--warmup", "0", "--profile"]) == 0
    text = capsys.readouterr().out
    assert "where the time goes" in text and "MatMul" in text
    # the factor nodes mm1__lowrank_1/2 are summed under the original layer name
    layer_rows = [line.split() for line in text.splitlines() if line.strip().startswith("mm1")]
    assert layer_rows and len(layer_rows[0]) == 3


def test_cli_bench_usage_errors(paths, tmp_path, capsys):
    seq = tmp_path / "seq.onnx"
    onnx.save(seq_model(), str(seq))
    assert main(["bench", str(seq), "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert "--input-shape ids:1xN" in err and "Traceback" not in err
    assert main(["bench", str(paths[0]), "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "missing.onnx")]) == 2
    assert main(["bench", str(paths[0]), "--json", str(tmp_path / "no" / "x.json"), "--runs", "1"]) == 2
    assert not (tmp_path / "no").exists()


def test_cli_bench_dynamic_sequence(tmp_path, capsys):
    seq = tmp_path / "seq.onnx"
    onnx.save(seq_model(), str(seq))
    assert main(["bench", str(seq), "--runs", "2", "--warmup", "0", "--batch", "3",
                 "--input-shape", "ids:1x16", "--input-shape", "attention_mask:1x16"]) == 0
    assert "ids[3x16], attention_mask[3x16]" in capsys.readouterr().out


def test_layer_key_groups_factor_and_quantized_nodes():
    assert B.layer_key("/0/Gemm__lowrank_1") == "/0/Gemm"
    assert B.layer_key("fused /0/Gemm__lowrank_2") == "/0/Gemm"
    assert B.layer_key("/0/Gemm__lowrank_1_MatMul_quant") == "/0/Gemm"
    assert B.layer_key("/layer.0/attention/MatMul_quant") == "/layer.0/attention/MatMul"
    assert B.layer_key("Relu_3") == "Relu_3"


def test_parse_profile_drops_first_run(tmp_path):
    def node(name, op, ts, dur):
        return {"cat": "Node", "name": f"{name}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [
        {"cat": "Session", "name": "model_run", "ts": 0, "dur": 100},
        node("mm1__lowrank_1", "MatMul", 10, 90),  # first run: dropped
        {"cat": "Session", "name": "model_run", "ts": 200, "dur": 100},
        node("mm1__lowrank_1", "MatMul", 210, 10), node("mm1__lowrank_2", "MatMul", 230, 6), node("relu", "Relu", 240, 2),
        {"cat": "Session", "name": "model_run", "ts": 400, "dur": 100},
        node("mm1__lowrank_1", "MatMul", 410, 14), node("mm1__lowrank_2", "MatMul", 430, 6), node("relu", "Relu", 440, 4),
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(events))
    prof = B.parse_profile(path, "m", 1)
    assert prof.runs == 2
    assert prof.layers == {"mm1": pytest.approx(18.0), "relu": pytest.approx(3.0)}
    assert prof.op_types == {"MatMul": pytest.approx(18.0), "Relu": pytest.approx(3.0)}
    assert prof.nodes[0].name == "mm1__lowrank_1" and prof.nodes[0].mean_us == pytest.approx(12.0)


def test_resolve_shapes_carries_a_named_axis_to_the_other_inputs():
    # input_ids and attention_mask share 'seq': giving one shape is enough, as in verification
    shapes = B.resolve_shapes(seq_model(), input_shape={"ids": (2, 7)})
    assert shapes == {"ids": (2, 7), "attention_mask": (2, 7)}


def test_bench_arguments_are_checked_up_front():
    import numpy as np

    from onnx_lowrank.bench import bench
    from onnx_lowrank.errors import UsageError
    from models import matmul_model

    m = matmul_model(k=16, n=8, r=2, batch_shape=("N",))
    with pytest.raises(UsageError, match="1 label.* for 2 model"):  # (it timed both, then lost one and crashed rendering)
        bench([m, m], labels=["dense"], runs=2, warmup=1)
    for bad, match in ((dict(runs=2.5), "runs must be an integer"), (dict(runs=None), "runs must be an integer"),
                       (dict(threads=1.5), "threads must be an integer"), (dict(seed="a"), "seed must be an integer")):
        with pytest.raises(UsageError, match=match):
            bench(m, warmup=1, **({"runs": 2} | bad))
    with pytest.raises(UsageError, match="got no model"):
        bench(None)
    report = bench((x for x in (m, m)), threads=np.int64(1), batch="2", runs=2, warmup=1)  # any iterable, numpy ints, "1,2" text
    assert report.to_dict()["models"] == ["model0", "model1"]


def test_the_second_model_must_take_the_shapes_the_first_runs_with():
    from onnx_lowrank.bench import bench
    from onnx_lowrank.errors import UsageError
    from models import matmul_model

    dynamic, fixed = matmul_model(k=16, n=8, r=2, batch_shape=("N",)), matmul_model(k=16, n=8, r=2, batch_shape=(1,))
    with pytest.raises(UsageError, match="model1 cannot take the inputs model0 runs with .*axis 0 is fixed to 1"):
        bench([dynamic, fixed], batch=4, runs=2, warmup=1)  # (it failed inside onnxruntime, the message cut off)
