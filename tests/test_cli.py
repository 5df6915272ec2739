"""The command line, in-process (main([...])) and as a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

import onnx_lowrank as ol
from onnx_lowrank.cli import main
from models import matmul_model


@pytest.fixture
def model_path(tmp_path) -> Path:
    p = tmp_path / "model.onnx"
    onnx.save(matmul_model(k=128, n=96, r=8), str(p))
    return p


def test_compress_writes_model_and_json_report(model_path, tmp_path, capsys):
    out, rep = tmp_path / "small.onnx", tmp_path / "r.json"
    assert main([str(model_path), "-o", str(out), "--energy", "0.93", "--min-params", "0", "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "factorized" in text and "rank/full/even" in text and "file size" in text and f"wrote {out}" in text
    onnx.checker.check_model(str(out), full_check=True)
    doc = json.loads(rep.read_text())
    assert doc["totals"]["factorized"] == 1 and doc["layers"][0]["rank"] <= 8
    assert doc["totals"]["size_after"] == out.stat().st_size
    assert doc["config"]["energy"] == 0.93


def test_the_report_takes_the_form_its_suffix_names(model_path, tmp_path, capsys):
    """.md: Markdown (the printed report in a text block); .txt: the printed report; else JSON."""
    printed = None
    for name in ("r.md", "r.txt", "r.report"):
        rep = tmp_path / name
        assert main([str(model_path), "-o", str(tmp_path / "o.onnx"), "--energy", "0.93", "--min-params", "0", "--verify",
                     "--report", str(rep)]) == 0
        out = capsys.readouterr().out
        printed = out[:out.index("\nwrote ")]
        text = rep.read_text()
        if name == "r.md":
            assert text.startswith("# onnx-lowrank report: `model.onnx`")
            assert '`{"energy": 0.93, "min_params": 0}`' in text  # the options a user changed
            assert f"```text\n{printed}\n```" in text
        elif name == "r.txt":
            assert text == printed + "\n"
        else:
            assert json.loads(text)["totals"]["factorized"] == 1
    assert main([str(model_path), "--dry-run", "--min-params", "0", "--report", str(tmp_path / "plan.md")]) == 0
    assert (tmp_path / "plan.md").read_text().startswith("# onnx-lowrank plan (dry run): `model.onnx`")


def test_dry_run_writes_nothing(model_path, tmp_path, capsys):
    before = sorted(tmp_path.iterdir())
    assert main([str(model_path), "--dry-run", "--min-params", "0"]) == 0
    assert "would be factorized" in capsys.readouterr().out
    assert sorted(tmp_path.iterdir()) == before


def test_dry_run_writes_the_plan_as_its_report_and_no_model(model_path, tmp_path, capsys):
    before = sorted(tmp_path.iterdir())
    assert main([str(model_path), "--dry-run", "--min-params", "0", "--report", str(tmp_path / "r.json")]) == 0
    assert "wrote only the plan" in capsys.readouterr().out
    assert sorted(tmp_path.iterdir()) == sorted(before + [tmp_path / "r.json"])
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["dry_run"] is True and doc["totals"]["factorized"] == 1 and doc["layers"][0]["rank"] is not None


def test_quiet_prints_one_line(model_path, tmp_path, capsys):
    assert main([str(model_path), "-o", str(tmp_path / "o.onnx"), "-q", "--min-params", "0"]) == 0
    assert capsys.readouterr().out.strip().count("\n") == 0


def test_recipe_and_flags_override_it(model_path, tmp_path):
    rep = tmp_path / "r.json"
    assert main([str(model_path), "-o", str(tmp_path / "o.onnx"), "--recipe", "aggressive", "--min-params", "0", "--report", str(rep)]) == 0
    cfg = json.loads(rep.read_text())["config"]
    assert cfg["energy"] == 0.85 and cfg["rank_multiple"] == 8 and cfg["min_params"] == 0
    assert main([str(model_path), "-o", str(tmp_path / "o.onnx"), "--recipe", "aggressive", "--rank", "4", "--report", str(rep)]) == 0
    cfg = json.loads(rep.read_text())["config"]
    assert cfg["rank"] == 4 and cfg["energy"] is None
    assert main([str(model_path), "-o", str(tmp_path / "o.onnx"), "--recipe", "AGGRESSIVE", "--report", str(rep)]) == 0  # any case
    assert json.loads(rep.read_text())["config"]["energy"] == 0.85


def test_bad_recipe_key(tmp_path, model_path, capsys):
    r = tmp_path / "r.toml"
    r.write_text("energy = 0.9\nenergie = 0.5\n")
    assert main([str(model_path), "-o", str(tmp_path / "o.onnx"), "--recipe", str(r)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) energie" in err and err.count("\n") == 1


BAD = [
    (["missing.onnx", "-o", "{t}/o.onnx"], 2, "no such file"),
    (["{t}", "-o", "{t}/o.onnx"], 2, "is a directory"),
    (["{m}", "-o", "{t}/o.onnx", "--energy", "1.5"], 2, "--energy"),
    (["{m}", "-o", "{t}/o.onnx", "--energy", "0"], 2, "--energy"),
    (["{m}", "-o", "{t}/o.onnx", "--energy", "abc"], 2, "--energy"),
    (["{m}", "-o", "{t}/o.onnx", "--rank", "0"], 2, "--rank"),
    (["{m}", "-o", "{t}/o.onnx", "--recipe", "{t}"], 2, "is a directory; pass a recipe's .toml file"),
    (["{m}", "-o", "{t}/o.onnx", "--rank", "-3"], 2, "--rank"),
    (["{m}", "-o", "{t}/o.onnx", "--energy", "0.9", "--rank", "3"], 2, "not allowed with"),
    (["{m}", "-o", "{t}/nodir/o.onnx"], 2, "does not exist"),
    (["{m}", "-o", "{m}"], 2, "is the input model"),
    (["{m}"], 2, "missing -o"),
    (["{m}", "-o", "{t}/o.onnx", "--op-types", "Conv2"], 2, "--op-types"),
    (["{m}", "-o", "{t}/o.onnx", "--include", "("], 2, "--include"),
    (["{e}", "-o", "{t}/o.onnx"], 1, "empty"),
    (["{j}", "-o", "{t}/o.onnx"], 1, "not a readable ONNX model"),
]


@pytest.mark.parametrize("argv,code,needle", BAD)
def test_bad_input_one_line_exit_code_nothing_written(argv, code, needle, model_path, tmp_path, capsys):
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    model_bytes = model_path.read_bytes()
    listing = sorted(tmp_path.iterdir())
    fmt = {"t": tmp_path, "m": model_path, "e": tmp_path / "empty.onnx", "j": tmp_path / "junk.onnx"}
    assert main([a.format(**fmt) for a in argv]) == code
    err = capsys.readouterr().err
    assert needle in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == listing
    assert model_path.read_bytes() == model_bytes


def test_a_model_onnxruntime_cannot_run_on_the_data_is_one_line_with_nothing_from_onnxruntime_itself(tmp_path, capfd):
    # a Gemm whose (8, N) bias fits 8 rows only: the batch of 16 fails inside onnxruntime, which
    # would also print its own coloured log line on the process's stderr
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W", "C"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", 64])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", 80])],
                          [numpy_helper.from_array(rng.standard_normal((64, 80)).astype(np.float32), "W"),
                           numpy_helper.from_array(rng.standard_normal((8, 80)).astype(np.float32), "C")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "gemm.onnx"))
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((64, 64)).astype(np.float32))
    assert main([str(tmp_path / "gemm.onnx"), "-o", str(tmp_path / "o.onnx"), "--data-aware", "--calib",
                 str(tmp_path / "calib.npz"), "--calib-batch", "16", "--min-params", "0"]) != 0
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "Invalid bias shape" in err and "sequential_executor" not in err
    assert not (tmp_path / "o.onnx").exists()


def test_verbose_shows_traceback(tmp_path, capsys):
    assert main([str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx"), "--verbose"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_no_candidates_writes_faithful_copy(tmp_path, capsys):
    from onnx import helper
    from models import make_model, vi

    m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    onnx.save(m, str(tmp_path / "relu.onnx"))
    assert main([str(tmp_path / "relu.onnx"), "-o", str(tmp_path / "o.onnx")]) == 0
    assert "nothing to factorize" in capsys.readouterr().out
    assert onnx.load(str(tmp_path / "o.onnx")).graph == m.graph


def test_subprocess_console_script_and_module(model_path, tmp_path):
    out = tmp_path / "o.onnx"
    r = subprocess.run([sys.executable, "-m", "onnx_lowrank", str(model_path), "-o", str(out), "--energy", "0.93", "--min-params", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.exists() and "wrote" in r.stdout
    assert r.stderr == ""  # no progress bar when stderr is not a terminal
    exe = Path(sys.executable).parent / "onnx-lowrank"
    r = subprocess.run([str(exe), str(model_path), "-o", str(model_path)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("onnx-lowrank: error:") and r.stderr.count("\n") == 1


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo.onnx"
    assert main(["demo", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "macro-F1" in text and f"wrote {out}" in text
    onnx.checker.check_model(str(out), full_check=True)


def test_report_or_json_never_replaces_a_model(model_path, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main([str(model_path), "-o", str(out), "--report", str(out)]) == 2
    assert "--report" in capsys.readouterr().err and not out.exists()
    assert main([str(model_path), "-o", str(out), "--min-params", "0", "-q"]) == 0
    before = out.read_bytes()
    assert main(["verify", str(model_path), str(out), "--report", str(out)]) == 2
    assert main(["bench", str(model_path), str(out), "--json", str(out), "--runs", "2"]) == 2
    assert out.read_bytes() == before
    assert main(["verify", str(model_path), str(out), "--report", str(tmp_path / "nodir" / "r.json")]) == 2
    assert "choose another --report" in capsys.readouterr().err


def test_api_include_given_as_a_list_is_a_usage_error():
    with pytest.raises(ol.UsageError, match="one regular expression"):
        ol.compress(matmul_model(), rank=3, min_params=0, include=["mm", "other"])


def test_the_command_line_starts_without_loading_onnx_so_ctrl_c_there_is_one_line():
    import subprocess
    import sys

    code = "import sys, onnx_lowrank.cli; heavy = {'onnx', 'onnxruntime', 'numpy'} & set(sys.modules); assert not heavy, heavy"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_progress_gives_the_time_left_in_a_step_on_a_terminal_and_in_a_log(capsys):
    from onnx_lowrank.cli import _ProgressBar

    now = [0.0]
    bar = _ProgressBar(True, tty=False, every=60.0, clock=lambda: now[0])
    for done in range(1, 101):  # a step of 100 runs, 1 s each
        now[0] += 1.0
        bar(done, 100, "sensitivity")
    lines = capsys.readouterr().err.splitlines()
    # a log gets a line once the step ran 30 s, then at most one a minute, with the time left at the rate so far
    assert lines == ["onnx-lowrank: working 31/100, about 69 s left (sensitivity)",
                     "onnx-lowrank: working 91/100, about 9 s left (sensitivity)"]
    assert bar.left(100, 100) == 0.0
    bar(1, 10, "budget")  # a new step starts its own clock
    assert bar.left(1, 10) is None

    tty = _ProgressBar(True, tty=True, clock=lambda: now[0])
    tty(1, 4, "w1")
    now[0] += 10
    tty(2, 4, "w2")
    assert "2/4, about 20 s left w2" in capsys.readouterr().err


def test_recipe_errors_name_the_file_and_its_keys_and_flags_replace_what_goes_with_them(model_path, tmp_path, capsys):
    def recipe(text):
        r = tmp_path / "r.toml"
        r.write_text(text)
        return str(r)

    out = str(tmp_path / "o.onnx")
    cases = [("max_drop = 0.01\n", "max_drop needs adaptive = true", "pass --max-drop on the command line"),
             ('metric = "cosine"\n', "metric sets what adaptive bounds", "add adaptive = true, or pass --metric on the command line"),
             ('threads = "1,2"\n', "threads must be positive integers", "e.g. threads = [1, 2]"),
             ("energy = 0.9\nrank = 4\n", "got both energy and rank", "")]
    for text, what, fix in cases:
        assert main([str(model_path), "-o", out, "--recipe", recipe(text)]) == 2
        err = capsys.readouterr().err
        assert f"--recipe {tmp_path / 'r.toml'}: {what}" in err and fix in err and "--max-drop needs" not in err
    # a flag replaces the recipe's choice and the keys that only go with it
    assert main([str(model_path), "-o", out, "--min-params", "0", "--recipe",
                 recipe('quantize = "int4"\nint4_block = 64\nenergy = 1\n'), "--quantize", "int8", "-q"]) == 0
    # the recipe's input shape serves the random verification, as --input-shape does
    dyn = tmp_path / "dyn.onnx"
    onnx.save(matmul_model(k=32, n=16, r=4, batch_shape=("N",)), str(dyn))
    assert main([str(dyn), "-o", out, "--min-params", "0", "--verify", "--recipe", recipe('input_shape = "x:3x32"\n'), "-q"]) == 0
    assert main([str(dyn), "-o", out, "--min-params", "0", "--verify", "--recipe", recipe('input_shape = "x:3x33"\n')]) == 2
    assert "fixed to 32" in capsys.readouterr().err


def test_bench_names_the_input_whose_type_differs(tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(matmul_model(k=16, n=8, r=2), str(a))
    import numpy as np

    onnx.save(matmul_model(k=16, n=8, r=2, dtype=np.float64), str(b))
    assert main(["bench", str(a), str(b), "--runs", "2", "--warmup", "1"]) == 2
    assert "input 'x' as different types (float in a.onnx, double in b.onnx)" in capsys.readouterr().err


def test_quiet_and_verbose_together_are_refused(model_path, tmp_path, capsys):
    assert main([str(model_path), "-o", str(tmp_path / "o.onnx"), "--quiet", "--verbose"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["onnx-lowrank: error: argument -v/--verbose: not allowed with argument -q/--quiet "
                                        "(see onnx-lowrank --help)"]  # one line, no argparse traceback even with -v
    assert not (tmp_path / "o.onnx").exists()


def test_one_debug_line_per_skipped_node(model_path, caplog):
    """docs/api.md promises a DEBUG line per skipped weight (what --verbose shows)."""
    import logging

    caplog.set_level(logging.DEBUG, logger="onnx_lowrank")
    res = ol.compress(model_path, min_params=100000000)
    skipped = [d for d in res.layers if d.reason is not None]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert skipped and all(f"skipped {d.node} ({d.weight}): {d.reason}" in lines for d in skipped)
