"""The math package stands alone: it imports without onnx, and each module keeps its promises."""

from __future__ import annotations

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
