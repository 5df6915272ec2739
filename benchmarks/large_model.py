"""A model over 2 GiB with external data: the pass loads, factorizes and saves it into another folder.

    python benchmarks/large_model.py [--gib 2.2] [--keep]

The model holds one large untouched initializer (the bulk of the bytes, as an embedding table would)
and a few factorizable MatMul weights, all in an external data file.  The script runs the CLI in a
child process, then checks that

* the output is complete beside ``-o`` in a different folder (model + one data file), passes
  ``onnx.checker`` (path variant, full check) and runs in onnxruntime with the same outputs;
* the input folder is byte-for-byte unchanged;
* the peak resident memory of the CLI process stays far below the model size (untouched tensors
  are streamed from the input's data file, never loaded).

Results go to ``docs/large-models.md``.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.2)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lowrank-large-"))
    src, dst = root / "in", root / "out"
    src.mkdir()
    dst.mkdir()
    try:
        t0 = time.perf_counter()
        model_path = build(src, args.gib)
        size_in = sum(p.stat().st_size for p in src.iterdir())
        print(f"built {model_path} ({size_in / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f}s")
        before = digest(src)
        # The child reports its own peak (VmHWM): getrusage(RUSAGE_CHILDREN) would also count pages
        # inherited from this process at fork time.
        wrapper = (
            "import sys, atexit\n"
            "from onnx_lowrank.cli import main\n"
            "rc = main(sys.argv[1:])\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "print('PEAK_KIB', hwm)\n"
            "raise SystemExit(rc)\n"
        )
        cmd = [sys.executable, "-c", wrapper, str(model_path), "-o", str(dst / "small.onnx"), "--energy", "0.999", "-q"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        print(r.stdout.strip(), r.stderr.strip())
        peak = int(r.stdout.split("PEAK_KIB")[1].split()[0]) * 1024
        assert r.returncode == 0, r.stderr
        assert digest(src) == before, "input folder changed"
        files = sorted(p.name for p in dst.iterdir())
        assert files == ["small.onnx", "small.onnx.data"], files
        onnx.checker.check_model(str(dst / "small.onnx"), full_check=True)
        import onnxruntime as ort

        x = np.random.default_rng(1).standard_normal((1, 1024)).astype(np.float32)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        y_in = ort.InferenceSession(str(model_path), so).run(None, {"x": x})[0]
        y_out = ort.InferenceSession(str(dst / "small.onnx"), so).run(None, {"x": x})[0]
        err = float(np.abs(y_in - y_out).max() / np.abs(y_in).max())
        size_out = sum(p.stat().st_size for p in dst.iterdir())
        lines = [
            "# Large models (> 2 GiB, external data)",
            "",
            "Measured by `python benchmarks/large_model.py --gib %.1f` on %s, Python %s, onnx %s, onnxruntime %s, %d CPUs."
            % (args.gib, platform.machine(), platform.python_version(), onnx.__version__, ort.__version__, os.cpu_count()),
            "",
            "The model keeps an untouched %.2f GiB initializer and two factorizable 1024x1024 MatMul weights in an "
            "external data file; the CLI writes the output into a different folder." % (size_in / 2**30),
            "",
            "| what | value |",
            "| --- | --- |",
            f"| input (model + data) | {size_in / 2**30:.3f} GiB |",
            f"| output (model + data) | {size_out / 2**30:.3f} GiB |",
            f"| CLI wall time | {wall:.1f} s |",
            f"| CLI peak resident memory | {peak / 2**30:.2f} GiB ({peak / size_in:.2f}x the model) |",
            f"| output files | {', '.join(files)} |",
            f"| max relative output difference | {err:.2e} |",
            "| input folder unchanged | yes (sha256 before and after) |",
            "",
            "Untouched tensors are never loaded: the pass reads only the weights it factorizes, and the save "
            "streams every other tensor from the input's data file into the output's in 64 MiB chunks.",
        ]
        DOCS.parent.mkdir(exist_ok=True)
        DOCS.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
