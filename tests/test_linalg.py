"""The math package stands alone: it imports without onnx, and each module keeps its promises."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from onnx_lowrank import linalg


def test_linalg_imports_without_onnx():
    code = ("import sys; sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None\n"
            "import onnx_lowrank.linalg as L\n"
            "s = L.spectrum(__import__('numpy').eye(4, dtype='float32'))\n"
            "assert L.energy_rank(s.s, 0.5) == 2\n"
            "assert 'onnx' not in [m for m in sys.modules if sys.modules[m] is not None and m.split('.')[0] == 'onnx']\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("m,n,r", [(64, 48, 5), (30, 90, 7), (128, 128, 1)])
def test_exactly_low_rank_matrices_are_recovered(m, n, r):
    rng = np.random.default_rng(m + n + r)
    w = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
    spec = linalg.spectrum(w)
    assert linalg.energy_rank(spec.s, 1.0) == r
    a, b = linalg.factors(spec, r)
    assert np.linalg.norm(a @ b - w) <= 1e-6 * np.linalg.norm(w)
    assert linalg.choose_rank(spec.s, m, n, energy=1.0).rank == r


def test_one_definition_of_each_constant():
    from onnx_lowrank import config

    assert config.DEFAULT_DAMPING is linalg.DEFAULT_DAMPING
    assert config.CONV_MODES[:2] == linalg.CONV_MODES and config.RANK_RULES is linalg.RULES


@pytest.mark.parametrize("m,n,r,noise", [(512, 384, 40, 0.0), (768, 768, 64, 1e-3), (300, 900, 30, 1e-2)])
@pytest.mark.parametrize("energy", [0.9, 0.99, 0.999])
def test_leading_part_certifies_the_exact_rank_and_its_factors(m, n, r, noise, energy):
    rng = np.random.default_rng(m + r)
    w = (rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) / np.sqrt(r) + noise * rng.standard_normal((m, n))).astype(np.float32)
    exact = linalg.spectrum(w, method="exact")
    fast = linalg.leading(w, energy, smallest=0)
    assert linalg.spectrum(w, energy=energy).partial is (min(m, n) >= 1024)  # small matrices: the whole, it costs little
    assert fast.partial and fast.kept < min(m, n) and fast.total == pytest.approx(float(np.sum(w.astype(np.float64) ** 2)), rel=1e-9)
    rank = linalg.energy_rank(exact.s, energy)
    assert linalg.energy_rank(fast.s, energy, fast.total) == rank
    got, want = linalg.choose_rank(fast.s, m, n, energy=energy, total=fast.total), linalg.choose_rank(exact.s, m, n, energy=energy)
    assert got.rank == want.rank and got.energy == pytest.approx(want.energy, abs=1e-6)
    a, b = linalg.factors(exact, rank)
    c, d = linalg.factors(fast, rank)
    assert np.linalg.norm(a @ b - c @ d) <= 1e-4 * np.linalg.norm(a @ b)


def test_a_slowly_decaying_spectrum_gets_the_full_svd():
    w = np.random.default_rng(3).standard_normal((512, 512)).astype(np.float32)
    assert not linalg.spectrum(w, energy=0.93).partial
    with pytest.raises(ValueError, match="entropy rule needs every value"):
        linalg.choose_rank(np.array([3.0, 2.0]), 8, 8, energy=0.5, rule="entropy", total=20.0)


def test_the_exact_path_is_kept_when_asked_for():
    import onnx_lowrank as ol
    from models import lowrank, make_model, vi, init
    from onnx import helper

    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", [2, 512])], [vi("y", [2, 512])],
                   [init("W", lowrank(512, 512, 16))])
    fast = ol.compress(m, energy=0.99, min_params=0)
    exact = ol.compress(m, energy=0.99, min_params=0, svd="exact")
    assert fast.layers[0].rank == exact.layers[0].rank == 16 and fast.to_dict()["config"]["svd"] == "auto"
    assert fast.layers[0].energy == pytest.approx(exact.layers[0].energy, abs=1e-6)


def test_the_pass_caps_blas_threads_and_its_sessions_at_the_cores_given(monkeypatch):
    from threadpoolctl import threadpool_info

    import onnx_lowrank as ol
    from onnx_lowrank import runtime
    from onnx_lowrank.passes import spectra
    from models import matmul_model

    seen = []
    real = spectra.take_spectra

    def spy(*a, **k):
        seen.append([(i["internal_api"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"])
        return real(*a, **k)

    monkeypatch.setattr(spectra, "take_spectra", spy)
    res = ol.compress(matmul_model(), energy=0.9, min_params=0, cores=1)
    assert seen and all(n == 1 for per_lib in seen for _, n in per_lib)
    assert "cores" not in json.loads(next(p.value for p in res.model.metadata_props if p.key == "onnx_lowrank"))["config"]
    with runtime.limit(1):
        sess = runtime.session(matmul_model())
        assert runtime.threads.session_threads() == 1 and sess.get_session_options().intra_op_num_threads == 1
    assert runtime.threads.session_threads() is None and runtime.available_cores() >= 1


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64)])
def test_the_gram_route_gives_the_svd(shape):
    rng = np.random.default_rng(sum(shape))
    w = rng.standard_normal(shape).astype(np.float32)
    g, exact = linalg.svd.gram_svd(w), linalg.spectrum(w, method="exact")
    assert g.u.shape == exact.u.shape and g.vt.shape == exact.vt.shape and g.u.dtype == np.float32
    np.testing.assert_allclose(g.s, exact.s, rtol=1e-5, atol=1e-6 * exact.s[0])
    for r in (1, 5, min(shape)):
        a, b = linalg.factors(g, r)
        c, d = linalg.factors(exact, r)
        assert np.linalg.norm(a @ b - c @ d) <= 1e-4 * np.linalg.norm(c @ d)
    low = (rng.standard_normal((shape[0], 3)) @ rng.standard_normal((3, shape[1]))).astype(np.float32)
    spec = linalg.spectrum(low)
    a, b = linalg.factors(spec, linalg.energy_rank(spec.s, 1.0))
    assert a.shape[1] == 3 and np.linalg.norm(a @ b - low) <= 1e-5 * np.linalg.norm(low)
    assert np.all(np.isfinite(linalg.factors(spec, min(shape))[0]))  # values below 1e-10 s_1 carry zero vectors


@pytest.mark.parametrize("scale", [1e160, 1e297])
def test_huge_float64_weights_whose_squares_overflow_still_get_their_spectrum(scale):
    w = np.random.default_rng(5).standard_normal((120, 80))
    spec = linalg.spectrum(w * scale)  # the Gram matrix of w * scale overflows float64: worked scaled
    want = np.linalg.svd(w, compute_uv=False) * scale
    assert np.all(np.isfinite(spec.s)) and np.allclose(spec.s, want, rtol=1e-10)
    a, b = linalg.factors(spec, 80)
    assert np.linalg.norm(a @ b / scale - w) <= 1e-10 * np.linalg.norm(w)
