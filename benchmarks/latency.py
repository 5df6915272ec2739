"""Latency users feel: fp32 vs int8 vs low-rank vs low-rank + int8, in onnxruntime on this CPU.

    python benchmarks/latency.py [--only mlp|minilm] [--quick]

For each real model (``benchmarks/real_models.py``):

* **fp32**: the input; **int8**: onnxruntime ``quantize_dynamic`` of it (what a user would do
  otherwise);
* **low-rank**: the pass at the model's energy, plain and in latency-aware mode (a layer is
  factorized only where onnxruntime runs it faster at every thread count and batch below);
* **low-rank + int8**: latency-aware, then ``--quantize int8``.

Quality is measured on held-out data (MLP: accuracy on 1,000 digits; MiniLM: cosine of the
sentence embedding to fp32 on held-out text).  Every speed-up is the median over interleaved
pairs (A B, B A, ...) at a pinned thread count.  At batch 64 the profiler's per-layer times also
give how much of the MAC reduction of the factorized layers shows up as speed-up.

Writes ``docs/benchmarks/latency_<model>.{md,json}``, ``latency_<model>.png`` and
``minilm_pareto.png``.  Layer timings of latency-aware mode are cached in
``benchmarks/_work/latency-cache``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx

from common import (DOCS, classification_quality, command_line, compress, count_params, embedding_quality, environment,
                    file_size, kib, markdown_table, paired, quantize_int8, run_model, write)
import real_models

os.environ.setdefault("ONNX_LOWRANK_CACHE_DIR", str(Path(real_models.WORK) / "latency-cache"))

SEQ = 128
MINILM_SHAPES = (f"input_ids:1x{SEQ},attention_mask:1x{SEQ},token_type_ids:1x{SEQ}",)

CONFIGS = {
    "mlp": dict(title="MNIST MLP 784-512-256-10", energy=0.80, sweep=(0.80, 0.85, 0.90, 0.95), threads=(1, 2), batch=(1, 64),
                input_shape=None, runs={1: 200, 64: 100}, profile_batch=64),
    "minilm": dict(title=f"all-MiniLM-L6-v2, sequence {SEQ}", energy=0.97, sweep=(0.99, 0.97, 0.95, 0.90), threads=(1, 2),
                   batch=(1, 8), input_shape=MINILM_SHAPES, runs={1: 40, 8: 12}, profile_batch=8),
}


def load(name: str, holdout_n: int | None):
    if name == "mlp":
        real = real_models.mnist_mlp()
        h = np.load(real.holdout)
        x, y = h["pixels"], h["labels"]
        return onnx.load(str(real.onnx)), (lambda m, ref: classification_quality(m, x, y)), "accuracy"
    real = real_models.minilm(SEQ)
    feeds = {k: v[:holdout_n] for k, v in np.load(real.holdout).items()}
    model = onnx.load(str(real.onnx))
    ref = run_model(model, feeds, batch=32)
    return model, (lambda m, _ref: embedding_quality(m, feeds, ref)), "cosine_mean"


def mac_realization(dense: onnx.ModelProto, result, *, batch: int, input_shape, runs: int) -> dict:
    """Speed-up of the factorized layers (profiler) against their MAC reduction, 1 thread."""
    from onnx_lowrank.bench import bench

    rep = bench([dense, result.model], threads=1, batch=batch, input_shape=input_shape, runs=3, warmup=2, profile=True,
                profile_runs=runs, labels=["dense", "low-rank"])
    before, after = rep.settings[0].profiles
    names = [d.node for d in result.layers if d.factorized]
    t_dense = sum(before.layers.get(n, 0.0) for n in names)
    t_fact = sum(after.layers.get(n, 0.0) for n in names)
    macs_b = sum(d.macs_before for d in result.layers if d.factorized)
    macs_a = sum(d.macs_after for d in result.layers if d.factorized)
    speed = t_dense / t_fact if t_fact else float("nan")
    mac = macs_b / macs_a if macs_a else float("nan")
    return {"layers": len(names), "dense_us": t_dense, "factored_us": t_fact, "speedup": speed, "mac_reduction": mac,
            "realized_fraction": speed / mac if mac == mac and mac else float("nan"), "profiled_runs": runs, "batch": batch}


def run(name: str, quick: bool) -> None:
    cfg = CONFIGS[name]
    model, quality, key = load(name, 128 if name == "minilm" else None)
    threads, batches, shapes = cfg["threads"], cfg["batch"], cfg["input_shape"]
    runs = {b: max(3, r // 10) if quick else r for b, r in cfg["runs"].items()}
    lat_opts = dict(latency_aware=True, threads=threads, batch=batches, input_shape=shapes or ())
    print(f"{name}: building variants", file=sys.stderr)
    int8 = quantize_int8(model)
    plain = compress(model, energy=cfg["energy"])
    aware = compress(model, energy=cfg["energy"], **lat_opts)
    both = compress(model, energy=cfg["energy"], quantize="int8", **lat_opts)
    plain8 = compress(model, energy=cfg["energy"], quantize="int8")
    e = cfg["energy"]
    results = {f"low-rank {e}": plain, f"low-rank {e} + int8": plain8, f"low-rank {e} latency-aware": aware,
               f"low-rank {e} latency-aware + int8": both}
    variants = {"fp32": model, "int8": int8, **{k: r.model for k, r in results.items()}}
    rows, data = [], {"model": cfg["title"], "energy": cfg["energy"], "variants": {}, "latency": [], "sweep": []}
    base_q = None
    for vname, m in variants.items():
        q = quality(m, None)
        base_q = base_q or q
        info = {"size": file_size(m), "params": count_params(m), **q}
        if vname.startswith("low-rank"):
            res = results[vname]
            info["factorized"] = res.totals.factorized
            info["layers"] = res.totals.layers
            info["skips"] = sorted({d.reason.split(" (")[0] for d in res.layers if not d.factorized and d.reason})
            info["latency_section"] = res.sections.get("latency")
            info["quantize_section"] = res.sections.get("quantize")
        data["variants"][vname] = info
        print(f"  {vname}: {info['size']} bytes, {key} {q[key]:.4f}", file=sys.stderr)
        rows.append([vname, kib(info["size"]), f"{model.ByteSize() / info['size']:.2f}x", f"{q[key]:.4f}",
                     f"{info.get('factorized', '-')}"])
    qual_table = markdown_table(["variant", "file size", "smaller than fp32", key.replace("_", " "), "layers factorized"], rows)

    pairs = [("fp32", v) for v in variants if v != "fp32"] + [("int8", f"low-rank {e} + int8"),
                                                               ("int8", f"low-rank {e} latency-aware + int8")]
    lat_rows = []
    for t in threads:
        for b in batches:
            for a, bb in pairs:
                r = paired(variants[a], variants[bb], threads=t, batch=b, runs=runs[b], input_shape=shapes)
                data["latency"].append({"threads": t, "batch": b, "baseline": a, "variant": bb, **r})
                print(f"  t={t} b={b} {bb} vs {a}: x{r['speedup']:.2f}", file=sys.stderr)
                lat_rows.append([t, b, f"{bb} vs {a}", f"{r['a_p50_ms']:.3f}", f"{r['b_p50_ms']:.3f}",
                                 f"x{r['speedup']:.2f} (x{r['speedup_p10']:.2f}-x{r['speedup_p90']:.2f})", runs[b]])
    lat_table = markdown_table(["threads", "batch", "comparison", "baseline p50 ms", "variant p50 ms",
                                "speed-up (p10-p90)", "pairs"], lat_rows)

    target = aware if aware.totals.factorized else plain
    mac = mac_realization(model, target, batch=cfg["profile_batch"], input_shape=shapes, runs=max(5, runs[cfg["profile_batch"]]))
    data["mac_realization"] = {"variant": "latency-aware" if target is aware else "plain", **mac}

    sweep_rows = []
    for e in cfg["sweep"]:
        res = compress(model, energy=e)
        q = quality(res.model, None)
        mq = quantize_int8(res.model)
        qq = quality(mq, None)
        entry = {"energy": e, "factorized": res.totals.factorized, "size": file_size(res.model), key: q[key],
                 "int8_size": file_size(mq), f"int8_{key}": qq[key]}
        data["sweep"].append(entry)
        sweep_rows.append([f"{e:.2f}", res.totals.factorized, kib(entry["size"]), f"{q[key]:.4f}", kib(entry["int8_size"]),
                           f"{qq[key]:.4f}"])
    data["int8"] = {"size": file_size(int8), key: data["variants"]["int8"][key]}
    data["fp32"] = {"size": file_size(model), key: data["variants"]["fp32"][key]}
    sweep_table = markdown_table(["energy", "layers factorized", "low-rank size", key.replace("_", " "),
                                  "low-rank + int8 size", f"{key.replace('_', ' ')} (+ int8)"], sweep_rows)

    shape_note = f"inputs {MINILM_SHAPES[0].replace('1x', 'Bx')}" if shapes else "input pixels Bx784"
    text = "\n".join([
        f"### {cfg['title']}: fp32, int8, low-rank, low-rank + int8",
        "",
        f"Latency-aware mode settings: `--latency-aware --threads {','.join(map(str, threads))} "
        f"--batch {','.join(map(str, batches))}" + (f" --input-shape {MINILM_SHAPES[0]}`" if shapes else "`")
        + f" at `--energy {cfg['energy']}`; {shape_note}.",
        "",
        qual_table,
        "",
        lat_table,
        "",
        f"Factorized layers at batch {cfg['profile_batch']}, 1 thread ({data['mac_realization']['variant']} model, "
        f"onnxruntime profiler, {mac['profiled_runs']} runs): {mac['layers']} layers, "
        f"x{mac['speedup']:.2f} faster against x{mac['mac_reduction']:.2f} fewer MACs: "
        f"{mac['realized_fraction']:.2f} of the MAC reduction realized.",
        "",
        "Energy sweep (plain energy rule, quality and size only):",
        "",
        sweep_table,
        "",
        environment(threads, "pairs per row as listed, 10 warm-up runs each"),
        "",
        f"Command: `{command_line()}`",
    ])
    write(f"latency_{name}", text, data)
    plot_bars(name, cfg, data)
    if name == "minilm":
        plot_pareto(data, key)


def plot_bars(name: str, cfg: dict, data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [v for v in data["variants"] if v != "fp32"]
    settings = sorted({(e["threads"], e["batch"]) for e in data["latency"]})
    fig, ax = plt.subplots(figsize=(6.5, 3.4), dpi=100)
    width = 0.8 / len(series)
    for k, v in enumerate(series):
        ys = [next(e["speedup"] for e in data["latency"] if e["baseline"] == "fp32" and e["variant"] == v
                   and (e["threads"], e["batch"]) == s) for s in settings]
        ax.bar(np.arange(len(settings)) + (k - (len(series) - 1) / 2) * width, ys, width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(settings)), [f"{t} thr, batch {b}" for t, b in settings], fontsize=8)
    ax.set_ylabel("speed-up over fp32 (median of pairs)")
    ax.set_title(f"{cfg['title']}: onnxruntime CPU latency", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(DOCS / f"latency_{name}.png")


def plot_pareto(data: dict, key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    sw = data["sweep"]
    ax.plot([e["size"] / 2**20 for e in sw], [e[key] for e in sw], "o-", label="low-rank (fp32)")
    ax.plot([e["int8_size"] / 2**20 for e in sw], [e[f"int8_{key}"] for e in sw], "s-", label="low-rank + int8")
    ax.plot([data["int8"]["size"] / 2**20], [data["int8"][key]], "^", ms=9, label="int8 only")
    ax.plot([data["fp32"]["size"] / 2**20], [data["fp32"][key]], "k*", ms=10, label="fp32")
    for e in sw:
        ax.annotate(f"{e['energy']:.2f}", (e["size"] / 2**20, e[key]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.axhline(0.95, color="gray", lw=0.6, ls="--")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("held-out embedding cosine to fp32")
    ax.set_title("all-MiniLM-L6-v2: quality vs size (labels: energy)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(DOCS / "minilm_pareto.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(CONFIGS), help="run one model")
    p.add_argument("--quick", action="store_true", help="a tenth of the runs (a smoke run, not for the docs)")
    args = p.parse_args()
    for name in ([args.only] if args.only else list(CONFIGS)):
        run(name, args.quick)


if __name__ == "__main__":
    main()
