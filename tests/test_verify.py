"""Verification: metrics against hand-computed values, the gate, the CLI paths, the real digits model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_lowrank
from onnx_lowrank.cli import main
from onnx_lowrank.demo import DEMO_HOLDOUT, DEMO_MODEL
from onnx_lowrank.errors import CalibrationError, ModelError, UsageError, VerificationFailed
from onnx_lowrank.verify import VerifyConfig, compare, make_session, render_verification, verify_models
from models import matmul_model, run
from models_verify import scores_model, token_model

# --------------------------------------------------------------------------- metrics by hand


def test_metrics_match_hand_computed_values():
    y = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    z = np.array([[3.0, 4.0], [0.0, 1.0]], np.float32)
    m = compare("out", y, z, labels=np.array([1, 0]))
    assert m.max_abs_error == pytest.approx(1.0)
    assert m.rel_l2_error == pytest.approx(np.sqrt(2.0 / 26.0))  # ||[0,0,1,-1]|| / ||[3,4,1,0]||
    assert m.cosine_mean == pytest.approx(0.5) and m.cosine_min == pytest.approx(0.0)  # rows: 1 and 0
    assert m.top1_agreement == pytest.approx(0.5)  # argmax [1,0] vs [1,1]
    assert (m.accuracy_before, m.accuracy_after, m.accuracy_drop) == pytest.approx((1.0, 0.5, 0.5))
    # after: class 0 tp=0 fp=0 fn=1 -> F1 0; class 1 tp=1 fp=1 fn=0 -> 2/3; macro = 1/3
    assert (m.f1_before, m.f1_after) == pytest.approx((1.0, 1.0 / 3.0))
    assert m.measure("top1") == pytest.approx((1.0, 0.5, 0.5))
    assert m.measure("cosine") == pytest.approx((1.0, 0.5, 0.5))


def test_metrics_edge_cases():
    zero = np.zeros((2, 3), np.float32)
    m = compare("z", zero, zero)
    assert (m.cosine_min, m.rel_l2_error, m.max_abs_error) == (1.0, 0.0, 0.0)
    one_d = compare("v", np.array([1.0, 2.0]), np.array([1.0, 2.0]))
    assert one_d.top1_agreement is None and one_d.measure("top1") is None and one_d.measure("accuracy") is None


def test_batching_does_not_change_the_numbers():
    a, b = scores_model(), scores_model(noise=0.3)
    x = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 6, 50)
    whole = verify_models(a, b, calib=x, labels=labels, calib_batch=50)
    parts = verify_models(a, b, calib=x, labels=labels, calib_batch=7)
    assert whole.samples == parts.samples == 50
    for f in ("max_abs_error", "rel_l2_error", "cosine_mean", "cosine_min", "top1_agreement", "accuracy_after", "f1_after"):
        assert getattr(whole.outputs[0], f) == pytest.approx(getattr(parts.outputs[0], f), rel=1e-9)
    direct = compare("scores", run(a, {"x": x})[0], run(b, {"x": x})[0], labels)
    assert whole.outputs[0].to_dict() == pytest.approx(direct.to_dict())


# --------------------------------------------------------------------------- the gate


def test_default_metric_per_output_and_worst_counts():
    a, b = token_model(), token_model(noise=0.5)
    report = verify_models(a, b, input_shape="input_ids:3x5", samples=12, max_drop=0.5)
    by = {j.output: j for j in report.judged}
    assert by["logits"].metric == "top1" and by["hidden"].metric == "rel_l2"
    assert by["hidden"].drop == pytest.approx(0.0, abs=1e-9)  # the embedding is untouched
    assert report.worst.output == "logits" and report.synthetic and report.samples == 12
    assert report.passed == (by["logits"].drop <= 0.5)


def test_gate_output_judges_one_output_only():
    a, b = token_model(), token_model(noise=2.0)
    strict = verify_models(a, b, input_shape="input_ids:3x5", max_drop=0.0, gate_output="hidden")
    assert strict.passed and [j.output for j in strict.judged] == ["hidden"]
    assert "logits" in strict.not_judged
    assert not verify_models(a, b, input_shape="input_ids:3x5", max_drop=0.0).passed


def test_labels_make_accuracy_the_default_and_drop_is_checked():
    a, b = scores_model(), scores_model(noise=1.0)
    x = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
    labels = run(a, {"x": x})[0].argmax(1)  # the original is right on every sample
    report = verify_models(a, b, calib=x, labels=labels, max_drop=0.01)
    j = report.worst
    assert j.metric == "accuracy" and j.before == 1.0
    assert j.after == pytest.approx(np.mean(run(b, {"x": x})[0].argmax(1) == labels))
    assert j.drop == pytest.approx(1.0 - j.after) and j.drop > 0.01 and not report.passed
    with pytest.raises(VerificationFailed) as exc:
        report.check()
    # called from Python, the message names the keyword, not the flag
    assert exc.value.report is report and "accuracy drop" in str(exc.value) and "> max_drop 0.01" in str(exc.value)
    f1 = verify_models(a, b, calib=x, labels=labels, metric="f1", max_drop=1.0)
    assert f1.worst.metric == "f1" and f1.passed


@pytest.mark.parametrize("options,needle", [
    (dict(metric="accuracy"), "metric accuracy needs labels"),
    (dict(gate_output="nope"), "gate_output 'nope' is not an output"),
    (dict(metric="top1", gate_output="hidden", input_shape="input_ids:1x4"), "does not hold class scores"),
    (dict(max_drop=2.0), "max_drop must be a number in [0, 1]"),
    (dict(metric="mse"), "expected one of accuracy, f1, top1, cosine"),
    (dict(threads=0), "threads must be a positive integer"),
])
def test_gate_usage_errors(options, needle):
    options.setdefault("input_shape", "input_ids:1x4")
    with pytest.raises(UsageError) as exc:
        verify_models(token_model(), token_model(), **options)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_models_that_do_not_match_are_refused():
    with pytest.raises(ModelError, match="take different inputs"):
        verify_models(scores_model(), token_model(), samples=2)
    other = scores_model()
    other.graph.output[0].name = "renamed"
    other.graph.node[0].output[0] = "renamed"
    with pytest.raises(ModelError, match="'scores' of the original are missing"):
        verify_models(scores_model(), other, samples=2)
    half = scores_model()
    half.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    with pytest.raises(ModelError, match="input '.*' is float32 in the original and float16 in the compressed model"):
        verify_models(scores_model(), half, samples=2)


def test_out_of_range_ids_suggest_input_range():
    with pytest.raises(CalibrationError, match="input_range="):
        verify_models(token_model(vocab=10), token_model(vocab=10), input_shape="input_ids:2x3")
    ok = verify_models(token_model(vocab=10), token_model(vocab=10), input_shape="input_ids:2x3", input_range="input_ids:0,10")
    assert ok.passed and ok.worst.drop == pytest.approx(0.0, abs=1e-9)


def test_external_data_models_are_verified(tmp_path):
    src = tmp_path / "ext.onnx"
    onnx.save(matmul_model(k=128, n=96, r=8, batch_shape=("batch",)), str(src), save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)
    result = onnx_lowrank.compress(src, energy=0.99, min_params=0, rank_multiple=1, verify=VerifyConfig(samples=8, max_drop=1e-4, threads=1))
    assert result.verification.passed and result.verification.threads == 1
    # the factors of a model with external data are written as they are made (the pass's spill
    # file); the result's data files resolve both them and the input's untouched tensors
    from onnx_lowrank.runtime import session

    assert session(result.model, data=result.data).get_inputs()[0].name == "x"


def test_compress_refuses_a_failed_model_unless_keep_failed():
    m = scores_model(k=64, n=48)
    with pytest.raises(VerificationFailed) as exc:
        onnx_lowrank.compress(m, rank=1, min_params=0, verify={"samples": 16, "max_drop": 0.0})
    assert exc.value.result is not None and exc.value.result.totals.factorized == 1
    kept = onnx_lowrank.compress(m, rank=1, min_params=0, verify={"samples": 16, "max_drop": 0.0, "keep_failed": True})
    assert not kept.verification.passed
    assert kept.to_dict()["verification"]["passed"] is False
    with pytest.raises(UsageError, match="unknown key"):
        onnx_lowrank.compress(m, verify={"max_dorp": 0.1})
    with pytest.raises(UsageError, match="nothing to verify"):
        onnx_lowrank.compress(m, dry_run=True, verify={})


# --------------------------------------------------------------------------- command line


@pytest.fixture
def model_path(tmp_path) -> Path:
    p = tmp_path / "model.onnx"
    onnx.save(matmul_model(k=64, n=48, r=6, batch_shape=("batch",)), str(p))
    return p


@pytest.fixture
def calib_path(tmp_path, model_path) -> Path:
    x = np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32)
    p = tmp_path / "calib.npz"
    np.savez(p, x=x)
    return p


def test_cli_gate_passes_and_writes(model_path, calib_path, tmp_path, capsys):
    out, rep = tmp_path / "small.onnx", tmp_path / "r.json"
    argv = [str(model_path), "-o", str(out), "--min-params", "0", "--calib", str(calib_path), "--max-drop", "0.001", "--report", str(rep)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "verification: 40 samples from calib.npz" in text and "passed" in text
    doc = json.loads(rep.read_text())["verification"]
    assert doc["passed"] and doc["samples"] == 40 and doc["worst"]["metric"] == "rel_l2"  # output "y" is not named like class scores
    assert doc["config"]["calib"] == str(calib_path) and doc["config"]["max_drop"] == 0.001
    assert out.exists()


def test_cli_gate_fails_writes_nothing(model_path, calib_path, tmp_path, capsys):
    listing = sorted(tmp_path.iterdir())
    argv = [str(model_path), "-o", str(tmp_path / "small.onnx"), "--rank", "1", "--min-params", "0", "--calib", str(calib_path),
            "--max-drop", "0.01", "--report", str(tmp_path / "r.json")]
    assert main(argv) == 1
    cap = capsys.readouterr()
    assert "FAILED" in cap.out and "verification: 40 samples" in cap.out
    assert cap.err.count("\n") == 1 and "check failed:" in cap.err and "drop" in cap.err and "nothing written" in cap.err
    assert sorted(tmp_path.iterdir()) == listing


def test_cli_keep_failed_writes_and_still_exits_1(model_path, calib_path, tmp_path, capsys):
    out, rep = tmp_path / "small.onnx", tmp_path / "r.json"
    argv = [str(model_path), "-o", str(out), "--rank", "1", "--min-params", "0", "--calib", str(calib_path), "--max-drop", "0.01",
            "--keep-failed", "--report", str(rep), "-q"]
    assert main(argv) == 1
    cap = capsys.readouterr()
    assert out.exists() and json.loads(rep.read_text())["verification"]["passed"] is False
    assert "wrote the model anyway" in cap.err and cap.err.count("\n") == 1


def test_cli_without_verification_flags_is_unchanged(model_path, tmp_path, capsys):
    assert main([str(model_path), "-o", str(tmp_path / "o.onnx"), "--min-params", "0"]) == 0
    cap = capsys.readouterr()
    assert "not verified" in cap.out and cap.err == ""
    assert main([str(model_path), "--dry-run", "--min-params", "0"]) == 0
    assert "not verified" not in capsys.readouterr().out


def test_cli_verify_flag_uses_random_inputs_and_warns(model_path, tmp_path, capsys):
    assert main([str(model_path), "-o", str(tmp_path / "o.onnx"), "--min-params", "0", "--verify", "--samples", "8", "--threads", "1"]) == 0
    cap = capsys.readouterr()
    assert "8 samples from random inputs" in cap.out
    assert cap.err.startswith("onnx-lowrank: warning:") and "not task accuracy" in cap.err


def test_verify_subcommand_exit_codes(model_path, calib_path, tmp_path, capsys):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    assert main([str(model_path), "-o", str(good), "--min-params", "0", "-q"]) == 0
    assert main([str(model_path), "-o", str(bad), "--rank", "1", "--min-params", "0", "-q"]) == 0
    capsys.readouterr()
    assert main(["verify", str(model_path), str(good), "--calib", str(calib_path), "--max-drop", "0.001"]) == 0
    assert "check passed" in capsys.readouterr().out
    rep = tmp_path / "v.json"
    assert main(["verify", str(model_path), str(bad), "--calib", str(calib_path), "--max-drop", "0.01", "--report", str(rep)]) == 1
    cap = capsys.readouterr()
    assert "check FAILED" in cap.out and cap.err.count("\n") == 1 and "check failed" in cap.err
    assert json.loads(rep.read_text())["verification"]["passed"] is False
    assert main(["verify", str(model_path), str(bad), "--calib", str(calib_path), "--metric", "accuracy"]) == 2
    assert main(["verify", str(model_path)]) == 2
    assert main(["verify", str(model_path), str(bad), "--keep-failed"]) == 2
    assert "writes none" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # (verify's help lists no option it always refuses)
        main(["verify", "--help"])
    assert "--keep-failed" not in capsys.readouterr().out


CLI_BAD = [
    (["--calib", "{d}/missing.npz"], "no such file"),
    (["--calib", "{wrong}"], "unknown input(s) 'y'"),
    (["--calib", "{empty}"], "file is empty"),
    (["--calib", "{none}"], "no .npz files"),
    (["--calib", "{calib}", "--labels", "{labels}"], "3 class ids"),
    (["--calib-script", "{script}:feeds"], "raised RuntimeError: broken"),
    (["--calib-script", "{d}/calib.py"], "FILE.py:FUNCTION"),
    (["--input-shape", "x:1x2x3"], "--input-shape x"),
    (["--input-range", "x:5,1"], "LOW must be below HIGH"),
    (["--max-drop", "5"], "--max-drop"),
    (["--metric", "accuracy"], "needs labels"),
    (["--gate-output", "nope"], "not an output"),
    (["--calib", "{calib}", "--calib-script", "{script}:feeds"], "not allowed with"),
    (["--calib", "{calib}", "--dry-run"], "nothing to verify"),
    (["--calib", "{calib}", "--samples", "8"], "drop --samples"),  # (the data's samples, not random ones)
    (["--calib-script", "{script}:feeds", "--calib-batch", "4"], "drop --calib-batch"),  # (a script's feeds come as given)
    (["--calib", "{d}", "--calib-batch", "4"], "gives one feed per .npz file as it is"),  # (and a folder's)
]


@pytest.mark.parametrize("extra,needle", CLI_BAD)
def test_cli_bad_calibration_input(extra, needle, model_path, calib_path, tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    np.savez(d / "wrong.npz", y=np.zeros((2, 64), np.float32))
    (d / "empty.npz").write_bytes(b"")
    np.save(d / "labels.npy", np.zeros(3, np.int64))
    (d / "calib.py").write_text("def feeds():\n    raise RuntimeError('broken')\n")
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    fmt = {"d": d, "none": empty_dir, "wrong": d / "wrong.npz", "empty": d / "empty.npz", "calib": calib_path,
           "labels": d / "labels.npy", "script": d / "calib.py"}
    listing = sorted(tmp_path.rglob("*"))
    model_bytes = model_path.read_bytes()
    argv = [str(model_path), "-o", str(tmp_path / "o.onnx"), "--min-params", "0", *[a.format(**fmt) for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == listing and model_path.read_bytes() == model_bytes


# --------------------------------------------------------------------------- the real digits model


def test_digits_end_to_end_with_labels(tmp_path):
    held = np.load(DEMO_HOLDOUT)
    logits = run(onnx.load(str(DEMO_MODEL)), {"pixels": held["pixels"]})[0]
    expected_before = float(np.mean(logits.argmax(1) == held["labels"]))

    result = onnx_lowrank.compress(DEMO_MODEL, energy=0.93, verify=VerifyConfig(calib=DEMO_HOLDOUT, max_drop=0.02, calib_batch=100))
    check = result.verification
    m = check.outputs[0]
    assert check.passed and check.labels and check.samples == len(held["labels"]) == 540
    assert m.name == "logits" and m.accuracy_before == pytest.approx(expected_before) and m.accuracy_before > 0.95
    assert check.worst.metric == "accuracy" and check.worst.drop <= 0.02
    assert "accuracy" in render_verification(check) and "macro-F1" in render_verification(check)

    with pytest.raises(VerificationFailed) as exc:
        onnx_lowrank.compress(DEMO_MODEL, rank=2, verify=VerifyConfig(calib=DEMO_HOLDOUT, max_drop=0.02))
    assert exc.value.report.worst.drop > 0.02


def test_digits_cli_and_verify_subcommand(tmp_path, capsys):
    out = tmp_path / "small.onnx"
    assert main([str(DEMO_MODEL), "-o", str(out), "--energy", "0.93", "--calib", str(DEMO_HOLDOUT), "--max-drop", "0.02",
                 "--metric", "f1", "-q"]) == 0
    assert "check passed: f1 drop" in capsys.readouterr().out
    assert main(["verify", str(DEMO_MODEL), str(out), "--calib", str(DEMO_HOLDOUT), "--gate-output", "logits", "--max-drop", "0.02"]) == 0
    assert "with labels" in capsys.readouterr().out


def test_unlabelled_embedding_output_is_judged_by_rel_l2_not_argmax():
    def renamed(model, name):
        model.graph.node[0].output[0] = name
        model.graph.output[0].name = name
        return model

    a, b = renamed(scores_model(n=32), "sentence_embedding"), renamed(scores_model(n=32, noise=0.3), "sentence_embedding")
    report = verify_models(a, b, input_shape="x:4x16", samples=8, max_drop=1.0)
    assert report.outputs[0].top1_agreement is not None  # still measured and reported
    assert report.judged[0].metric == "rel_l2"


# --------------------------------------------------------------------------- outputs a cosine cannot see

#   x[N,16] --MatMul(W[16,1])--> y[N,1]  (one value per sample: a regression head)
def _scalar_head(scale: float = 1.0, name: str = "y"):
    from models import make_model, vi, init
    from onnx import helper

    w = (np.random.default_rng(3).standard_normal((16, 1)) * scale).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "W"], [name])], [vi("x", ["N", 16])], [vi(name, ["N", 1])], [init("W", w)])


@pytest.mark.parametrize("error", [0.10, 0.59, 6.77])
def test_default_gate_catches_a_relative_error_on_one_value_per_sample(error):
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    report = verify_models(_scalar_head(), _scalar_head(1.0 + error), calib=x, max_drop=0.01)
    j = report.worst
    assert j.metric == "rel_l2" and j.drop == pytest.approx(error, rel=1e-4) and not report.passed
    assert "rel_l2" in j.why or "default" in j.why
    # the blindness the default avoids: each sample's cosine is +-1, so cosine sees nothing
    blind = verify_models(_scalar_head(), _scalar_head(1.0 + error), calib=x, max_drop=0.01, metric="cosine")
    assert blind.passed and blind.worst.drop == pytest.approx(0.0, abs=1e-6)


def test_default_gate_catches_a_ten_percent_change_of_scale_on_vectors():
    a, b = scores_model(), scores_model()
    b.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(a.graph.initializer[0]) * 1.1,
                                                                  a.graph.initializer[0].name))
    x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
    renamed = []
    for m in (a, b):
        m.graph.node[0].output[0] = m.graph.output[0].name = "embedding"
        renamed.append(m)
    report = verify_models(*renamed, calib=x, max_drop=0.01)
    assert report.worst.metric == "rel_l2" and report.worst.drop == pytest.approx(0.1, rel=1e-3) and not report.passed
    assert verify_models(*renamed, calib=x, max_drop=0.01, metric="cosine").passed


def test_cosine_judgements_carry_the_worst_sample():
    a, b = scores_model(), scores_model(noise=0.3)
    report = verify_models(a, b, input_shape="x:4x16", samples=16, metric="cosine")
    j = report.worst
    assert j.cosine_min == pytest.approx(report.outputs[0].cosine_min) and j.cosine_min <= j.after
    assert f"min {j.cosine_min:.4f}" in report.summary() and f"min {j.cosine_min:.4f}" in render_verification(report)
    assert report.to_dict()["worst"]["cosine_min"] == pytest.approx(j.cosine_min)


def test_max_abs_is_gated_in_the_outputs_units():
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    a, b = _scalar_head(), _scalar_head(1.5)
    m = verify_models(a, b, calib=x).outputs[0]
    assert verify_models(a, b, calib=x, metric="max_abs", max_drop=m.max_abs_error * 1.01).passed
    assert not verify_models(a, b, calib=x, metric="max_abs", max_drop=m.max_abs_error * 0.99).passed
    with pytest.raises(UsageError, match="only --metric max_abs takes larger limits|only"):
        verify_models(a, b, calib=x, metric="rel_l2", max_drop=1.5)


def test_cli_scalar_regression_head_under_the_default_gate_writes_nothing(tmp_path, capsys):
    from models import lowrank, make_model, vi, init
    from onnx import helper

    # x[N,64] --MatMul(W1[64,64])--> h --MatMul(W2[64,1])--> y[N,1]; W1 truncated at rank 2 is far off
    w1 = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    w2 = np.random.default_rng(2).standard_normal((64, 1)).astype(np.float32)
    m = make_model([helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["y"])],
                   [vi("x", ["N", 64])], [vi("y", ["N", 1])], [init("W1", w1), init("W2", w2)])
    src = tmp_path / "reg.onnx"
    onnx.save(m, str(src))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32))
    out = tmp_path / "out"
    out.mkdir()
    assert main([str(src), "-o", str(out / "o.onnx"), "--rank", "2", "--min-params", "0", "--calib", str(tmp_path / "c.npz"),
                 "--max-drop", "0.01"]) == 1
    cap = capsys.readouterr()
    assert "rel_l2" in cap.err and "nothing written" in cap.err and list(out.iterdir()) == []
    assert "[default: sees any change" in cap.out


def test_nan_from_the_compressed_model_fails_the_check_with_or_without_a_gate(tmp_path, capsys):
    from onnx import numpy_helper

    original = matmul_model(k=16, n=8, r=4, batch_shape=("N",))
    broken = onnx.ModelProto()
    broken.CopyFrom(original)
    w = numpy_helper.to_array(broken.graph.initializer[0]).copy()
    w[0, 0] = np.nan
    broken.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, broken.graph.initializer[0].name))
    calib = {"x": np.random.default_rng(0).standard_normal((12, 16)).astype(np.float32)}
    for metric in (None, "cosine", "max_abs"):
        report = verify_models(original, broken, calib=calib, metric=metric)
        assert not report.passed and "NaN or Inf" in report.summary()
        assert "FAILED: the compressed model's output holds NaN or Inf" in render_verification(report)
        assert report.outputs[0].max_abs_error != report.outputs[0].max_abs_error  # NaN, not the 0 max() kept
        with pytest.raises(VerificationFailed):
            report.check()
    onnx.save(original, str(tmp_path / "a.onnx"))
    onnx.save(broken, str(tmp_path / "b.onnx"))
    np.savez(tmp_path / "c.npz", **calib)
    assert main(["verify", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--calib", str(tmp_path / "c.npz"), "-q"]) == 1
    assert "NaN or Inf" in capsys.readouterr().err


def test_integer_outputs_are_judged_by_agreement_and_labels_must_be_class_indices():
    from onnx import TensorProto, helper

    from models import init, make_model, vi

    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 5)).astype(np.float32)

    def classifier(weight):
        return make_model([helper.make_node("MatMul", ["x", "W"], ["scores"]),
                           helper.make_node("ArgMax", ["scores"], ["cls"], axis=1, keepdims=0)],
                          [vi("x", ["N", 16])], [vi("scores", ["N", 5]), vi("cls", ["N"], TensorProto.INT64)], [init("W", weight)])

    x = rng.standard_normal((40, 16)).astype(np.float32)
    other = w + 0.6 * rng.standard_normal(w.shape).astype(np.float32)
    ids_a, ids_b = (run(classifier(v), {"x": x})[1] for v in (w, other))
    share = float(np.mean(ids_a == ids_b))
    assert share < 1.0
    report = verify_models(classifier(w), classifier(other), calib={"x": x})
    cls = next(j for j in report.judged if j.output == "cls")
    assert cls.metric == "top1" and cls.after == pytest.approx(share)  # the share of ids that match, not a cosine of ids
    report = verify_models(classifier(w), classifier(other), calib={"x": x}, metric="cosine")
    assert [j.output for j in report.judged] == ["scores"] and "judged by agreement" in report.not_judged["cls"]
    with pytest.raises(UsageError, match="integer output"):
        verify_models(classifier(w), classifier(other), calib={"x": x}, metric="cosine", gate_output="cls")
    # labels must index the classes: 1-based ids or another file are refused, not scored as 0 % twice
    for bad in (np.full(40, 5), np.full(40, -1)):
        with pytest.raises(CalibrationError, match="outside the class indices"):
            verify_models(classifier(w), classifier(other), calib={"x": x}, labels=bad)
    report = verify_models(classifier(w), classifier(other), calib={"x": x}, labels=ids_a)
    assert next(j for j in report.judged if j.output == "scores").metric == "accuracy"


def test_config_arguments_of_the_wrong_kind_are_usage_errors():
    m = matmul_model(k=16, n=8, r=4, batch_shape=("N",))
    with pytest.raises(UsageError, match="config= takes a VerifyConfig, got a dict"):
        verify_models(m, m, {"samples": 4})
    with pytest.raises(UsageError, match="unknown option energy="):
        verify_models(m, m, energy=0.9)
    with pytest.raises(UsageError, match="config= takes a CompressConfig, got a dict"):
        onnx_lowrank.compress(m, {"energy": 0.9})
    with pytest.raises(UsageError, match="recipe='balanced'"):
        onnx_lowrank.compress(m, "balanced")


def test_calibration_data_nothing_else_reads_is_the_checks():
    m = matmul_model(k=16, n=8, r=4, batch_shape=("N",))
    calib = {"x": np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)}
    res = onnx_lowrank.compress(m, calib=calib, min_params=0, rank=2)
    assert res.verification is not None and res.verification.samples == 6
    res = onnx_lowrank.compress(m, calib=calib, min_params=0, rank=2, data_aware=True)  # read by the statistics: no check asked
    assert res.verification is None and "data_aware" in res.sections


def test_an_accuracy_goal_without_labels_asks_for_labels():
    from models_verify import scores_model as _scores

    m = _scores() if callable(_scores) else None
    calib = {m.graph.input[0].name: np.random.default_rng(0).standard_normal(
        (20, *[d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]])).astype(np.float32)}
    with pytest.raises(UsageError, match="metric accuracy needs labels"):  # (it said no output holds class scores)
        onnx_lowrank.compress(m, adaptive=True, metric="accuracy", max_drop=0.05, calib=calib, min_params=0)


def test_verify_without_data_of_its_own_checks_on_the_runs_calibration_data(tmp_path):
    """compress(calib=..., verify={}) checks on that data, as --calib does on the command line; a
    generator, used up by the run, leaves the check on random inputs."""
    import onnx_lowrank as ol
    from test_rank_selection import anisotropic, chain_model

    x = anisotropic(64, 96, seed=3)
    npz = tmp_path / "c.npz"
    np.savez(npz, x=x)
    for calib in ([{"x": x}], {"x": x}, str(npz)):
        res = ol.compress(chain_model(), data_aware=True, rank=8, min_params=0, calib=calib, verify={})
        assert res.verification.source != "random inputs" and res.verification.samples == 64, (calib, res.verification.source)
    gen = ol.compress(chain_model(), data_aware=True, rank=8, min_params=0, calib=({"x": x} for _ in range(1)), verify={})
    assert gen.verification.source == "random inputs"


def test_verify_reuse_keeps_the_batch_and_says_when_the_data_was_read_once(caplog):
    import logging

    import onnx_lowrank as ol
    from test_rank_selection import anisotropic, chain_model

    x = anisotropic(64, 96, seed=3)
    res = ol.compress(chain_model(), data_aware=True, rank=8, min_params=0, calib={"x": x}, calib_batch=16, verify={})
    assert res.verification.samples == 64 and res.verification.config["calib_batch"] == 16
    with caplog.at_level(logging.WARNING, logger="onnx_lowrank"):
        ol.compress(chain_model(), data_aware=True, rank=8, min_params=0, calib=({"x": x} for _ in range(1)), verify={})
    assert any("calib= can be read only once" in r.getMessage() for r in caplog.records)
    with pytest.raises(Exception) as exc:  # not iterable: the loader's own clear error, not a TypeError from the reuse check
        ol.compress(chain_model(), data_aware=True, rank=8, min_params=0, calib=np.array(5.0), verify={})
    assert not isinstance(exc.value, TypeError)
