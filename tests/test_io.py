"""External data, atomic writes, and inputs that are never modified."""

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import onnx_lowrank as ol
from onnx_lowrank import io
from models import data_files, init, lowrank, make_model, run, vi


#   x[2,64] --MatMul(W1)--> h --Add(bias)--> y ; W1 factorizable, bias large but untouched
def _two_weight_model():
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm"), helper.make_node("Add", ["h", "big"], ["y"], name="add")]
    return make_model(nodes, [vi("x", [2, 64])], [vi("y", [2, 64])],
                      [init("W1", lowrank(64, 64, 4)), init("big", np.arange(2 * 64, dtype=np.float32).reshape(2, 64))])


def _save_external(model, path: Path):
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".weights", size_threshold=0)


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_external_data_round_trip_into_another_directory(tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out" / "deeper"
    src.mkdir()
    dst.mkdir(parents=True)
    model = _two_weight_model()
    _save_external(_two_weight_model(), src / "model.onnx")  # onnx.save mutates what it saves
    before = _digest(src)

    res = ol.compress(src / "model.onnx", energy=1.0, min_params=0)
    written = res.save(dst / "small.onnx")
    assert written == [dst / "small.onnx", *data_files(dst, "small.onnx")] and len(written) == 2
    assert _digest(src) == before, "the input folder must not change"
    # every tensor of the output points at the output's own data file
    out = onnx.load(str(dst / "small.onnx"), load_external_data=False)
    locs = {e.value for t in out.graph.initializer for e in t.external_data if e.key == "location"}
    assert locs == {written[1].name}
    onnx.checker.check_model(str(dst / "small.onnx"), full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    full = onnx.load(str(dst / "small.onnx"))
    np.testing.assert_allclose(run(full, {"x": x})[0], run(model, {"x": x})[0], atol=1e-4)
    # the input copy can be moved away: the output does not depend on it
    for p in src.iterdir():
        p.unlink()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(dst / "small.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], run(model, {"x": x})[0], atol=1e-4)


def test_result_model_is_unchanged_by_save(tmp_path):
    _save_external(_two_weight_model(), tmp_path / "m.onnx")
    res = ol.compress(tmp_path / "m.onnx", energy=1.0, min_params=0)
    snapshot = res.model.SerializeToString()
    a = res.save(tmp_path / "a.onnx")
    assert res.model.SerializeToString() == snapshot
    b = res.save(tmp_path / "b.onnx")  # and saving twice works
    assert b[1].read_bytes() == a[1].read_bytes() and b[1].name.startswith("b.onnx.")


def test_large_output_goes_external(tmp_path, monkeypatch):
    # Stand-in for a > 2 GiB model: lower the limit instead of writing gigabytes in a unit test.
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 1000)
    res = ol.compress(_two_weight_model(), energy=1.0, min_params=0)
    written = res.save(tmp_path / "o.onnx")
    assert len(written) == 2
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)


def test_inline_model_stays_inline(tmp_path):
    res = ol.compress(_two_weight_model(), energy=1.0, min_params=0)
    assert [p.name for p in res.save(tmp_path / "o.onnx")] == ["o.onnx"]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    res = ol.compress(_two_weight_model(), energy=1.0, min_params=0)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "replace", boom)
    with pytest.raises(OSError):
        res.save(tmp_path / "o.onnx")
    assert list(tmp_path.iterdir()) == []


def test_missing_external_file_is_a_clear_error(tmp_path):
    _save_external(_two_weight_model(), tmp_path / "m.onnx")
    (tmp_path / "m.onnx.weights").unlink()
    with pytest.raises(ol.ModelError, match="external data file 'm.onnx.weights'.*missing"):
        ol.compress(tmp_path / "m.onnx")


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"\x08\x07\x12garbage\xff\xff", "ONNX"), (b"hello world, not a model", "ONNX")])
def test_bad_files(tmp_path, content, match):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(ol.ModelError, match=match):
        ol.compress(p)


def test_truncated_file(tmp_path):
    full = _two_weight_model().SerializeToString()
    p = tmp_path / "t.onnx"
    p.write_bytes(full[: len(full) // 2])
    with pytest.raises(ol.ModelError):
        ol.compress(p)


def test_model_size_on_disk_counts_external_data(tmp_path):
    _save_external(_two_weight_model(), tmp_path / "m.onnx")
    total = io.model_size_on_disk(tmp_path / "m.onnx")
    assert total == (tmp_path / "m.onnx").stat().st_size + (tmp_path / "m.onnx.weights").stat().st_size
    assert os.path.getsize(tmp_path / "m.onnx") < total


def test_an_output_never_touches_input_data_named_like_its_own(tmp_path):
    m = _two_weight_model()
    # the input's data carries the output's legacy name, then a name of the output's own pattern
    for location in ("b.onnx.data", "b.onnx.0123456789abcdef.data"):
        for p in tmp_path.iterdir():
            p.unlink()
        onnx.save(_two_weight_model(), str(tmp_path / "a.onnx"), save_as_external_data=True, location=location, size_threshold=0)
        before = _digest(tmp_path)
        res = ol.compress(tmp_path / "a.onnx", energy=1.0, min_params=0)
        written = res.save(tmp_path / "b.onnx")
        after = _digest(tmp_path)
        assert {k: after[k] for k in before} == before, "the input's files must be left as they were"
        assert set(after) == set(before) | {p.name for p in written}
        x = np.ones((2, 64), np.float32)
        np.testing.assert_allclose(run(onnx.load(str(written[0])), {"x": x})[0], run(m, {"x": x})[0], atol=1e-4)


def test_output_files_get_the_usual_mode_not_mkstemps_0600(tmp_path):
    _save_external(_two_weight_model(), tmp_path / "m.onnx")
    umask = os.umask(0o022)
    try:
        written = ol.compress(tmp_path / "m.onnx", energy=1.0, min_params=0).save(tmp_path / "o.onnx")
    finally:
        os.umask(umask)
    assert [oct(p.stat().st_mode & 0o777) for p in written] == [oct(0o644)] * 2
