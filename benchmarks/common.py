"""Shared pieces of the benchmark scripts: variants, quality metrics, paired timings, tables.

Every latency number here comes from :func:`onnx_lowrank.bench.bench` with two models run
interleaved (A B, B A, ...) in sessions pinned to a thread count; ratios are medians of per-pair
ratios.  Tables carry the machine, the onnxruntime version, threads and number of runs.
"""

from __future__ import annotations

import json
import platform
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from onnx_lowrank import compress  # noqa: E402
from onnx_lowrank.bench import bench, machine_info  # noqa: E402
from onnx_lowrank.passes.quantize import quantize_int8  # noqa: E402
from onnx_lowrank.runtime import run_all, session  # noqa: E402
from onnx_lowrank.verify import accuracy, compare, macro_f1  # noqa: E402

DOCS = ROOT / "docs" / "benchmarks"
WORK = ROOT / "benchmarks" / "_work"

#: all-MiniLM-L6-v2 as the transformer benchmarks run it: its inputs, sequence 128, timed at batch 1 (bench scales it).
MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MINILM_SEQ = 128
MINILM_SHAPES = (",".join(f"{name}:1x{MINILM_SEQ}" for name in MINILM_INPUTS),)


@dataclass
class Variant:
    """One model to compare: its proto, size, quality and what the pass reported."""

    name: str
    model: onnx.ModelProto
    params: int
    size: int
    quality: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def file_size(model: onnx.ModelProto) -> int:
    """Bytes of the model saved as one file (no external data)."""
    return model.ByteSize()


def count_params(model: onnx.ModelProto) -> int:
    return int(sum(int(np.prod(t.dims)) if len(t.dims) else 1 for t in model.graph.initializer))


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]])


def environment(threads: Sequence[int], runs: str) -> str:
    m = machine_info()
    return (f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs (shared with other jobs), {m['os']}; "
            f"Python {platform.python_version()}, onnxruntime {m['onnxruntime']} (CPUExecutionProvider), "
            f"intra-op threads {', '.join(map(str, threads))}, inter-op threads 1; {runs}.")


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray], batch: int = 256) -> np.ndarray:
    """First output over all samples, in batches, 2 threads."""
    sess = session(model, threads=2)
    n = len(next(iter(feeds.values())))
    parts = [{k: v[i:i + batch] for k, v in feeds.items()} for i in range(0, n, batch)]
    return run_all(sess, parts)[0]


def classification_quality(model: onnx.ModelProto, x: np.ndarray, labels: np.ndarray, ref: np.ndarray | None = None,
                           key: str = "pixels") -> dict[str, float]:
    out = run_model(model, {key: x})
    pred = out.argmax(1)
    q = {"accuracy": accuracy(pred, labels), "macro_f1": macro_f1(pred, labels)}
    if ref is not None:
        q["top1_agreement"] = float(np.mean(pred == ref.argmax(1)))
    return q


def embedding_quality(model: onnx.ModelProto, feeds: dict[str, np.ndarray], ref: np.ndarray) -> dict[str, float]:
    out = run_model(model, feeds, batch=32)
    m = compare("sentence_embedding", ref, out)
    return {"cosine_mean": m.cosine_mean, "cosine_min": m.cosine_min}


def paired(a: onnx.ModelProto, b: onnx.ModelProto, *, threads: int, batch: int, runs: int, warmup: int = 10,
           input_shape: Sequence[str] | None = None) -> dict[str, float]:
    """p50 of each model and the median per-pair speed-up of ``b`` over ``a`` at one setting."""
    rep = bench([a, b], threads=threads, batch=batch, input_shape=input_shape, runs=runs, warmup=warmup, labels=["a", "b"])
    s = rep.settings[0]
    return {"a_p50_ms": s.timings[0].stats.p50_ms, "b_p50_ms": s.timings[1].stats.p50_ms, "speedup": s.speedup,
            "speedup_p10": s.speedup_p10, "speedup_p90": s.speedup_p90, "runs": runs}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def write(name: str, text: str, data: Any, folder: Path = DOCS) -> None:
    """``folder/name.md`` and ``folder/name.json`` (``folder``: ``docs/benchmarks`` unless a smoke run says otherwise)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.md").write_text(text + "\n", encoding="utf-8")
    (folder / f"{name}.json").write_text(json.dumps(data, indent=1, default=float) + "\n", encoding="utf-8")
    print(f"wrote {folder / name}.md and .json", file=sys.stderr)


def kib(n: int) -> str:
    return f"{n / 1024:,.0f} KiB" if n < 10 * 2**20 else f"{n / 2**20:,.1f} MiB"


__all__ = ["Variant", "file_size", "count_params", "command_line", "environment", "run_model", "classification_quality",
           "embedding_quality", "paired", "markdown_table", "write", "kib", "compress", "quantize_int8", "DOCS", "ROOT"]


#: Thread variables a child must not inherit: what it measures is how the tool sets threads itself.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def run_child(code: str, *args: str) -> dict:
    """``python -c code args`` in a fresh process without the thread variables; its last stdout
    line, parsed as JSON (a failure raises with the end of its stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])
