"""Byte-level fuzz: damaged model files through compress(path) and the CLI (see tests/fuzzing.py for
what must hold).  Seeded, so every run tries the same mutants; benchmarks/fuzz_campaign.py runs
the same mutations (and mutated random graphs) for much longer.
"""

from __future__ import annotations

import random
import shutil

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnx_lowrank as ol
from fuzzing import CATCH_ALL, MODEL, Mutant, check_mutant, is_internal_error, make_mutant, run_cli, seed_files
from models import init, lowrank, make_model, vi

MUTANTS = 1000


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return seed_files(tmp=tmp_path_factory.mktemp("seeds"))


def test_the_unmutated_seeds_compress(seeds, tmp_path):
    for name, files in seeds.items():
        out = check_mutant(tmp_path / name.replace(":", "_"), Mutant(name, "none", files))
        assert out.problems == [] and out.cli_rc == 0 and out.compressed, (name, out)


def test_mutated_model_files_fail_cleanly_or_compress(seeds, tmp_path):
    rng = random.Random(1234)
    found: dict[str, str] = {}
    for i in range(MUTANTS):
        mutant = make_mutant(rng, seeds)
        work = tmp_path / f"m{i}"
        out = check_mutant(work, mutant)
        if not out.problems:
            shutil.rmtree(work)
            continue
        for p in out.problems:
            key = p.split(":")[0][:60]
            found.setdefault(key, f"mutant {i} ({mutant.seed}, {mutant.how}; kept in {work / 'in' / MODEL}): {p[:400]}")
    assert not found, "\n".join(["problems with mutated model files:", *found.values()])


# ---- the failures the fuzz found, each as a small file ---------------------------------------


def _matmul(x: str = "x", w: str = "W", out: str = "y") -> onnx.ModelProto:
    #   x[2,32] --MatMul(W[32,24], rank 2)--> y
    return make_model([helper.make_node("MatMul", [x, w], [out], name="mm")], [vi(x, [2, 32])], [vi(out, [2, 24])],
                      [init(w, lowrank(32, 24, 2))], ir_version=8)


def test_external_data_location_that_is_not_utf8_is_a_model_error(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save_model(_matmul(), str(src), save_as_external_data=True, location="weights.bin", size_threshold=0)
    data = src.read_bytes()
    assert data.count(b"weights.bin") == 1
    src.write_bytes(data.replace(b"weights.bin", b"weights.\xffin"))  # protobuf hands the location back as bytes
    with pytest.raises(ol.ModelError) as info:
        ol.compress(str(src), min_params=0)
    assert not is_internal_error(info.value), info.value


def test_names_that_are_not_utf8_are_a_model_error(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(_matmul(x="xQ").SerializeToString().replace(b"xQ", b"x\xff"))  # the MatMul's input name
    with pytest.raises(ol.ModelError) as info:
        ol.compress(str(src), min_params=0)
    assert not is_internal_error(info.value), info.value


@pytest.mark.parametrize("op", ["MatMul", "Gemm", "Conv"])
def test_a_node_without_outputs_is_left_alone_or_a_model_error(op):
    #   x --op(x, W)--> (no output)      invalid ONNX, as a damaged file decodes
    x_shape, w = ([1, 4, 6, 6], lowrank(8, 36, 2).reshape(8, 4, 3, 3)) if op == "Conv" else ([2, 32], lowrank(32, 24, 2))
    model = make_model([helper.make_node(op, ["x", "W"], [], name="n")], [vi("x", x_shape)], [vi("z", [1])], [init("W", w)])
    try:
        res = ol.compress(model, min_params=0)
    except ol.ModelError as exc:
        assert not is_internal_error(exc), exc
        return
    assert not res.layers[0].factorized


def test_cli_prints_one_line_and_no_nan_model_for_a_weight_whose_norm_overflows(tmp_path):
    top = float(np.finfo(np.float32).max)
    w = lowrank(32, 24, 2, 7, dtype=np.float64)
    w = (w / np.abs(w).max() * top / 2).astype(np.float32)  # finite entries, ||W||_F > float32 max
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [2, 32])], [vi("y", [2, 24])],
                       [init("W", w)])
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, str(src))
    rc, _, err, problem = run_cli([str(src), "-o", str(out), "--min-params", "0", "-q"])
    assert problem is None and rc in (0, 1, 2)
    assert len(err.splitlines()) <= 1 and "Warning" not in err and CATCH_ALL not in err and " failed: " not in err, err
    if rc == 0:
        for t in onnx.load(str(out)).graph.initializer:
            assert np.all(np.isfinite(numpy_helper.to_array(t))), f"{t.name} holds NaN/Inf"


def test_a_sparse_constant_in_an_external_data_model_keeps_the_output_checkable(tmp_path):
    #   Constant(S, sparse_value 32x24, 384 int64 indices) ; x --MatMul(S)--> h --MatMul(W)--> y
    dense = lowrank(32, 24, 2)
    idx = np.arange(0, dense.size, 2, dtype=np.int64)  # 3 KiB of indices
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(dense.reshape(-1)[idx], "S"), numpy_helper.from_array(idx, "S_idx"), [32, 24])
    model = make_model([helper.make_node("Constant", [], ["S"], sparse_value=sparse), helper.make_node("MatMul", ["x", "S"], ["h"]),
                        helper.make_node("MatMul", ["h", "W"], ["y"], name="mm")], [vi("x", [2, 32])], [vi("y", [2, 20])],
                       [init("W", lowrank(24, 20, 2))], ir_version=8)
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, location="m.bin", size_threshold=0)
    onnx.checker.check_model(str(src), full_check=True)
    res = ol.compress(str(src), min_params=0)
    assert [d.factorized for d in res.layers] == [False, True]
    res.save(out)
    onnx.checker.check_model(str(out), full_check=True)  # the sparse tensor's parts must stay inline, as onnx.save keeps them
