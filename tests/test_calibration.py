"""Calibration data: every source format, synthesis, and each kind of bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_lowrank.calibration import (
    DEFAULT_INT_RANGE,
    iter_feeds,
    load_calibration,
    model_inputs,
    parse_input_ranges,
    parse_input_shapes,
)
from onnx_lowrank.errors import CalibrationError, UsageError
from models_verify import scores_model, token_model


def shapes(data) -> list[tuple[int, ...]]:
    return [f["x"].shape for f in data]


@pytest.fixture
def model():
    return scores_model(k=16, n=6)


@pytest.fixture
def x10():
    return np.random.default_rng(3).standard_normal((10, 16)).astype(np.float32)


# --------------------------------------------------------------------------- formats

def test_npz_is_cut_into_batches_and_reread_on_every_pass(model, x10, tmp_path):
    p = tmp_path / "calib.npz"
    np.savez(p, x=x10, labels=np.arange(10) % 6)
    data = load_calibration(model, p, calib_batch=4)
    assert data.samples == 10 and not data.synthetic
    assert shapes(data) == [(4, 16), (4, 16), (2, 16)]
    np.testing.assert_array_equal(data.labels, np.arange(10) % 6)
    first, second = list(data), list(data)
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in second]), x10)
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(first, second))


def test_npz_float64_is_cast_within_its_kind(model, x10, tmp_path):
    np.savez(tmp_path / "c.npz", x=x10.astype(np.float64))
    (feed,) = load_calibration(model, tmp_path / "c.npz", calib_batch=32)
    assert feed["x"].dtype == np.float32


def test_labels_file_overrides_npz_labels(model, x10, tmp_path):
    np.savez(tmp_path / "c.npz", x=x10, labels=np.zeros(10, np.int64))
    np.save(tmp_path / "l.npy", np.ones(10, np.int64))
    data = load_calibration(model, tmp_path / "c.npz", labels=tmp_path / "l.npy")
    assert data.labels.tolist() == [1] * 10


def test_directory_gives_one_feed_per_file_in_name_order(model, x10, tmp_path):
    d = tmp_path / "feeds"
    d.mkdir()
    np.savez(d / "b.npz", x=x10[3:], labels=np.full(7, 2))
    np.savez(d / "a.npz", x=x10[:3], labels=np.full(3, 1))
    (d / "notes.txt").write_text("ignored")
    data = load_calibration(model, d)
    assert data.samples == 10 and shapes(data) == [(3, 16), (7, 16)]
    assert data.labels.tolist() == [1] * 3 + [2] * 7
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in data]), x10)


def test_script_is_called_on_every_pass(model, tmp_path):
    script = tmp_path / "calib.py"
    script.write_text(
        "import numpy as np\n"
        "calls = []\n"
        "def feeds():\n"
        "    calls.append(1)\n"
        "    for i in range(3):\n"
        "        yield {'x': np.full((2, 16), float(i), np.float32)}\n"
    )
    data = load_calibration(model, calib_script=f"{script}:feeds")
    assert shapes(data) == [(2, 16)] * 3
    assert [float(f["x"][0, 0]) for f in data] == [0.0, 1.0, 2.0]


class Reader:
    """The onnxruntime CalibrationDataReader protocol, duck-typed."""

    def __init__(self, feeds, rewindable=True):
        self.feeds = feeds
        self.pos = 0
        if rewindable:
            self.rewind = lambda: setattr(self, "pos", 0)

    def get_next(self):
        if self.pos >= len(self.feeds):
            return None
        self.pos += 1
        return self.feeds[self.pos - 1]


def test_calibration_data_reader_is_rewound_between_passes(model, x10):
    data = load_calibration(model, Reader([{"x": x10[:4]}, {"x": x10[4:]}]))
    assert shapes(data) == [(4, 16), (6, 16)]
    assert shapes(data) == [(4, 16), (6, 16)]


def test_reader_without_rewind_is_read_once(model, x10):
    data = load_calibration(model, Reader([{"x": x10}], rewindable=False))
    assert shapes(data) == [(10, 16)]
    with pytest.raises(CalibrationError, match="no rewind"):
        list(data)


def test_list_of_feeds_rereads_and_generator_reads_once(model, x10):
    assert shapes(load_calibration(model, [{"x": x10[:5]}, {"x": x10[5:]}])) == [(5, 16), (5, 16)]
    gen = load_calibration(model, ({"x": x10[i:i + 5]} for i in (0, 5)))
    assert shapes(gen) == [(5, 16), (5, 16)]
    with pytest.raises(CalibrationError, match="read once already"):
        list(gen)


def test_array_and_dict_of_arrays_are_cut_like_an_npz(model, x10):
    assert shapes(load_calibration(model, x10, calib_batch=6)) == [(6, 16), (4, 16)]
    assert shapes(load_calibration(model, {"x": x10}, calib_batch=5)) == [(5, 16), (5, 16)]
    assert [f["x"].shape for f in iter_feeds(model, x10, calib_batch=10)] == [(10, 16)]


def test_model_inputs_skip_initializers_listed_as_inputs():
    m = scores_model()
    m.graph.input.append(onnx.helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [16, 6]))
    assert [s.name for s in model_inputs(m)] == ["x"]


# --------------------------------------------------------------------------- synthesis

def test_synthetic_fills_a_dynamic_batch_and_warns(model):
    data = load_calibration(model, samples=70, calib_batch=32)
    assert data.synthetic and data.samples == 70 and data.labels is None
    assert shapes(data) == [(32, 16), (32, 16), (6, 16)]
    assert "fidelity" in data.warnings[0] and "not task accuracy" in data.warnings[0]
    a, b = list(data), list(data)
    assert all(np.array_equal(f["x"], g["x"]) for f, g in zip(a, b))  # seeded: the same every pass


def test_synthetic_unknown_dimension_names_the_flag():
    with pytest.raises(UsageError, match=r"input_shape='input_ids:1x128'") as exc:
        load_calibration(token_model())
    assert "\n" not in str(exc.value) and "seq" in str(exc.value)


@pytest.mark.parametrize("spec", [["input_ids:2x7", "attention_mask:2x7"], "input_ids:2x7,attention_mask:2x7", ["input_ids:2x7"]])
def test_synthetic_dynamic_shapes_from_input_shape(spec):
    # Given for one input only, the shared symbolic dims ('batch', 'seq') carry over to the other.
    data = load_calibration(token_model(), samples=5, input_shape=spec)
    feeds = list(data)
    assert len(feeds) == 3 and data.samples == 6  # 5 samples rounded up to whole feeds of 2
    for f in feeds:
        assert f["input_ids"].shape == (2, 7) and f["attention_mask"].shape == (2, 7)
        assert f["input_ids"].dtype == np.int64
        assert f["input_ids"].min() >= DEFAULT_INT_RANGE[0] and f["input_ids"].max() < DEFAULT_INT_RANGE[1]
        assert (f["attention_mask"] == 1).all()


def test_synthetic_input_range():
    data = load_calibration(token_model(), samples=4, input_shape="input_ids:4x50", input_range="input_ids:5,9")
    ids = np.concatenate([f["input_ids"] for f in data])
    assert ids.min() >= 5 and ids.max() <= 8 and set(np.unique(ids)) == {5, 6, 7, 8}
    floats = np.concatenate([f["x"] for f in load_calibration(scores_model(), samples=200, input_range={"x": (2, 3)})])
    assert floats.min() >= 2 and floats.max() < 3


def test_synthetic_respects_a_fixed_leading_dimension():
    data = load_calibration(scores_model(batch=4), samples=10)
    assert shapes(data) == [(4, 16)] * 3 and data.samples == 12


def test_parsers_accept_names_with_colons_and_repeats():
    assert parse_input_shapes(["a:0:1x128", "b:3"]) == {"a:0": (1, 128), "b": (3,)}
    assert parse_input_ranges("ids:0,30522,input:0:-1.5,2e3") == {"ids": (0.0, 30522.0), "input:0": (-1.5, 2000.0)}


# --------------------------------------------------------------------------- bad input

def write(tmp_path, name, **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


X = np.zeros((10, 16), np.float32)

BAD = [
    # (how to build the call, error type, words the one-line message must hold)
    (lambda t: dict(calib=write(t, "c.npz", y=X)), CalibrationError, ["unknown input(s) 'y'", "'x'"]),
    (lambda t: dict(calib=write(t, "c.npz", x=X, extra=X)), CalibrationError, ["unknown input(s) 'extra'"]),
    (lambda t: dict(calib=write(t, "c.npz", x=X.astype(np.int32))), CalibrationError, ["'x' is int32", "expects float32"]),
    (lambda t: dict(calib=write(t, "c.npz", x=X[:, :, None])), CalibrationError, ["'x' has rank 3", "rank 2"]),
    (lambda t: dict(calib=write(t, "c.npz", x=X[:, :15])), CalibrationError, ["'x' has shape [10, 15]", "axis 1 must be 16"]),
    (lambda t: dict(calib=write(t, "c.npz", x=X[:0])), CalibrationError, ["0 samples"]),
    (lambda t: dict(calib=write(t, "c.npz")), CalibrationError, ["holds no arrays", "'x'"]),
    (lambda t: dict(calib=write(t, "c.npz", x=X, labels=np.zeros(9, np.int64))), CalibrationError, ["9 entries", "10 samples"]),
    (lambda t: dict(calib=write(t, "c.npz", x=X, labels=np.zeros(10, np.float32) + 0.5)), CalibrationError, ["labels", "integer"]),
    (lambda t: ((t / "empty.npz").write_bytes(b""), dict(calib=t / "empty.npz"))[1], CalibrationError, ["file is empty"]),
    (lambda t: ((t / "junk.npz").write_bytes(b"junk"), dict(calib=t / "junk.npz"))[1], CalibrationError, ["not a readable .npz"]),
    (lambda t: (t / "d").mkdir() or dict(calib=t / "d"), CalibrationError, ["no .npz files"]),
    (lambda t: dict(calib=t / "missing.npz"), CalibrationError, ["no such file"]),
    (lambda t: dict(calib=write(t, "c.npz", x=X), labels=np.zeros(3, np.int64)), CalibrationError, ["3 class ids", "10 samples"]),
    (lambda t: dict(calib=[{"x": X}], labels=np.zeros(3, np.int64)), CalibrationError, ["3 class ids", "10 samples"]),
    (lambda t: dict(calib=[{"y": X}]), CalibrationError, ["feed 1", "unknown input(s) 'y'"]),
    (lambda t: dict(calib=[[X]]), CalibrationError, ["is a list", "expected a dict"]),
    (lambda t: dict(calib=[]), CalibrationError, ["no feeds"]),
    (lambda t: dict(calib=X.astype(np.int64)), CalibrationError, ["'x' is int64"]),
    (lambda t: dict(calib=42), UsageError, ["got a int", "expected an .npz path"]),
    (lambda t: dict(labels=np.zeros(10)), UsageError, ["labels needs real data"]),
    (lambda t: dict(calib=X, input_shape="x:1x16"), UsageError, ["input_shape", "random data only"]),
    (lambda t: dict(input_shape="nope:1x16"), UsageError, ["input_shape", "'nope'", "'x'"]),
    (lambda t: dict(input_shape="x:1xa"), UsageError, ["input_shape", "positive integer"]),
    (lambda t: dict(input_shape="x:2x8"), UsageError, ["input_shape x", "axis 1 is fixed to 16"]),
    (lambda t: dict(input_range="x:3,1"), UsageError, ["input_range", "LOW must be below HIGH"]),
    (lambda t: dict(input_range="x:1"), UsageError, ["input_range", "NAME:LOW,HIGH"]),
    (lambda t: dict(calib_batch=0), UsageError, ["calib_batch"]),
]


@pytest.mark.parametrize("build,kind,words", BAD)
def test_bad_input_is_one_clear_line(build, kind, words, model, tmp_path):
    with pytest.raises(kind) as exc:
        list(load_calibration(model, **build(tmp_path)))
    msg = str(exc.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


SCRIPTS = [
    ("def feeds():\n    raise ValueError('no data here')\n", "raised ValueError: no data here"),
    ("def feeds():\n    return 3\n", "returned a int; expected an iterable of feed dicts"),
    ("def feeds():\n    return {'x': 1}\n", "returned a dict; expected an iterable of feed dicts"),
    ("def feeds():\n    yield [1, 2]\n", "item 1 is a list; expected a dict"),
    ("def feeds():\n    yield {'x': __import__('numpy').zeros((2, 16), 'float32')}\n    raise KeyError('k')\n", "raised KeyError while producing feeds"),
    ("import nonexistent_module_xyz\n", "importing"),
    ("def other():\n    pass\n", "defines no function 'feeds'"),
]


@pytest.mark.parametrize("source,needle", SCRIPTS)
def test_bad_calibration_script(source, needle, model, tmp_path):
    script = tmp_path / "calib.py"
    script.write_text(source)
    with pytest.raises(CalibrationError) as exc:
        list(load_calibration(model, calib_script=f"{script}:feeds"))
    assert needle in str(exc.value) and "calib_script" in str(exc.value) and "\n" not in str(exc.value)


def test_script_spec_without_function_is_a_usage_error(model, tmp_path):
    with pytest.raises(UsageError, match="FILE.py:FUNCTION"):
        load_calibration(model, calib_script=str(tmp_path / "calib.py"))
    with pytest.raises(CalibrationError, match="no such file"):
        load_calibration(model, calib_script=f"{tmp_path / 'missing.py'}:feeds")


def test_fixed_batch_needs_a_multiple_of_it(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((10, 16), np.float32))
    with pytest.raises(CalibrationError, match="feeds of exactly 4"):
        load_calibration(scores_model(batch=4), tmp_path / "c.npz")
    assert shapes(load_calibration(scores_model(batch=5), tmp_path / "c.npz", calib_batch=3)) == [(5, 16), (5, 16)]


def test_directory_with_labels_in_some_files_only(model, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    np.savez(d / "a.npz", x=X[:2], labels=np.zeros(2, np.int64))
    np.savez(d / "b.npz", x=X[:2])
    with pytest.raises(CalibrationError, match="b.npz: has no 'labels' array"):
        load_calibration(model, d)


def _if_model(cond: str = "cond", shape: tuple[int, ...] = ()):
    """x[batch,4] --If(``cond``: bool of ``shape``){ then: Identity(x); else: Neg(x) }--> y: a scalar
    condition, or ``use_cache_branch`` of shape [1] as an optimum merged decoder takes it."""
    from onnx import TensorProto, helper

    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch", 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["batch", 4])])
    g = helper.make_graph([helper.make_node("If", [cond], ["y"], then_branch=then_g, else_branch=else_g)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
                           helper.make_tensor_value_info(cond, TensorProto.BOOL, list(shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_npz_with_a_scalar_input_gives_it_to_every_feed(tmp_path):
    m = _if_model()
    np.savez(tmp_path / "c.npz", x=np.ones((10, 4), np.float32), cond=np.array(True))
    feeds = list(load_calibration(m, tmp_path / "c.npz", calib_batch=4))
    assert [f["x"].shape[0] for f in feeds] == [4, 4, 2]
    assert all(f["cond"].shape == () and bool(f["cond"]) for f in feeds)


def test_a_fixed_shape_input_of_a_free_batch_model_goes_with_every_feed_as_it_is(tmp_path):
    m = _if_model("use_cache_branch", (1,))
    np.savez(tmp_path / "c.npz", x=np.arange(40, dtype=np.float32).reshape(10, 4), use_cache_branch=np.array([True]))
    data = load_calibration(m, tmp_path / "c.npz", calib_batch=4)
    feeds = list(data)
    assert [f["x"].shape[0] for f in feeds] == [4, 4, 2] and data.samples == 10
    assert all(f["use_cache_branch"].shape == (1,) and bool(f["use_cache_branch"][0]) for f in feeds)
    # given once per sample instead: one clear line
    np.savez(tmp_path / "bad.npz", x=np.ones((10, 4), np.float32), use_cache_branch=np.ones(10, bool))
    with pytest.raises(CalibrationError, match=r"fixed shape \[1\], one value for every feed, but the data holds \[10\]"):
        load_calibration(m, tmp_path / "bad.npz")
    # feeds that take different branches are never mixed when a sample of them is drawn
    mixed = [{"x": np.full((4, 4), i, np.float32), "use_cache_branch": np.array([i % 2 == 0])} for i in range(8)]
    picked = list(load_calibration(m, mixed).spread(12))
    assert picked and all(len(set(f["x"][:, 0].tolist())) == 1 for f in picked)
    assert all(bool(f["use_cache_branch"][0]) == (int(f["x"][0, 0]) % 2 == 0) for f in picked)


def test_data_that_fits_the_inputs_but_not_the_model_is_a_calibration_error(tmp_path, capsys):
    from onnx import helper

    from onnx_lowrank.cli import main
    from models import init, make_model, vi

    table = np.random.default_rng(0).standard_normal((10, 32)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32)
    m = make_model([helper.make_node("Gather", ["E", "ids"], ["e"]), helper.make_node("MatMul", ["e", "W"], ["y"])],
                   [vi("ids", ["N"], onnx.TensorProto.INT64)], [vi("y", ["N", 16])], [init("E", table), init("W", w)])
    onnx.save(m, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "c.npz", ids=np.array([1, 2, 300, 4], np.int64))  # an id past the 10-row table
    assert main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "--data-aware", "--calib", str(tmp_path / "c.npz"),
                 "--min-params", "0"]) == 2
    err = capsys.readouterr().err
    assert "could not run the model on calibration feed 1" in err and "fix the --calib data" in err and err.count("\n") == 1
    assert not (tmp_path / "o.onnx").exists()


def test_float32_data_for_a_bfloat16_input_says_what_to_do(tmp_path):
    from onnx import TensorProto, helper

    from onnx_lowrank.calibration import load_calibration

    w = helper.make_tensor("W", TensorProto.BFLOAT16, [8, 8], np.ones(64, np.float32).tolist())
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [None, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [None, 8])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    npz = tmp_path / "c.npz"
    np.savez(npz, x=np.ones((4, 8), np.float32))
    with pytest.raises(CalibrationError, match="expects bfloat16, which an .npz cannot hold: calibrate a float32 export"):
        list(load_calibration(m, str(npz)))
