"""The parallel stages give the same result wherever their tasks run: here, in a process pool, on Ray."""

from __future__ import annotations

import signal
import time

import numpy as np
import onnx
import pytest

import onnx_lowrank as ol
from onnx_lowrank.runtime.executor import InProcess, ProcessPool, RayExecutor, Threads, make_executor
from test_rank_selection import chain_model


def _square(state, item):
    return state * item * item


def test_executors_keep_the_order_of_the_items():
    items = list(range(7))
    want = [3 * i * i for i in items]
    assert InProcess().run(lambda s: s, _square, 3, items) == want
    assert ProcessPool(2, cores=2).run(_identity, _square, 3, items) == want
    seen = []
    assert Threads(2).run(_identity, _square, 3, items, lambda k, n: seen.append((k, n))) == want
    assert seen == [(k, 7) for k in range(1, 8)]


def test_a_failing_threaded_task_raises_and_starts_no_more_tasks():
    started = []

    def task(state, item):
        started.append(item)
        if item == 1:
            raise ValueError("bad weight")
        time.sleep(0.02)  # a spectrum takes a while; the queue is cancelled long before it drains
        return item

    with pytest.raises(ValueError, match="bad weight"):
        Threads(2).run(_identity, task, None, list(range(50)))
    assert len(started) < 50


def _slow_after_first(state, item):
    time.sleep(0 if item == 0 else 60)
    return item


def test_workers_start_with_sigint_ignored_and_the_handler_is_restored_after():
    """A worker inherits an ignored SIGINT across spawn and keeps it until its initializer sets
    the quiet exit: a Ctrl-C during its imports prints no traceback of its own."""
    from onnx_lowrank.runtime.executor import _workers_start_deaf

    before = signal.getsignal(signal.SIGINT)
    with _workers_start_deaf():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is before


_CALLER = """
import sys, time
from onnx_lowrank.runtime.executor import ProcessPool

def slow(state, item):
    time.sleep(60)
    return item

def identity(shared):
    return shared

if __name__ == "__main__" or {unguarded}:
    print("ready", flush=True)
    start = time.time()
    try:
        ProcessPool(2, cores=2).run(identity, slow, bytes(20_000_000), [1, 2, 3])
    except KeyboardInterrupt:
        print("interrupted after", round(time.time() - start, 1), flush=True)
"""


def _run_caller(tmp_path, unguarded: bool, interrupt_after: float | None):
    import os
    import subprocess
    import sys

    script = tmp_path / "caller.py"
    script.write_text(_CALLER.format(unguarded=unguarded))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if interrupt_after is not None:
        assert proc.stdout.readline().strip() == "ready"  # (imports done: a slow machine takes its time there)
        time.sleep(interrupt_after)
        proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    try:
        out, err = proc.communicate(timeout=50)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return out, err, time.monotonic() - start


def test_a_python_caller_interrupted_while_workers_run_gets_its_keyboardinterrupt_at_once(tmp_path):
    """Ctrl-C to a Python program (not its process group) whose workers go on: the kernel may hand
    the signal to a pool thread, and a main thread waiting without a timeout never saw it."""
    out, err, waited = _run_caller(tmp_path, unguarded=False, interrupt_after=3.0)
    assert out.startswith("interrupted after") and waited < 10, (out, err)
    assert "Traceback" not in err


def test_a_script_without_a_main_guard_fails_instead_of_hanging(tmp_path):
    """Its worker re-runs the script and dies while starting; the model's worth of shared state
    no longer goes through the pipe the worker never read, where the run waited for ever."""
    out, err, waited = _run_caller(tmp_path, unguarded=True, interrupt_after=None)
    assert "BrokenProcessPool" in err and waited < 45, (out, err[-500:])


def test_an_interrupted_process_pool_stops_its_workers_at_once():
    pool = ProcessPool(2, cores=2)

    def interrupt(done, total):
        raise KeyboardInterrupt

    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        pool.run(_identity, _slow_after_first, None, [0, 1, 2], interrupt)
    assert time.perf_counter() - start < 30  # (the workers were not waited for: their tasks sleep a minute)


def test_spectra_side_by_side_on_two_cores_match_one_core():
    rng = np.random.default_rng(3)
    weights = [rng.standard_normal((96, 64)).astype(np.float32) @ np.diag(np.linspace(2, 0.01, 64)).astype(np.float32)
               for _ in range(5)]
    one, two = (ol.compress(chain_of(weights), energy=0.9, min_params=0, cores=c) for c in (1, 2))
    assert [d.rank for d in one.layers] == [d.rank for d in two.layers] and all(d.factorized for d in one.layers)
    for a, b in zip(one.model.graph.initializer, two.model.graph.initializer):
        x, y = onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b)
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * float(np.abs(x).max()))


def chain_of(weights):
    """MatMul after MatMul, one per weight (each maps 96 -> 64 -> 96 ... through a transpose pair)."""
    nodes, inits, x = [], [], "x"
    for k, w in enumerate(weights):
        w = w if k % 2 == 0 else w.T.copy()
        inits.append(onnx.numpy_helper.from_array(w, f"W{k}"))
        nodes.append(onnx.helper.make_node("MatMul", [x, f"W{k}"], [f"h{k}"], name=f"mm{k}"))
        x = f"h{k}"
    out_dim = weights[-1].shape[1] if (len(weights) - 1) % 2 == 0 else weights[-1].shape[0]
    graph = onnx.helper.make_graph(nodes, "chain", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 96])],
                                   [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [2, out_dim])], inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


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


def test_ray_workers_are_sized_to_the_cpus_of_the_cluster(caplog):
    """Two one-CPU actors on a one-CPU Ray: the second never starts and the pool would wait for it."""
    ray = pytest.importorskip("ray", reason="Ray is the optional 'ray' extra")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with caplog.at_level("WARNING"):
            small = RayExecutor(2, cores=1)
        assert (small.workers, small.threads) == (1, 1)
        assert "has 1 CPU(s) on 1 node(s): 1 worker(s) of 1 thread(s) instead of 2" in caplog.text
        assert small.run(lambda s: s, lambda s, x: x + s, 10, [1, 2, 3]) == [11, 12, 13]
    finally:
        ray.shutdown()
        for s, handler in handlers.items():
            signal.signal(s, handler)


def test_ray_actors_fit_on_the_nodes():
    from onnx_lowrank.runtime.executor import ray_sizes

    assert ray_sizes([8, 8], 3) == (3, 4)  # (5 threads each: only two would fit, one per node)
    assert ray_sizes([8, 8], 1) == (1, 8)  # (an actor lives on one node)
    assert ray_sizes([8, 8], 2, cores=4) == (2, 2)
    assert ray_sizes([1], 2) == (1, 1)
    assert ray_sizes([2, 1], 3) == (3, 1)


def test_a_ray_address_without_ray_is_a_usage_error():
    with pytest.raises(ol.UsageError, match="ray_address names a Ray cluster"):
        ol.CompressConfig(ray_address="ray://head:10001")


def test_a_ray_address_nothing_answers_at_is_refused_at_once():
    """Ray itself retries an address where nothing listens for minutes."""
    import socket
    import time

    from onnx_lowrank.runtime.executor import check_reachable

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}")
        check_reachable(f"ray://127.0.0.1:{port}")
    start = time.monotonic()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):  # (closed now)
        with pytest.raises(ol.UsageError, match=r"nothing accepts connections there \(.*\); start the cluster"):
            check_reachable(address)
    assert time.monotonic() - start < 5
    with pytest.raises(ol.UsageError, match="not host:port"):
        check_reachable("head-node")
    check_reachable("auto")  # (Ray's to resolve)
    pytest.importorskip("ray", reason="Ray is the optional 'ray' extra")
    with pytest.raises(ol.UsageError, match="nothing accepts connections there"):
        ol.compress(chain_model(), executor="ray", workers=2, ray_address=f"127.0.0.1:{port}")


def test_spectra_and_statistics_in_worker_processes_match_the_run_here():
    rng = np.random.default_rng(9)
    calib = [{"x": rng.standard_normal((16, 96)).astype(np.float32)} for _ in range(3)]
    options = dict(data_aware=True, energy=0.9, min_params=0, calib=calib, cores=2)
    here, pooled = ol.compress(chain_model(), **options), ol.compress(chain_model(), workers=2, **options)
    assert [d.rank for d in pooled.layers] == [d.rank for d in here.layers]
    assert [d.energy for d in pooled.layers] == pytest.approx([d.energy for d in here.layers], abs=1e-9)
    assert pooled.sections["data_aware"] == here.sections["data_aware"]


def test_more_threads_than_cores_are_taken_with_a_warning(caplog):
    from onnx_lowrank.runtime import available_cores

    many = available_cores() + 3
    m = chain_model()
    with caplog.at_level("WARNING"):
        ol.compress(m, energy=0.9, cores=many, min_params=0)
        ol.compress(m, energy=0.9, cores=1, min_params=0)
    said = [r.getMessage() for r in caplog.records if "CPU core(s)" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"cores {many}: this process may run on {available_cores()} CPU core(s)")
