"""Workers: the sensitivity stage of adaptive mode with 1 and 2 workers, each on one thread.

    python benchmarks/executor.py [--layers 6] [--size 1024] [--samples 2048] [--repeats 3] [--ray]

A chain of ``--layers`` dense ``--size`` x ``--size`` MatMul weights with ReLUs goes through
``compress(..., adaptive=True, target_params=0.5, cores=N)`` in a child process per run:

* 1 worker, ``cores=1`` (everything here, on one thread);
* 2 local worker processes, ``cores=2`` (one thread each);
* with ``--ray``, 2 Ray actors on a local Ray (one CPU each).

The sensitivity runs (``1 + 10 L`` passes over the calibration set) dominate the pass; the table
gives the adaptive stage's time (``result.seconds["adaptive"]``), the whole pass, and the ratio,
as medians measured side by side in one session.  Results go to ``docs/benchmarks/executor.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_child  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "executor.md"

CHILD = r"""
import json, sys, time
import numpy as np, onnx
import onnx_lowrank as ol
path, data, workers, executor = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if executor == "ray":
    import ray
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
feeds = np.load(data)
calib = [{"x": feeds["x"][i:i + 64]} for i in range(0, len(feeds["x"]), 64)]
start = time.perf_counter()
res = ol.compress(path, adaptive=True, target_params=0.5, min_params=0, calib=calib, cores=workers, workers=workers,
                  executor=executor)
print(json.dumps({"seconds": time.perf_counter() - start, "adaptive": res.seconds["adaptive"],
                  "ranks": [d.rank for d in res.layers], "passes": res.sections["adaptive"]["passes"]}))
"""


def build(folder: Path, layers: int, size: int, samples: int) -> tuple[Path, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for k in range(layers):
        u = np.linalg.qr(rng.standard_normal((size, size)))[0]
        s = np.exp(-np.arange(size) / (size / 8))  # a decaying spectrum: ranks matter
        inits.append(numpy_helper.from_array((u * s @ np.linalg.qr(rng.standard_normal((size, size)))[0]).astype(np.float32), f"W{k}"))
        nodes += [helper.make_node("MatMul", [x, f"W{k}"], [f"h{k}"]), helper.make_node("Relu", [f"h{k}"], [f"a{k}"])]
        x = f"a{k}"
    nodes[-1] = helper.make_node("Identity", [f"h{layers - 1}"], ["y"])
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", size])], inits)
    path = folder / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    data = folder / "calib.npz"
    np.savez(data, x=rng.standard_normal((samples, size)).astype(np.float32))
    return path, data


def run(path: Path, data: Path, workers: int, executor: str) -> dict:
    return run_child(CHILD, str(path), str(data), str(workers), executor)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ray", action="store_true")
    args = ap.parse_args()
    settings = [(1, "local"), (2, "local")] + ([(2, "ray")] if args.ray else [])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        path, data = build(Path(tmp), args.layers, args.size, args.samples)
        for _ in range(args.repeats):  # interleaved, so that load changes hit every setting alike
            for s in settings:
                rows.setdefault(s, []).append(run(path, data, *s))
                print(s, rows[s][-1], flush=True)
    ranks = {json.dumps(r["ranks"]) for runs in rows.values() for r in runs}
    base = statistics.median(r["adaptive"] for r in rows[(1, "local")])
    lines = [
        "# Workers: the sensitivity stage on 1 and 2 workers",
        "",
        f"Measured by `python benchmarks/executor.py --layers {args.layers} --size {args.size} --samples {args.samples} "
        f"--repeats {args.repeats}{' --ray' if args.ray else ''}` on {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}: a chain of {args.layers} dense {args.size}x{args.size} MatMul weights with ReLUs, "
        f"`--adaptive --target-params 0.5`, {args.samples} calibration samples in feeds of 64, "
        f"{rows[(1, 'local')][0]['passes']} passes over them; each worker on one thread (`--cores` = workers). "
        "Medians of the runs, settings interleaved.",
        "",
        "| setting | adaptive stage | whole pass | stage speed-up |",
        "| --- | --- | --- | --- |",
    ]
    for (w, ex), runs in rows.items():
        stage = statistics.median(r["adaptive"] for r in runs)
        whole = statistics.median(r["seconds"] for r in runs)
        name = "1 worker (here)" if w == 1 else f"{w} workers ({'local processes' if ex == 'local' else 'Ray actors, local Ray'})"
        lines.append(f"| {name} | {stage:.1f} s | {whole:.1f} s | x{base / stage:.2f} |")
    lines += ["", f"Every run chose the same ranks: {'yes' if len(ranks) == 1 else 'NO'}. The workers' start (spawned "
              "processes import the package and build their own onnxruntime session once) is inside the stage time."]
    DOCS.parent.mkdir(exist_ok=True)
    DOCS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
