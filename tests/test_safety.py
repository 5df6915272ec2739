"""What the tool promises about files (docs/safety.md), each promise tested by breaking it on purpose.

* External data is confined to the model's folder: traversal, absolute paths and symlinks out.
* Outputs are all or nothing: signals at every step of a save, a full disk, an unwritable report.
* A model is never paired with another generation's data file, even after SIGKILL.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnx_lowrank as ol
from onnx_lowrank import io
from onnx_lowrank.cli import main
from models import init, lowrank, make_model, vi

RNG = np.random.default_rng(5)


#   x[4,256] --MatMul(W1)--> h --MatMul(W2)--> y --Add(B)--> z ; every tensor in weights.bin
def _external_model(folder: Path, n: int = 256) -> Path:
    w1, w2 = lowrank(n, n, 8, 1), lowrank(n, n, 12, 2)
    b = RNG.standard_normal((4, n)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2"),
             helper.make_node("Add", ["y", "B"], ["z"], name="add")]
    model = make_model(nodes, [vi("x", [4, n])], [vi("z", [4, n])], [init("W1", w1), init("W2", w2), init("B", b)])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0)
    return folder / "model.onnx"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _set_entry(tensor: TensorProto, key: str, value: str) -> None:
    for e in tensor.external_data:
        if e.key == key:
            e.value = value
            return
    tensor.external_data.add(key=key, value=value)


# ---------------------------------------------------------------------------------------------
# Confinement
# ---------------------------------------------------------------------------------------------

def _pointing_at(src: Path, name: str, location: str) -> Path:
    """A copy of ``src`` whose bias B keeps its data at ``location``."""
    m = onnx.load(str(src), load_external_data=False)
    bias = next(t for t in m.graph.initializer if t.name == "B")
    _set_entry(bias, "location", location)
    _set_entry(bias, "offset", "0")
    out = src.parent / name
    onnx.save(m, str(out))
    return out


@pytest.mark.parametrize("variant", ["dotdot", "absolute", "symlink", "symlinked_dir"])
def test_external_data_outside_the_models_folder_is_refused_before_a_byte_is_read(tmp_path, variant, capsys, monkeypatch):
    src = _external_model(tmp_path / "m")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"SECRET!!" * 512)
    if variant == "dotdot":
        model = _pointing_at(src, "evil.onnx", "../secret.bin")
    elif variant == "absolute":
        model = _pointing_at(src, "evil.onnx", str(secret))
    elif variant == "symlink":
        (src.parent / "link.bin").symlink_to(secret)
        model = _pointing_at(src, "evil.onnx", "link.bin")
    else:
        (src.parent / "sub").symlink_to(tmp_path, target_is_directory=True)
        model = _pointing_at(src, "evil.onnx", "sub/secret.bin")
    opened = []
    real_open = open

    def watch(path, *a, **k):
        opened.append(str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", watch)
    with pytest.raises(ol.ModelError, match="tensor 'B' keeps its data at .*inside the model's own folder"):
        ol.compress(model, energy=0.9, min_params=0)
    # the in-memory form with base_dir gets the same check when the tensor is read
    proto = onnx.load(str(model), load_external_data=False)
    with pytest.raises(ol.ModelError, match="tensor 'B'"):
        ol.compress(proto, base_dir=src.parent, energy=0.9, min_params=0).save(tmp_path / "mem.onnx")
    out = tmp_path / "o"
    out.mkdir()
    assert main([str(model), "-o", str(out / "o.onnx"), "--min-params", "0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensor 'B'" in err[0] and "Traceback" not in err[0]
    assert list(out.iterdir()) == []
    assert not any(Path(p).resolve() == secret.resolve() for p in opened), "the secret file must never be opened"


@pytest.mark.parametrize("key,value,match", [
    ("length", "x", "length 'x'; expected a non-negative integer"),
    ("offset", "-5", "offset '-5'; expected a non-negative integer"),
    ("length", "7", "declares 7 bytes .* need 262144"),
])
def test_malformed_external_entries_name_the_tensor(tmp_path, key, value, match):
    src = _external_model(tmp_path)
    m = onnx.load(str(src), load_external_data=False)
    _set_entry(m.graph.initializer[0], key, value)
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(ol.ModelError, match=f"tensor 'W1' .*{match}"):
        ol.compress(tmp_path / "bad.onnx")


def test_an_unknown_data_type_names_the_tensor(tmp_path):
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", [2, 64])], [vi("y", [2, 64])], [init("W", lowrank(64, 64, 4))])
    m.graph.initializer[0].data_type = 40
    with pytest.raises(ol.ModelError, match="tensor 'W' has data_type 40"):
        ol.compress(m, min_params=0)


# ---------------------------------------------------------------------------------------------
# All or nothing
# ---------------------------------------------------------------------------------------------

class Generations:
    """An output folder holding a previous generation (rank 4), and what the next one (rank 8) gives."""

    def __init__(self, tmp_path: Path):
        self.src = _external_model(tmp_path / "in")
        self.input_digest = _digest(self.src.parent)
        self.out_dir = tmp_path / "out"
        self.snapshot = tmp_path / "old"
        self.x = RNG.standard_normal((4, 256)).astype(np.float32)
        for folder, rank in ((self.snapshot, "4"), (tmp_path / "new", "8")):
            folder.mkdir()
            assert main([str(self.src), "-o", str(folder / "o.onnx"), "--rank", rank, "--min-params", "0", "-q",
                         "--report", str(folder / "o.json")]) == 0
        self.old = self.outputs(self.snapshot)
        self.new = self.outputs(tmp_path / "new")
        assert not np.allclose(self.old, self.new)

    def args(self) -> list[str]:
        return [str(self.src), "-o", str(self.out_dir / "o.onnx"), "--rank", "8", "--min-params", "0", "-q",
                "--report", str(self.out_dir / "o.json")]

    def reset(self) -> None:
        if self.out_dir.exists():
            for p in self.out_dir.iterdir():
                p.unlink()
        else:
            self.out_dir.mkdir()
        for p in self.snapshot.iterdir():
            (self.out_dir / p.name).write_bytes(p.read_bytes())

    def outputs(self, folder: Path) -> np.ndarray:
        import onnxruntime as ort

        return ort.InferenceSession(str(folder / "o.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": self.x})[0]

    def state(self, *, temps_allowed: bool = False) -> str:
        """``old`` or ``new``; fails unless the folder holds one complete, consistent generation."""
        names = sorted(p.name for p in self.out_dir.iterdir())
        temps = [n for n in names if n.startswith(".")]
        assert temps_allowed or not temps, f"temporary files left behind: {temps}"
        m = onnx.load(str(self.out_dir / "o.onnx"), load_external_data=False)
        locs = {e.value for t in m.graph.initializer for e in t.external_data if e.key == "location"}
        data = [n for n in names if n.endswith(".data") and not n.startswith(".")]
        # SIGKILL (temps_allowed) between two renames of the commit may also leave the data file of
        # the other generation, never referenced (the next run to this output removes it), and a
        # report one generation behind the model (it is renamed last); docs/safety.md says both.
        if temps_allowed:
            assert len(locs) == 1 and locs <= set(data), f"model references {locs}, folder has {data}"
        else:
            assert len(locs) == 1 and sorted(locs) == data, f"model references {locs}, folder has {data}"
        got = self.outputs(self.out_dir)
        which = "old" if np.allclose(got, self.old, atol=1e-5) else "new" if np.allclose(got, self.new, atol=1e-5) else None
        assert which is not None, "the model's outputs match neither generation"
        report = json.loads((self.out_dir / "o.json").read_text())
        allowed = {4, 8} if temps_allowed and which == "new" else {4 if which == "old" else 8}
        assert report["layers"][0]["rank"] in allowed, "report and model are of different generations"
        assert _digest(self.src.parent) == self.input_digest, "the input changed"
        return which


# The steps of a save at which a signal or an error is injected.
_STEPS = [("os", "replace"), ("os", "fsync"), ("tempfile", "mkstemp"), ("io", "_pad"), ("io", "_file_digest"), ("io", "_backup")]


def _instrument(monkeypatch, at: int | None, action) -> list[str]:
    """Count the save's steps; run ``action()`` just before step number ``at``."""
    seen: list[str] = []
    import tempfile as tempfile_mod

    owners = {"os": os, "tempfile": tempfile_mod, "io": io}
    for owner, name in _STEPS:
        real = getattr(owners[owner], name)

        def wrapped(*a, _real=real, _name=name, **k):
            if threading.current_thread() is not threading.main_thread():
                return _real(*a, **k)  # another test's leftover thread (a Ray client, say) is not the save
            seen.append(_name)
            if at is not None and len(seen) == at:
                action()
            return _real(*a, **k)

        monkeypatch.setattr(owners[owner], name, wrapped)
    return seen


@pytest.fixture
def ctrl_c_handled():
    """Ctrl-C's usual handler, whatever this process inherited: a shell starts a background job
    with SIGINT ignored and Python leaves it so (the CLI honours that, as any program does)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_signal_at_every_step_of_a_save_leaves_one_complete_generation(tmp_path, monkeypatch, capsys, ctrl_c_handled):
    gen = Generations(tmp_path)
    with monkeypatch.context() as mp:
        gen.reset()
        seen = _instrument(mp, None, None)
        assert main(gen.args()) == 0
        steps = len(seen)
    assert gen.state() == "new" and steps >= 10
    outcomes = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        for k in range(1, steps + 1):
            gen.reset()
            with monkeypatch.context() as mp:
                seen = _instrument(mp, k, lambda: os.kill(os.getpid(), sig))
                rc = main(gen.args())
            err = capsys.readouterr().err
            assert rc == 128 + sig, (k, seen[-1:], err)
            which = gen.state()
            outcomes[(sig, k)] = which
            assert ("nothing was written" in err) == (which == "old"), err
    assert set(outcomes.values()) == {"old", "new"}, "signals should land both before and during the commit"


@pytest.mark.parametrize("fail_at", range(1, 40, 3))
def test_an_error_at_any_step_of_a_save_changes_nothing(tmp_path, monkeypatch, capsys, fail_at):
    gen = Generations(tmp_path)
    gen.reset()

    def boom():
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as mp:
        seen = _instrument(mp, fail_at, boom)
        rc = main(gen.args())
    err = capsys.readouterr().err
    if len(seen) < fail_at:
        assert rc == 0 and gen.state() == "new"
        return
    if rc == 0:  # only the folder's fsync after the renames is best effort: the outputs are complete
        assert seen[fail_at - 1] == "fsync" and gen.state() == "new"
        return
    assert rc == 1 and "No space left on device" in err
    assert gen.state() == "old"


def test_a_full_disk_while_writing_any_output_changes_nothing(tmp_path, monkeypatch, capsys):
    gen = Generations(tmp_path)
    real_fdopen = os.fdopen

    class Disk:
        """Every file the save opens shares ``room`` bytes; a write past them fails with ENOSPC."""

        def __init__(self, room: float):
            self.room, self.used = room, 0

        def fdopen(self, fd, mode="r", *a, **k):
            disk, f = self, real_fdopen(fd, mode, *a, **k)

            class File:
                def write(self, b):
                    if disk.used + len(b) > disk.room:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    disk.used += len(b)
                    return f.write(b)

                def __getattr__(self, name):
                    return getattr(f, name)

                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    f.close()

            return File()

    gen.reset()
    clean = Disk(float("inf"))
    with monkeypatch.context() as mp:
        mp.setattr(io.os, "fdopen", clean.fdopen)
        assert main(gen.args()) == 0
    total = clean.used
    assert total > 30_000
    for room in (0, total // 3, total - 5_000, total - 1):
        gen.reset()
        with monkeypatch.context() as mp:
            mp.setattr(io.os, "fdopen", Disk(room).fdopen)
            assert main(gen.args()) == 1
        assert "No space left" in capsys.readouterr().err
        assert gen.state() == "old"


def test_an_unwritable_report_path_writes_no_model(tmp_path, monkeypatch, capsys):
    gen = Generations(tmp_path)
    gen.reset()
    import tempfile as tempfile_mod

    real = tempfile_mod.mkstemp

    def read_only(*a, prefix="", **k):
        if prefix.startswith(".o.json."):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*a, prefix=prefix, **k)

    monkeypatch.setattr(tempfile_mod, "mkstemp", read_only)
    assert main(gen.args()) == 1
    assert "Permission denied" in capsys.readouterr().err
    assert gen.state() == "old"


def test_nothing_goes_outside_means_no_data_file(tmp_path):
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", [2, 8])], [vi("y", [2, 8])], [init("W", lowrank(8, 8, 2))])
    res = ol.compress(m, rank=2, min_params=0)
    assert res.save(tmp_path / "o.onnx", external=True) == [tmp_path / "o.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]


def test_a_new_output_replaces_the_old_generation_and_its_data(tmp_path):
    gen = Generations(tmp_path)
    gen.reset()
    old_data = [p for p in gen.out_dir.iterdir() if p.name.endswith(".data")]
    assert main(gen.args()) == 0
    assert gen.state() == "new"
    assert not any(p.exists() for p in old_data)


# ---------------------------------------------------------------------------------------------
# Real signals, from outside
# ---------------------------------------------------------------------------------------------

def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "onnx_lowrank", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_real_signals_never_pair_a_model_with_another_generations_data(tmp_path, sig):
    gen = Generations(tmp_path)
    gen.reset()
    start = time.perf_counter()
    p = _cli(gen.args())
    assert p.wait(120) == 0
    took = time.perf_counter() - start
    seen = set()
    for fraction in (0.5, 0.7, 0.8, 0.9, 0.95, 1.0):
        gen.reset()
        p = _cli(gen.args())
        time.sleep(took * fraction)
        p.send_signal(sig)
        rc = p.wait(120)
        err = p.stderr.read().decode()
        assert "Traceback" not in err, (fraction, rc, err)  # (a rare failure here under load: the message says which)
        state = gen.state(temps_allowed=sig == signal.SIGKILL)
        if sig == signal.SIGTERM:
            # -15: the signal came before the command installed its handler (interpreter start-up)
            # or after it had finished its work, on the way out; either way nothing is half-done
            assert rc in (143, -15) or (rc == 0 and state == "new"), (fraction, rc, state, err)
        seen.add(state)
    assert seen <= {"old", "new"}, seen


def _small_model_and_data(folder: Path) -> tuple[Path, Path]:
    model = folder / "m.onnx"
    w = lowrank(64, 48, 6)
    onnx.save(make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", ["b", 64])], [vi("y", ["b", 48])],
                         [init("W", w)]), str(model))
    calib = folder / "c.npz"
    np.savez(calib, x=RNG.standard_normal((32, 64)).astype(np.float32))
    return model, calib


@pytest.mark.parametrize("where", ["-o", "--report"])
def test_no_output_replaces_the_calibration_data_the_command_reads(tmp_path, capsys, where):
    model, calib = _small_model_and_data(tmp_path)
    before = hashlib.sha256(calib.read_bytes()).hexdigest()
    out = str(calib) if where == "-o" else str(tmp_path / "o.onnx")
    argv = [str(model), "-o", out, "--data-aware", "--calib", str(calib), "--min-params", "0"]
    if where == "--report":
        argv += ["--report", str(calib)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{where} {calib}: is also {calib}, which this command reads" in err and "Traceback" not in err
    assert hashlib.sha256(calib.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "m.onnx"]


def test_an_output_directory_that_cannot_be_written_to_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    model, calib = _small_model_and_data(tmp_path)
    import tempfile as tempfile_mod

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile_mod, "TemporaryFile", denied)
    import onnx_lowrank.api as api

    ran = []
    monkeypatch.setattr(api, "compress", lambda *a, **k: ran.append(1))
    assert main([str(model), "-o", str(tmp_path / "o.onnx"), "--rank", "4", "--min-params", "0"]) == 2
    err = capsys.readouterr().err
    assert f"cannot write in directory '{tmp_path.resolve()}' (Permission denied); choose another -o" in err
    assert not ran and sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "m.onnx"]


def test_a_report_never_replaces_a_model_data_file_written_or_read(tmp_path, capsys):
    # the data file is named after its content: a --report naming it was found only by writing over it
    src = _external_model(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    assert main([str(src), "-o", str(out / "s.onnx"), "--min-params", "100", "-q"]) == 0
    data = next(out.glob("s.onnx.*.data"))
    kept = _digest(out)
    # the main command: the report would be the new model's data file (same content, same name)
    assert main([str(src), "-o", str(out / "t.onnx"), "--min-params", "100", "-q",
                 "--report", str(out / data.name.replace("s.onnx", "t.onnx"))]) == 2
    assert "is the data file of the model being written" in capsys.readouterr().err
    assert _digest(out) == kept  # nothing written
    # verify and bench read the second model: its data file is an input too
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=RNG.standard_normal((8, 4, 256)).astype(np.float32))
    assert main(["verify", str(src), str(out / "s.onnx"), "--calib", str(calib), "-q", "--report", str(data)]) == 2
    assert main(["bench", str(src), str(out / "s.onnx"), "--runs", "2", "--warmup", "1", "-q", "--json", str(data)]) == 2
    assert capsys.readouterr().err.count("which this command reads or writes") == 2
    assert _digest(out) == kept
    onnx.checker.check_model(str(out / "s.onnx"))


def test_save_without_external_data_writes_one_self_contained_file(tmp_path):
    src = _external_model(tmp_path / "in", n=64)
    res = ol.compress(src, min_params=0, exclude="mm2")  # mm2's weight stays external in the result
    out = tmp_path / "out"
    out.mkdir()
    assert res.save(out / "one.onnx", external=False) == [out / "one.onnx"]
    assert sorted(p.name for p in out.iterdir()) == ["one.onnx"]
    one = onnx.load(str(out / "one.onnx"), load_external_data=False)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in one.graph.initializer)
    x = RNG.standard_normal((4, 64)).astype(np.float32)
    import onnxruntime as ort

    (tmp_path / "two").mkdir()
    assert len(res.save(tmp_path / "two" / "two.onnx")) == 2  # the default keeps the data outside
    want = ort.InferenceSession(str(tmp_path / "two" / "two.onnx")).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out / "one.onnx")).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    assert any(t.data_location == TensorProto.EXTERNAL for t in res.model.graph.initializer)  # the result is left as it was


def test_save_from_python_names_its_arguments_and_refuses_what_is_not_a_path(tmp_path):
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", [2, 8])], [vi("y", [2, 8])], [init("W", lowrank(8, 8, 2))])
    res = ol.compress(m, rank=2, min_params=0)
    with pytest.raises(ol.UsageError, match=r"^path .*does not exist; create it first or choose another path\."):
        res.save(tmp_path / "nodir" / "a.onnx")
    with pytest.raises(ol.UsageError, match=r"^report .*choose another report\."):
        res.save(tmp_path / "a.onnx", report=tmp_path / "nodir" / "r.json")
    for args, kw in (((None,), {}), ((3,), {}), ((tmp_path / "a.onnx",), {"report": True})):
        with pytest.raises(ol.UsageError, match="takes a file path"):
            res.save(*args, **kw)
    assert list(tmp_path.iterdir()) == []
