import numpy as np
import pytest

from onnx_lowrank import decompose
from onnx_lowrank.policies import choose_rank
from models import lowrank


@pytest.mark.parametrize("m,n", [(40, 30), (30, 40), (64, 64), (100, 7)])
@pytest.mark.parametrize("r", [1, 3, 6])
def test_exactly_lowrank_matrix_gives_its_rank_and_tiny_error(m, n, r):
    w = lowrank(m, n, r, seed=m + n + r, dtype=np.float64)
    spec = decompose.spectrum(w)
    rank = decompose.energy_rank(spec.s, 1.0)
    assert rank == r
    a, b = decompose.factors(spec, rank)
    assert a.shape == (m, r) and b.shape == (r, n)
    assert np.linalg.norm(w - a @ b) / np.linalg.norm(w) < 1e-6


def test_float32_weight_energy_one_recovers_rank():
    w = lowrank(80, 50, 7, seed=3)
    assert decompose.energy_rank(decompose.spectrum(w).s, 1.0) == 7


def test_rank_never_decreases_with_energy_and_stays_in_bounds():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((50, 30)) * np.linspace(3, 0.01, 30)
    s = decompose.spectrum(w).s
    ranks = [decompose.energy_rank(s, e) for e in np.linspace(0.01, 1.0, 60)]
    assert ranks == sorted(ranks)
    assert all(1 <= r <= 30 for r in ranks)


def test_energy_rank_hand_example():
    s = np.array([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1: cumulative 9/14, 13/14, 1
    assert decompose.energy_rank(s, 0.6) == 1
    assert decompose.energy_rank(s, 9 / 14) == 1
    assert decompose.energy_rank(s, 0.9) == 2
    assert decompose.energy_rank(s, 0.99) == 3
    assert decompose.energy_kept(s, 2) == pytest.approx(13 / 14)
    assert decompose.relative_error(s, 2) == pytest.approx(np.sqrt(1 / 14))


def test_factors_are_identical_across_runs_and_sign_fixed():
    w = np.random.default_rng(5).standard_normal((30, 20)).astype(np.float32)
    runs = [decompose.factors(decompose.spectrum(w.copy()), 5) for _ in range(3)]
    for a, b in runs[1:]:
        np.testing.assert_array_equal(a, runs[0][0])
        np.testing.assert_array_equal(b, runs[0][1])
    u = decompose.spectrum(w).u
    pivots = np.argmax(np.abs(u), axis=0)
    assert np.all(u[pivots, np.arange(u.shape[1])] > 0)


def test_break_even_and_rank_multiple():
    assert decompose.break_even_rank(64, 64) == 31  # 32 * 128 == 64 * 64 saves nothing
    assert decompose.break_even_rank(512, 256) == 170
    assert decompose.round_rank(5, 8, 512, 256) == 8
    assert decompose.round_rank(161, 8, 512, 256) == 168
    assert decompose.round_rank(169, 8, 512, 256) == 169  # 176 would pass break-even (170)
    assert decompose.round_rank(9, 1, 512, 256) == 9


def test_choose_rank_fixed_rank_is_capped():
    s = np.ones(10)
    c = choose_rank(s, 10, 40, rank=64)
    assert c.rank == 10 and c.full_rank == 10 and not c.saves


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_energy_out_of_range_is_rejected(bad):
    with pytest.raises(ValueError, match="energy"):
        decompose.energy_rank(np.ones(3), bad)


def test_spectrum_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        decompose.spectrum(np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        decompose.spectrum(np.array([[1.0, np.nan]]))


def test_math_module_never_imports_onnx():
    import ast
    import pathlib

    for name in ("decompose.py", "policies.py"):
        tree = ast.parse((pathlib.Path(decompose.__file__).parent / name).read_text())
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "onnx" not in imported and "onnxruntime" not in imported, name
