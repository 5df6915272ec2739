"""Where the pass's parallel work runs: in this process, in a local process pool, or on Ray.

Three stages are embarrassingly parallel: the spectra (one task per weight), the calibration
statistics (one task per shard of the feeds, whose sums add up) and the sensitivity runs of
adaptive mode (one task per layer and rank).  Each is written once, as

* ``setup(shared) -> state``: what every worker builds once from data shared by all tasks (an
  onnxruntime session, the model's data folder), and
* ``task(state, item) -> result``: one unit of work,

both plain module-level functions, and handed to an :class:`Executor`:

* :class:`InProcess` (``workers=1``, the default): calls them in order, here;
* :class:`Threads`: threads of this process, for the spectra of small weights (NumPy only, no
  onnxruntime) when the pass has more than one core and no other executor;
* :class:`ProcessPool` (``workers=N``): N local processes (spawned, so no thread state is
  inherited), each running ``setup`` once and then its share of the tasks;
* :class:`RayExecutor` (``executor="ray"``): N Ray actors, each running ``setup`` once; the
  shared data crosses the network once, through Ray's object store, never once per task.

Results come back in the order of the items, whatever the executor, and every worker keeps to
``cores // workers`` threads (BLAS and onnxruntime), so results match the in-process run.
"""

from __future__ import annotations

import concurrent.futures
import logging
import contextlib
import multiprocessing
import os
import pickle
import shutil
import signal
import tempfile
import threading
from typing import Any, Callable, Protocol, Sequence, TypeVar

from ..errors import UsageError, option
from .threads import available_cores, limit, limit_blas

log = logging.getLogger(__name__)

__all__ = ["Executor", "InProcess", "Threads", "ProcessPool", "RayExecutor", "make_executor", "EXECUTORS"]

S = TypeVar("S")
W = TypeVar("W")
T = TypeVar("T")
R = TypeVar("R")

EXECUTORS = ("local", "ray")


class Executor(Protocol):
    """Runs ``task(setup(shared), item)`` for every item; see the module docstring."""

    workers: int

    def run(self, setup: Callable[[S], W], task: Callable[[W, T], R], shared: S, items: Sequence[T],
            progress: Callable[[int, int], None] | None = None) -> list[R]:
        ...


class InProcess:
    """Everything here, in order."""

    workers = 1

    def run(self, setup, task, shared, items, progress=None):
        state = setup(shared)
        out = []
        for k, item in enumerate(items, 1):
            out.append(task(state, item))
            if progress is not None:
                progress(k, len(items))
        return out


# The state a pool worker built with ``setup``, and the task it runs (one per worker process).
_WORKER: dict[str, Any] = {}


def _quiet_exit(signum, frame) -> None:  # pragma: no cover  (runs in a worker process)
    os._exit(128 + signum)


def _pool_init(path: str, threads: int) -> None:
    # Ctrl-C reaches the whole process group: the main process reports it; a worker leaves at once,
    # without a traceback of its own
    signal.signal(signal.SIGINT, _quiet_exit)
    _WORKER["limit"] = limit(threads)
    _WORKER["limit"].__enter__()  # held for the life of the worker process
    with open(path, "rb") as f:
        setup, task, shared = pickle.load(f)
    _WORKER["task"] = task
    _WORKER["state"] = setup(shared)


def _pool_call(item):
    return _WORKER["task"](_WORKER["state"], item)


_POOLS = {"started": False}


def worker_processes_started() -> bool:
    """Whether this process has started worker processes (:class:`ProcessPool`)."""
    return _POOLS["started"]


def _as_completed(futures):
    """The futures as they finish, the waiting thread waking every quarter second: a Ctrl-C that
    the kernel hands to another thread of this process (a pool's feeder, a task's thread) only
    sets a flag, which the main thread acts on when it next wakes; a wait without a timeout never
    does, so the run went on to its end."""
    pending = set(futures)
    while pending:
        done, pending = concurrent.futures.wait(pending, timeout=0.25, return_when=concurrent.futures.FIRST_COMPLETED)
        yield from done


@contextlib.contextmanager
def _workers_start_deaf():
    """Ignore SIGINT while the pool starts its workers: a worker process starts with what it
    inherits, so a Ctrl-C during its imports and before its initializer (which then sets the quiet
    exit) neither kills it with a traceback of its own nor breaks the pool.  A Ctrl-C in the
    fraction of a second the parent spends starting them is lost; the next one stops the run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:  # (None: a handler not set from Python, which Python cannot put back; the default then)
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


class ProcessPool:
    """``workers`` local processes, each with ``cores // workers`` threads."""

    def __init__(self, workers: int, cores: int | None = None):
        self.workers = int(workers)
        self.threads = max(1, (cores or available_cores()) // self.workers)

    def run(self, setup, task, shared, items, progress=None):
        if not items:
            return []
        ctx = multiprocessing.get_context("spawn")
        _POOLS["started"] = True
        # The shared state goes to the workers through a file, not through the pipe each worker
        # starts from: a write of a model's worth of bytes into that pipe blocks until the worker
        # reads it (a worker that fails while starting then hangs the run), and the start of the
        # workers is where SIGINT is ignored (below), which must stay a fraction of a second.
        folder = tempfile.mkdtemp(prefix="onnx-lowrank-pool-")
        pool = None
        try:
            path = os.path.join(folder, "shared.pickle")
            try:
                with open(path, "wb") as f:
                    pickle.dump((setup, task, shared), f, protocol=pickle.HIGHEST_PROTOCOL)
            except OSError as exc:
                raise UsageError(f"the worker processes' shared state (about the model's size) could not be written to "
                                 f"{folder}: {exc.strerror or exc}; point TMPDIR at a folder with room, or run without "
                                 f"{option('workers')}.") from None
            pool = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_pool_init,
                                                          initargs=(path, self.threads))
            with _workers_start_deaf():
                futures = [pool.submit(_pool_call, item) for item in items]  # (the workers start here)
            for k, _ in enumerate(_as_completed(futures), 1):
                if progress is not None:
                    progress(k, len(items))
            results = [f.result() for f in futures]
            pool.shutdown()  # (every worker has read the file once this returns)
        except BaseException:  # an interrupt (or a failed task): the workers stop now, not after their tasks
            if pool is not None:
                for proc in list((getattr(pool, "_processes", None) or {}).values()):
                    proc.terminate()
                queue = getattr(pool, "_call_queue", None)
                if queue is not None:  # (its feeder may be blocked on a pipe no worker reads: exit must not wait for it)
                    queue.cancel_join_thread()
                pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # (a worker stopped while reading keeps its open file)
        return results


class RayExecutor:
    """``workers`` Ray actors (``address``: the cluster; default: a local Ray started here)."""

    def __init__(self, workers: int, cores: int | None = None, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise UsageError(f"{option('executor')} ray needs Ray: pip install 'onnx-lowrank[ray]'.") from None
        self.ray = ray
        address = address or os.environ.get("RAY_ADDRESS") or None  # (Ray jobs name their cluster so)
        if not ray.is_initialized():
            if address:
                check_reachable(address)
            # (without an address, a Ray of its own: "local" keeps ray.init from joining a cluster
            # already running on this machine, which refuses num_cpus)
            kwargs: dict[str, Any] = {"address": address} if address else {"address": "local", "num_cpus": cores or available_cores()}
            with _own_signals():
                ray.init(ignore_reinit_error=True, log_to_driver=False, include_dashboard=False, **kwargs)
        # Size the actors to the cluster's CPUs, not to this machine's, and each to one node: an
        # actor that can never be placed never starts, and the pool would wait for it for ever.
        nodes = [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        cpus = sum(nodes)
        if cpus < 1:
            raise UsageError(f"the Ray cluster has no CPU for the pass's workers; add a node with CPUs, or run without "
                             f"{option('executor')} ray.")
        self.workers, self.threads = ray_sizes(nodes, int(workers), cores)
        if self.workers < int(workers):
            log.warning("the Ray cluster has %d CPU(s) on %d node(s): %d worker(s) of %d thread(s) instead of %d",
                        cpus, len(nodes), self.workers, self.threads, int(workers))

    def run(self, setup, task, shared, items, progress=None):
        if not items:
            return []
        ray = self.ray
        actor = ray.remote(num_cpus=self.threads)(_RayWorker)
        shared_ref = ray.put(shared)  # once into the object store, not once per task
        actors = [actor.remote(setup, task, shared_ref, self.threads) for _ in range(min(self.workers, len(items)))]
        from ray.util import ActorPool

        pool = ActorPool(actors)
        out = []
        for k, result in enumerate(pool.map(lambda a, item: a.call.remote(item), list(items)), 1):
            out.append(result)
            if progress is not None:
                progress(k, len(items))
        for a in actors:
            ray.kill(a)
        return out


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse, in one line, a cluster address where nothing accepts a connection: Ray itself keeps
    retrying for minutes.  ``auto`` and ``local`` are Ray's to resolve."""
    import socket

    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # (an IPv6 address in brackets)
    fix = f"start the cluster (ray start --head) or correct {option('ray_address')} (host:port, or ray://host:10001)"
    if not host or not port.isdigit():
        raise UsageError(f"{option('ray_address')} {address}: not host:port; {fix}.")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else exc.strerror or type(exc).__name__
        raise UsageError(f"{option('ray_address')} {address}: nothing accepts connections there ({why}"
                         f"{f' within {timeout:g} s' if isinstance(exc, TimeoutError) else ''}); {fix}.") from None


@contextlib.contextmanager
def _own_signals():
    """Keep this process's SIGINT and SIGTERM handlers across the block: ``ray.init`` installs
    its own, after which Ctrl-C and SIGTERM would no longer remove a run's temporary files."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in handlers.items():
            if handler is not None:
                signal.signal(s, handler)


class Threads:
    """``workers`` threads of this process, BLAS at one thread in each: for NumPy-only tasks on
    matrices too small for BLAS's own threads to pay (LAPACK's ``eigh`` of a 384x384 matrix runs
    barely faster on two threads; two of them side by side run twice as fast).  NumPy releases the
    GIL inside LAPACK.  Each thread holds one task at a time, so memory grows by ``workers``
    tasks, not by all of them."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers))

    def run(self, setup, task, shared, items, progress=None):
        state = setup(shared)
        if self.workers == 1 or len(items) <= 1:
            return InProcess().run(lambda s: s, task, state, items, progress)
        out = []
        pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="onnx-lowrank")
        try:
            with limit_blas(1):
                futures = [pool.submit(task, state, item) for item in items]
                for k, future in enumerate(futures, 1):
                    next(_as_completed([future]))
                    out.append(future.result())
                    if progress is not None:
                        progress(k, len(items))
        finally:  # on an error or Ctrl-C, the queued tasks do not start; running ones end
            pool.shutdown(wait=True, cancel_futures=True)
        return out


def ray_sizes(nodes: Sequence[int], workers: int, cores: int | None = None) -> tuple[int, int]:
    """``(actors, threads each)`` for ``workers`` actors on nodes of ``nodes`` CPUs (``cores``
    caps the CPUs used): as many threads as an even share allows, fewer while the actors would
    not all fit on the nodes, and fewer actors only when one thread each does not fit either."""
    total = min(cores, sum(nodes)) if cores else sum(nodes)
    threads = max(1, min(total // max(1, min(workers, total)), max(nodes)))
    while threads > 1 and sum(n // threads for n in nodes) < workers:
        threads -= 1
    return max(1, min(workers, total, sum(n // threads for n in nodes))), threads


class _RayWorker:
    def __init__(self, setup, task, shared, threads: int):
        self.limit = limit(threads)
        self.limit.__enter__()
        self.task = task
        self.state = setup(shared)

    def call(self, item):
        return self.task(self.state, item)


def make_executor(workers: int = 1, executor: str = "local", cores: int | None = None, address: str | None = None) -> Executor:
    """The executor a configuration asks for (``workers=1`` locally: :class:`InProcess`)."""
    if executor == "ray":
        return RayExecutor(workers, cores, address)
    if workers <= 1:
        return InProcess()
    return ProcessPool(workers, cores)
