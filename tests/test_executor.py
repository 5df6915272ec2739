"""The parallel stages give the same result wherever their tasks run: here, in a process pool, on Ray."""

from __future__ import annotations

import signal

import numpy as np
import pytest

import onnx_lowrank as ol
from onnx_lowrank.runtime.executor import InProcess, ProcessPool, RayExecutor, make_executor
from test_rank_selection import chain_model

def _square(state, item):
    return state * item * item


def test_executors_keep_the_order_of_the_items():
    items = list(range(7))
    want = [3 * i * i for i in items]
    assert InProcess().run(lambda s: s, _square, 3, items) == want
    assert ProcessPool(2, cores=2).run(_identity, _square, 3, items) == want


def _identity(x):
    return x


def _adaptive(**options):
    rng = np.random.default_rng(5)  # the same data for every run compared
    calib = [{"x": rng.standard_normal((16, 96)).astype(np.float32)} for _ in range(2)]
    return ol.compress(chain_model(), adaptive=True, target_params=0.5, min_params=0, calib=calib, cores=2, **options)


def test_sensitivity_in_worker_processes_matches_the_run_here():
    here, pooled = _adaptive(), _adaptive(workers=2)
    assert [(d.rank, d.factorized) for d in pooled.layers] == [(d.rank, d.factorized) for d in here.layers]
    for a, b in zip(here.layers, pooled.layers):
        assert a.sensitivity == pytest.approx(b.sensitivity, rel=1e-5, abs=1e-9)
    assert pooled.sections["adaptive"]["passes"] == here.sections["adaptive"]["passes"]


def test_sensitivity_on_a_local_ray_matches_the_run_here():
    ray = pytest.importorskip("ray", reason="Ray is the optional 'ray' extra")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        here, remote = _adaptive(), _adaptive(workers=2, executor="ray")  # starts a local Ray
        assert [(d.rank, d.factorized) for d in remote.layers] == [(d.rank, d.factorized) for d in here.layers]
        for a, b in zip(here.layers, remote.layers):
            assert a.sensitivity == pytest.approx(b.sensitivity, rel=1e-5, abs=1e-9)
        assert isinstance(make_executor(2, "ray"), RayExecutor)
        # starting Ray left Ctrl-C and SIGTERM to this process's handlers (the save's cleanup needs them)
        assert {s: signal.getsignal(s) for s in handlers} == handlers
    finally:
        ray.shutdown()
        for s, handler in handlers.items():
            signal.signal(s, handler)


def test_a_ray_address_without_ray_is_a_usage_error():
    with pytest.raises(ol.UsageError, match="ray_address names a Ray cluster"):
        ol.CompressConfig(ray_address="ray://head:10001")


def test_spectra_and_statistics_in_worker_processes_match_the_run_here():
    rng = np.random.default_rng(9)
    calib = [{"x": rng.standard_normal((16, 96)).astype(np.float32)} for _ in range(3)]
    options = dict(data_aware=True, energy=0.9, min_params=0, calib=calib, cores=2)
    here, pooled = ol.compress(chain_model(), **options), ol.compress(chain_model(), workers=2, **options)
    assert [d.rank for d in pooled.layers] == [d.rank for d in here.layers]
    assert [d.energy for d in pooled.layers] == pytest.approx([d.energy for d in here.layers], abs=1e-9)
    assert pooled.sections["data_aware"] == here.sections["data_aware"]
