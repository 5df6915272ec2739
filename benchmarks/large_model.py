"""Models over 2 GiB with external data: the pass loads, factorizes and saves them into another folder.

    python benchmarks/large_model.py [--case untouched|factorized|both] [--gib 2.2] [--naive] [--keep]

Two models, both with every tensor in an external data file:

* ``untouched``: one large initializer the pass leaves alone (the bulk of the bytes, as an
  embedding table would) and two factorizable 1024x1024 MatMul weights;
* ``factorized``: nine 8192x8192 float32 MatMul weights of rank 64 in a chain (2.25 GiB), every
  one of them factorized (``--energy 0.999``).

The script runs the CLI in a child process, then checks that

* the output is complete beside ``-o`` in a different folder (the model and one data file named
  after its content), passes ``onnx.checker`` (path variant, full check) and runs in onnxruntime
  with the same outputs;
* the input folder is byte-for-byte unchanged;
* the peak resident memory of the CLI process stays far below the model size (weights are read
  one at a time, factors written as they are made, untouched tensors streamed, never loaded).

``--naive`` also times one full ``numpy.linalg.svd`` of an 8192x8192 weight (the work a pass
without leading spectra does nine times).  Results go to ``docs/large-models.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DOCS = Path(__file__).resolve().parent.parent / "docs" / "large-models.md"


def build(folder: Path, gib: float) -> Path:
    """x[1,1024] -> MatMul W1 -> MatMul W2 -> Add(Gather(table)[0]) ; table is the untouched bulk."""
    rng = np.random.default_rng(0)
    rows = int(gib * 2**30 / (1024 * 4))
    table = np.lib.format.open_memmap(folder / "table.npy", mode="w+", dtype=np.float32, shape=(rows, 1024))
    for i in range(0, rows, 65536):
        table[i:i + 65536] = rng.standard_normal((min(65536, rows - i), 1024), dtype=np.float32) * 0.01
    table.flush()
    w1 = (rng.standard_normal((1024, 32)) @ rng.standard_normal((32, 1024)) / 32).astype(np.float32)
    w2 = (rng.standard_normal((1024, 16)) @ rng.standard_normal((16, 1024)) / 16).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "W2"], ["h2"], name="mm2"),
        helper.make_node("Gather", ["table", "idx"], ["row"], name="lookup", axis=0),
        helper.make_node("Add", ["h2", "row"], ["y"], name="add"),
    ]
    idx = numpy_helper.from_array(np.array([0], np.int64), "idx")
    graph = helper.make_graph(nodes, "large", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])],
                              initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"), idx])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # Write the data file by hand, streaming the table, so building the benchmark needs no 2 GiB copy either.
    data_name = "large.onnx.data"
    offset = 0
    with open(folder / data_name, "wb") as f:
        for t in list(model.graph.initializer):
            if t.name in ("W1", "W2"):
                raw = t.raw_data
                _externalize(t, data_name, offset, len(raw))
                f.write(raw)
                offset += len(raw)
        nbytes = rows * 1024 * 4
        tp = model.graph.initializer.add()
        tp.name, tp.data_type = "table", TensorProto.FLOAT
        tp.dims.extend([rows, 1024])
        _externalize(tp, data_name, offset, nbytes)
        with open(folder / "table.npy", "rb") as src:
            src.seek(nbytes and os.path.getsize(folder / "table.npy") - nbytes)
            shutil.copyfileobj(src, f, 64 * 2**20)
    (folder / "table.npy").unlink()
    path = folder / "large.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _externalize(t: TensorProto, location: str, offset: int, length: int) -> None:
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.iterdir()):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(64 * 2**20), b""):
                h.update(chunk)
        out[p.name] = h.hexdigest()
    return out


def build_chain(folder: Path, n: int = 8192, rank: int = 64, count: int = 9) -> Path:
    """x[1,n] -> MatMul W1 -> ... -> MatMul W9 -> y; each W (n x n) of rank 64, scaled to keep y near 1."""
    rng = np.random.default_rng(0)
    data_name = "chain.onnx.data"
    inits, nodes = [], []
    with open(folder / data_name, "wb") as f:
        offset = 0
        for k in range(count):
            a = rng.standard_normal((n, rank), dtype=np.float32)
            b = rng.standard_normal((rank, n), dtype=np.float32) / np.float32(np.sqrt(n * rank))
            w = a @ b
            raw = w.tobytes()
            del w
            t = TensorProto(name=f"W{k + 1}", data_type=TensorProto.FLOAT, dims=[n, n])
            _externalize(t, data_name, offset, len(raw))
            f.write(raw)
            offset += len(raw)
            inits.append(t)
            nodes.append(helper.make_node("MatMul", [f"h{k}" if k else "x", f"W{k + 1}"], [f"h{k + 1}" if k < count - 1 else "y"],
                                          name=f"mm{k + 1}"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], initializer=inits)
    path = folder / "chain.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path


# The child reports its own peak (VmHWM): getrusage(RUSAGE_CHILDREN) would also count pages
# inherited from this process at fork time.
_WRAPPER = (
    "import sys\n"
    "from onnx_lowrank.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
    "print('PEAK_KIB', hwm)\n"
    "raise SystemExit(rc)\n"
)


def run_case(case: str, root: Path, gib: float) -> dict:
    import onnxruntime as ort

    src, dst = root / case / "in", root / case / "out"
    src.mkdir(parents=True)
    dst.mkdir(parents=True)
    t0 = time.perf_counter()
    model_path = build(src, gib) if case == "untouched" else build_chain(src)
    size_in = sum(p.stat().st_size for p in src.iterdir())
    print(f"built {model_path} ({size_in / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f}s", flush=True)
    before = digest(src)
    cmd = [sys.executable, "-c", _WRAPPER, str(model_path), "-o", str(dst / "small.onnx"), "--energy", "0.999", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    print(r.stdout.strip(), r.stderr.strip(), flush=True)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.split("PEAK_KIB")[1].split()[0]) * 1024
    assert digest(src) == before, "input folder changed"
    files = sorted(p.name for p in dst.iterdir())
    assert len(files) == 2 and files[0] == "small.onnx" and files[1].startswith("small.onnx.") and files[1].endswith(".data"), files
    onnx.checker.check_model(str(dst / "small.onnx"), full_check=True)
    dim = 1024 if case == "untouched" else 8192
    x = np.random.default_rng(1).standard_normal((1, dim)).astype(np.float32)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    y_in = ort.InferenceSession(str(model_path), so).run(None, {"x": x})[0]
    y_out = ort.InferenceSession(str(dst / "small.onnx"), so).run(None, {"x": x})[0]
    err = float(np.abs(y_in - y_out).max() / np.abs(y_in).max())
    size_out = sum(p.stat().st_size for p in dst.iterdir())
    return {"case": case, "size_in": size_in, "size_out": size_out, "wall": wall, "peak": peak, "files": files, "err": err}


def naive_svd_seconds(n: int = 8192) -> float:
    """One full numpy SVD of an n x n float32 weight of rank 64 (what a naive pass does per weight)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, 64), dtype=np.float32) @ rng.standard_normal((64, n), dtype=np.float32)
    t0 = time.perf_counter()
    np.linalg.svd(w, full_matrices=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("untouched", "factorized", "both"), default="both")
    ap.add_argument("--gib", type=float, default=2.2)
    ap.add_argument("--naive", action="store_true", help="also time one full SVD of an 8192x8192 weight")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    import onnxruntime as ort

    root = Path(tempfile.mkdtemp(prefix="lowrank-large-"))
    results = []
    try:
        for case in (("untouched", "factorized") if args.case == "both" else (args.case,)):
            results.append(run_case(case, root, args.gib))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    naive = naive_svd_seconds() if args.naive else None
    lines = [
        "# Large models (> 2 GiB, external data)",
        "",
        "Measured by `python benchmarks/large_model.py --case %s%s` on %s, Python %s, onnx %s, onnxruntime %s, %d CPUs, "
        "BLAS threads 2." % (args.case, " --naive" if args.naive else "", platform.machine(), platform.python_version(),
                             onnx.__version__, ort.__version__, os.cpu_count()),
        "",
        "* **untouched**: an untouched %.1f GiB initializer and two factorizable 1024x1024 MatMul weights;" % args.gib,
        "* **factorized**: nine 8192x8192 float32 MatMul weights of rank 64 in a chain, every one factorized.",
        "",
        "Both keep every tensor in an external data file; the CLI runs `--energy 0.999 -q` and writes the output "
        "into a different folder.",
        "",
        "| what | " + " | ".join(r["case"] for r in results) + " |",
        "| --- |" + " --- |" * len(results),
        "| input (model + data) | " + " | ".join(f"{r['size_in'] / 2**30:.3f} GiB" for r in results) + " |",
        "| output (model + data) | " + " | ".join(f"{r['size_out'] / 2**30:.3f} GiB" for r in results) + " |",
        "| CLI wall time | " + " | ".join(f"{r['wall']:.1f} s" for r in results) + " |",
        "| CLI peak resident memory | " + " | ".join(f"{r['peak'] / 2**30:.2f} GiB ({r['peak'] / r['size_in']:.2f}x the model)"
                                                     for r in results) + " |",
        "| output files | " + " | ".join(", ".join(r["files"]) for r in results) + " |",
        "| max relative output difference | " + " | ".join(f"{r['err']:.2e}" for r in results) + " |",
        "| input folder unchanged | " + " | ".join("yes (sha256 before and after)" for _ in results) + " |",
    ]
    if naive is not None:
        lines += ["", f"One full `numpy.linalg.svd` of an 8192x8192 rank-64 float32 weight took {naive:.1f} s here (2 BLAS "
                  f"threads): {9 * naive:.0f} s for the nine weights of the factorized model, the spectra a naive pass takes."]
    lines += [
        "",
        "Why memory stays low: untouched tensors are never loaded (the save streams them from the input's data file "
        "into the output's in 64 MiB chunks); factorizable weights are read one at a time; under an energy threshold "
        "only the leading part of each spectrum is computed when it certifies the rank (`linalg.leading`); the factors "
        "of a model with external data go to a private spill file as they are made, and the model in memory holds "
        "no weight data. The data file is named after its content (`small.onnx.<16 hex>.data`): see docs/safety.md.",
    ]
    DOCS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
