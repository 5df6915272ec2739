"""The pass on an idle machine and on a loaded one, with its BLAS and onnxruntime threads capped.

    python benchmarks/threads.py [--weights 8] [--size 1024] [--repeats 3]

A model of ``--weights`` dense ``--size`` x ``--size`` float32 MatMul weights (a flat spectrum:
every weight takes a full SVD) goes through ``onnx_lowrank.compress(..., energy=0.93)`` in a child
process, once per setting:

* ``--cores N`` for N = 1 and the machine's cores (the default);
* ``unmanaged``: the same pass with BLAS left to its own thread count (threadpoolctl bypassed),
  as the tool ran before it capped them;

each on an idle machine and with one busy process per core but one ("loaded": another job on the
same machine).  Times are medians over ``--repeats`` runs, measured side by side in one session.
Results go to ``docs/benchmarks/threads.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_child  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "threads.md"

CHILD = r"""
import json, sys, time
import onnx
import onnx_lowrank as ol
setting, path = sys.argv[1], sys.argv[2]
if setting == "unmanaged":  # compress() takes runtime.limit when called: let BLAS choose its own threads
    import contextlib
    import onnx_lowrank.runtime as rt

    @contextlib.contextmanager
    def passthrough(cores=None):
        yield 0

    rt.limit = passthrough
    options = {}
else:
    options = {"cores": int(setting)}
model = onnx.load(path)
start = time.perf_counter()
res = ol.compress(model, energy=0.93, min_params=0, **options)
print(json.dumps({"seconds": time.perf_counter() - start, "spectra": res.seconds.get("spectra")}))
"""


def build(folder: Path, weights: int, size: int) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for k in range(weights):
        inits.append(numpy_helper.from_array((rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32), f"W{k}"))
        nodes.append(helper.make_node("MatMul", [f"h{k}" if k else "x", f"W{k}"], [f"h{k + 1}" if k < weights - 1 else "y"]))
    graph = helper.make_graph(nodes, "flat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, size])], inits)
    path = folder / "flat.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def run(setting: str, path: Path) -> dict:
    return run_child(CHILD, setting, str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=int, default=8)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from onnx_lowrank.runtime import available_cores

    cores = available_cores()
    settings = sorted({"1", str(cores)}) + ["unmanaged"]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp), args.weights, args.size)
        for load in ("idle", "loaded"):
            burners = []
            if load == "loaded":
                burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(max(1, cores - 1))]
                time.sleep(1.0)
            try:
                for setting in settings:
                    times = [run(setting, path) for _ in range(args.repeats)]
                    rows[(load, setting)] = (statistics.median(t["seconds"] for t in times),
                                             statistics.median(t["spectra"] for t in times))
                    print(load, setting, rows[(load, setting)], flush=True)
            finally:
                for b in burners:
                    b.kill()
    label = {"1": "`--cores 1`", str(cores): f"`--cores {cores}` (default)", "unmanaged": "BLAS unmanaged (before)"}
    lines = [
        "# Threads: the pass on an idle and on a loaded machine",
        "",
        f"Measured by `python benchmarks/threads.py --weights {args.weights} --size {args.size} --repeats {args.repeats}` on "
        f"{platform.machine()}, {cores} cores, Python {platform.python_version()}, numpy {np.__version__}: {args.weights} dense "
        f"{args.size}x{args.size} float32 weights (flat spectra, so every one takes a full SVD), `--energy 0.93`, "
        "in a child process per run, median of the runs. *Loaded*: one busy process per core but one.",
        "",
        "| setting | idle: pass | idle: spectra | loaded: pass | loaded: spectra | loaded / idle |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for setting in settings:
        (ip, isp), (lp, lsp) = rows[("idle", setting)], rows[("loaded", setting)]
        lines.append(f"| {label[setting]} | {ip:.2f} s | {isp:.2f} s | {lp:.2f} s | {lsp:.2f} s | x{lp / ip:.2f} |")
    lines += ["", "The pass caps BLAS threads (threadpoolctl) and the intra-op threads of its own onnxruntime sessions at "
              "`--cores` (default: the cores it may run on), with onnxruntime's spinning off, so the two never "
              "oversubscribe the machine; sessions that time the model keep the threads they are given.",
              "",
              "The default takes every core the process may run on; it cannot know that another job holds one of "
              "them. On a shared machine give the pass the cores that are free (`--cores 1` above): BLAS threads "
              "that wait on a busy core cost more than they bring."]
    DOCS.parent.mkdir(exist_ok=True)
    DOCS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
