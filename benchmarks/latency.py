"""Latency users feel: fp32 vs int8 vs low-rank vs low-rank + int8, in onnxruntime on this CPU.

    python benchmarks/latency.py [--only mlp|cnn|minilm] [--quick] [--out DIR]

For each real model (``benchmarks/real_models.py``):

* **fp32**: the input; **int8** and **int8-per-channel**: onnxruntime ``quantize_dynamic`` of it
  with its defaults (one scale per weight: what a user would do otherwise) and with
  ``per_channel=True`` (one scale per output column);
* **low-rank**: the pass with the model's options (MLP and CNN: ``--energy 0.80``; MiniLM:
  ``--data-aware --adaptive --target-params F`` on calibration text), plain and in latency-aware
  mode (a layer is factorized only where onnxruntime runs it faster at every thread count and
  batch below, and the whole model is checked against the input);
* **low-rank + int8**: latency-aware, then ``--quantize int8`` or ``--quantize int8-per-channel``
  (layers timed quantized, whole model checked against the input quantized the same way).

Quality is measured on held-out data (MLP and CNN: accuracy on 1,000 digits; MiniLM: cosine of
the sentence embedding to fp32 on held-out text).  Every speed-up is the median over interleaved
pairs (A B, B A, ...) at a pinned thread count.  At batch 64 the profiler's per-layer times also
give how much of the MAC reduction of the factorized layers shows up as speed-up.

MiniLM's data-aware statistics (all calibration texts) and adaptive sensitivity (the first 128) are
measured once; the variants and the budget sweep reuse them (same model, same data: the same
measurement).

Writes ``docs/benchmarks/latency_<model>.{md,json}``, ``latency_<model>.png`` (speed-ups) and
``latency_<model>_pareto.png`` (quality vs size); ``--quick`` (a smoke run: a tenth of the runs,
and for MiniLM also 1 thread, batches 1 and 8, the first encoder layer, 64 calibration texts, 32
for the sensitivity and two sweep points) writes them to ``benchmarks/_work/latency-quick/``.
Layer timings of latency-aware mode are cached in ``benchmarks/_work/latency-cache``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx

from common import (DOCS, classification_quality, command_line, compress, count_params, embedding_quality, environment,
                    file_size, kib, markdown_table, paired, run_model, write)
import real_models
from onnx_lowrank.passes import adaptive, statistics
from onnx_lowrank.passes.quantize import quantize

os.environ.setdefault("ONNX_LOWRANK_CACHE_DIR", str(Path(real_models.WORK) / "latency-cache"))

SEQ = 128
MINILM_SHAPES = (f"input_ids:1x{SEQ},attention_mask:1x{SEQ},token_type_ids:1x{SEQ}",)
QUANT = ("int8", "int8-per-channel")

CONFIGS = {
    "mlp": dict(title="MNIST MLP 784-512-256-10", options=dict(energy=0.80), flags="--energy 0.8",
                sweep=[dict(energy=e) for e in (0.80, 0.85, 0.90, 0.95)], sweep_label="energy",
                threads=(1, 2), batch=(1, 64), input_shape=None, runs={1: 200, 64: 100}, warmup={1: 10, 64: 10}),
    "cnn": dict(title="MNIST CNN (3 convs + linear)", options=dict(energy=0.80, op_types=("Conv",)),
                flags="--energy 0.8 --op-types Conv",
                sweep=[dict(energy=e) for e in (0.70, 0.80, 0.90, 0.95)], sweep_label="energy",
                threads=(1, 2), batch=(1, 64), input_shape=None, runs={1: 200, 64: 60}, warmup={1: 10, 64: 5}),
    "minilm": dict(title=f"all-MiniLM-L6-v2, sequence {SEQ}", options=dict(target_params=0.8),
                   flags="--data-aware --adaptive --target-params 0.8 --adaptive-samples 128 --calib-mask attention_mask",
                   sweep=[dict(target_params=f) for f in (0.95, 0.9, 0.85, 0.8, 0.7)], sweep_label="target params",
                   threads=(1, 2), batch=(1, 64), input_shape=MINILM_SHAPES, runs={1: 40, 64: 6}, warmup={1: 5, 64: 1},
                   # one batch-64 run takes seconds here: time the comparisons the targets need, not every pair
                   # --quick: what a smoke run changes (runs are cut to a tenth on top)
                   # (with the first encoder layer alone, 0.8 of all the weights cannot be met)
                   quick=dict(threads=(1,), batch=(1, 8), runs={1: 40, 8: 30}, warmup={1: 5, 8: 2}, calib_texts=64,
                              adaptive_samples=32, include=r"/layer\.0/", options=dict(target_params=0.9),
                              flags="--data-aware --adaptive --target-params 0.9 --adaptive-samples 32 --calib-mask "
                                    "attention_mask --include '/layer\\.0/' (calibration: the first 64 texts)",
                              sweep=[dict(target_params=f) for f in (0.95, 0.9)]),
                   pairs=[("fp32", "int8"), ("fp32", "int8-per-channel"), ("fp32", "low-rank"), ("fp32", "low-rank latency-aware"),
                          ("int8", "low-rank latency-aware + int8"), ("int8-per-channel", "low-rank latency-aware + int8-per-channel"),
                          ("int8", "low-rank latency-aware + int8-per-channel"), ("int8", "low-rank + int8-per-channel"),
                          ("int8-per-channel", "low-rank + int8-per-channel")]),
}


def load(name: str, quick: dict | None = None):
    """The model, a quality function on held-out data, the quality key, and extra compress options
    (``quick``: the smoke-run settings of ``CONFIGS``)."""
    if name in ("mlp", "cnn"):
        real = real_models.mnist_mlp() if name == "mlp" else real_models.mnist_cnn()
        key = "pixels" if name == "mlp" else "image"
        h = np.load(real.holdout)
        x, y = h[key], h["labels"]
        model = onnx.load(str(real.onnx))
        return model, (lambda m: classification_quality(m, x, y, key=key)), "accuracy", {}
    real = real_models.minilm(SEQ)
    feeds = {k: v for k, v in np.load(real.holdout).items()}
    model = onnx.load(str(real.onnx))
    ref = run_model(model, feeds, batch=32)
    # metric: the adaptive section's drops are cosine drops, as before the gate's default for
    # embeddings became rel_l2
    extra = dict(data_aware=True, adaptive=True, adaptive_samples=128, calib=str(real.calib), calib_mask="attention_mask",
                 metric="cosine")
    if quick:
        with np.load(real.calib) as d:
            extra["calib"] = {k: d[k][:quick["calib_texts"]] for k in d.files}
        extra.update(adaptive_samples=quick["adaptive_samples"], include=quick["include"])
    return model, (lambda m: embedding_quality(m, feeds, ref)), "cosine_mean", extra


class MeasureOnce:
    """Measure once per model and data, reuse for every variant: the activation statistics of
    ``--data-aware`` (in memory) and the adaptive sensitivity curves (also on disk).

    Every variant is a full ``compress()`` run; this replaces, for the duration, the two
    functions its stages measure with (``passes.statistics.capture_grams`` and
    ``passes.adaptive.measure_sensitivity``) by versions that answer from what was measured.
    """

    def __init__(self, path: Path):
        self.path = path
        self.curves = json.loads(path.read_text()) if path.exists() else {}
        self.captures: dict[tuple[str, ...], tuple] = {}
        self._measure, self._capture = adaptive.measure_sensitivity, statistics.capture_grams

    def sensitivity(self, ev, plans, rank_multiple=1, *args, **kwargs):
        names = [p.name for p in plans]
        grid = [adaptive.grid_ranks(p, rank_multiple) for p in plans]
        # same grid and same spectrum only (curves cached without a signature had input-only whitening)
        sigs = [round(float(p.view().spectrum.s[0]), 3) for p in plans]

        def valid(n, g, sig, p):
            c = self.curves.get(n)
            return c is not None and list(c[0]) == g and (c[2] == sig if len(c) > 2 else p.view().spectrum.out_whiten is None)

        if all(valid(*x) for x in zip(names, grid, sigs, plans)):
            return [adaptive.Curve(*self.curves[n][:2]) for n in names]
        curves = self._measure(ev, plans, rank_multiple, *args, **kwargs)
        self.curves.update({n: (c.ranks, c.sens, sig) for n, c, sig in zip(names, curves, sigs)})
        self.path.write_text(json.dumps(self.curves))
        return curves

    def capture(self, model, groups, feeds, data, **kw):
        # by weight name: every compress() run discovers its own groups (same model, same names)
        names = (tuple(g.weight.name for g in groups), bool(kw.get("attention")))
        if names not in self.captures:
            cap = self._capture(model, groups, feeds, data, **kw)
            by_key = {g.key: g.weight.name for g in groups}
            self.captures[names] = (cap, *({by_key[k]: v for k, v in d.items()} for d in (cap.grams, cap.rows, cap.skipped, cap.out_grams)))
        cap, *stats = self.captures[names]
        grams, rows, skipped, out_grams = ({g.key: d[g.weight.name] for g in groups if g.weight.name in d} for d in stats)
        return statistics.Capture(grams=grams, rows=rows, skipped=skipped, runs=cap.runs, masked=cap.masked, out_grams=out_grams)

    def __enter__(self):
        adaptive.measure_sensitivity, statistics.capture_grams = self.sensitivity, self.capture
        return self

    def __exit__(self, *exc):
        adaptive.measure_sensitivity, statistics.capture_grams = self._measure, self._capture


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
    scope = "factorized layers"
    if not (t_dense and t_fact):
        # onnxruntime's NCHWc layout pass renames fused Conv nodes after their outputs, so Conv
        # layers cannot be found by name: compare every node of the op type (factorized or not)
        # plus the layout reorders, against the MACs of every layer of that type.
        ops = {d.op_type for d in result.layers if d.factorized}

        def of(prof):
            return sum(t for op, t in prof.op_types.items() if any(o in op for o in ops) or op.startswith("Reorder"))

        t_dense, t_fact = of(before), of(after)
        macs_b = sum(d.macs_before for d in result.layers if d.op_type in ops)
        macs_a = sum(d.macs_after for d in result.layers if d.op_type in ops)
        scope = f"all {'/'.join(sorted(ops))} nodes and layout reorders"
    speed = t_dense / t_fact if t_fact else float("nan")
    mac = macs_b / macs_a if macs_a else float("nan")
    return {"layers": len(names), "scope": scope, "dense_us": t_dense, "factored_us": t_fact, "speedup": speed, "mac_reduction": mac,
            "realized_fraction": speed / mac if mac == mac and mac else float("nan"), "profiled_runs": runs, "batch": batch}


def run(name: str, quick: bool, out: Path = DOCS) -> None:
    cfg = CONFIGS[name]
    if quick and "quick" in cfg:
        cfg = {**cfg, **{k: v for k, v in cfg["quick"].items() if k in cfg}}
    model, quality, key, extra = load(name, cfg.get("quick") if quick else None)
    threads, batches, shapes = cfg["threads"], cfg["batch"], cfg["input_shape"]
    runs = {b: max(3, r // 10) if quick else r for b, r in cfg["runs"].items()}
    lat_opts = dict(latency_aware=True, threads=threads, batch=batches, input_shape=shapes or ())
    opts = {**cfg["options"], **extra}
    print(f"{name}: building variants", file=sys.stderr)
    # a smoke run measures on other samples: its curves must not stand in for the real ones
    with MeasureOnce(Path(real_models.WORK) / f"{name}_latency_sensitivity{'_quick' if quick else ''}.json"):
        results = {"low-rank": compress(model, **opts), "low-rank latency-aware": compress(model, **opts, **lat_opts)}
        for q in QUANT:
            results[f"low-rank + {q}"] = compress(model, **opts, quantize=q)
        for q in QUANT:
            results[f"low-rank latency-aware + {q}"] = compress(model, **opts, **lat_opts, quantize=q)
        sweep_results = [(point, compress(model, **{**opts, **point})) for point in cfg["sweep"]]
    variants = {"fp32": model, **{q: quantize(model, q) for q in QUANT}, **{k: r.model for k, r in results.items()}}
    rows, data = [], {"model": cfg["title"], "flags": cfg["flags"], "variants": {}, "latency": [], "sweep": []}
    for vname, m in variants.items():
        q = quality(m)
        info = {"size": file_size(m), "params": count_params(m), **q}
        if vname in results:
            res = results[vname]
            info.update(factorized=res.totals.factorized, layers=res.totals.layers,
                        weight_params_kept=res.totals.params_after / res.totals.params_before,
                        skips=sorted({d.reason.split(" (")[0] for d in res.layers if not d.factorized and d.reason}),
                        latency_section=res.sections.get("latency"), quantize_section=res.sections.get("quantize"),
                        adaptive_section=res.sections.get("adaptive"))
        data["variants"][vname] = info
        print(f"  {vname}: {info['size']} bytes, {key} {q[key]:.4f}", file=sys.stderr)
        rows.append([vname, kib(info["size"]), f"{model.ByteSize() / info['size']:.2f}x", f"{q[key]:.4f}",
                     f"{info.get('factorized', '-')}", f"{info['weight_params_kept']:.3f}" if "weight_params_kept" in info else "-"])
    qual_table = markdown_table(["variant", "file size", "smaller than fp32", key.replace("_", " "), "layers factorized",
                                 "weight params kept"], rows)

    pairs = cfg.get("pairs")
    if pairs is None:
        pairs = [("fp32", v) for v in variants if v != "fp32"]
        pairs += [(q, f"low-rank{aware} + {q}") for q in QUANT for aware in ("", " latency-aware")]
        pairs.append(("int8", "low-rank latency-aware + int8-per-channel"))
    lat_rows = []
    for t in threads:
        for b in batches:
            for a, bb in pairs:
                r = paired(variants[a], variants[bb], threads=t, batch=b, runs=runs[b], warmup=cfg["warmup"][b], input_shape=shapes)
                data["latency"].append({"threads": t, "batch": b, "baseline": a, "variant": bb, **r})
                print(f"  t={t} b={b} {bb} vs {a}: x{r['speedup']:.2f}", file=sys.stderr)
                lat_rows.append([t, b, f"{bb} vs {a}", f"{r['a_p50_ms']:.3f}", f"{r['b_p50_ms']:.3f}",
                                 f"x{r['speedup']:.2f} (x{r['speedup_p10']:.2f}-x{r['speedup_p90']:.2f})", runs[b]])
    lat_table = markdown_table(["threads", "batch", "comparison", "baseline p50 ms", "variant p50 ms",
                                "speed-up (p10-p90)", "pairs"], lat_rows)

    aware = results["low-rank latency-aware"]
    target = aware if aware.totals.factorized else results["low-rank"]
    pb = max(batches)
    mac = mac_realization(model, target, batch=pb, input_shape=shapes, runs=max(5, runs[pb]))
    data["mac_realization"] = {"variant": "latency-aware" if target is aware else "plain", **mac}

    sweep_rows = []
    for point, res in sweep_results:
        q = quality(res.model)
        entry = {**point, "factorized": res.totals.factorized, "size": file_size(res.model), key: q[key],
                 "weight_params_kept": res.totals.params_after / res.totals.params_before}
        for mode in QUANT:
            mq = quantize(res.model, mode)
            entry[f"{mode}_size"], entry[f"{mode}_{key}"] = file_size(mq), quality(mq)[key]
        data["sweep"].append(entry)
        sweep_rows.append([f"{next(iter(point.values())):.2f}", res.totals.factorized, f"{entry['weight_params_kept']:.3f}",
                           kib(entry["size"]), f"{q[key]:.4f}", kib(entry["int8_size"]), f"{entry[f'int8_{key}']:.4f}",
                           f"{entry[f'int8-per-channel_{key}']:.4f}"])
    for v in ("fp32", *QUANT):
        data[v] = {"size": data["variants"][v]["size"], key: data["variants"][v][key]}
    k = key.replace("_", " ")
    sweep_table = markdown_table([cfg["sweep_label"], "layers factorized", "weight params kept", "low-rank size", k,
                                  "+ int8 size", f"{k} (+ int8)", f"{k} (+ int8-per-channel)"], sweep_rows)

    shape_note = f"inputs {MINILM_SHAPES[0].replace('1x', 'Bx')}" if shapes else "batch B"
    text = "\n".join([
        f"### {cfg['title']}: fp32, int8, low-rank, low-rank + int8",
        "",
        f"Low-rank: `{cfg['flags']}`; latency-aware adds `--latency-aware --threads {','.join(map(str, threads))} "
        f"--batch {','.join(map(str, batches))}" + (f" --input-shape {MINILM_SHAPES[0]}`" if shapes else "`")
        + f"; {shape_note}. Quality on held-out data.",
        "",
        qual_table,
        "",
        lat_table,
        "",
        f"Factorized layers at batch {pb}, 1 thread ({data['mac_realization']['variant']} model, "
        f"onnxruntime profiler, {mac['profiled_runs']} runs, timing {mac['scope']}): {mac['layers']} layers factorized, "
        f"x{mac['speedup']:.2f} faster against x{mac['mac_reduction']:.2f} fewer MACs: "
        f"{mac['realized_fraction']:.2f} of the MAC reduction realized.",
        "",
        f"Sweep (quality and size only; {cfg['sweep_label']} as in the low-rank flags):",
        "",
        sweep_table,
        "",
        environment(threads, "pairs per row as listed, " + ", ".join(f"{w} warm-up runs at batch {b}" for b, w in cfg["warmup"].items())),
        "",
        f"Command: `{command_line()}`",
    ])
    if quick:
        data["quick"] = {k: v for k, v in cfg.get("quick", {}).items() if k != "sweep"} | {"runs_cut_to_a_tenth": True}
    write(f"latency_{name}", text, data, folder=out)
    plot_bars(name, cfg, data, out)
    plot_pareto(name, cfg, data, key, out)


def plot_bars(name: str, cfg: dict, data: dict, out: Path = DOCS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(dict.fromkeys((e["baseline"], e["variant"]) for e in data["latency"]))
    settings = sorted({(e["threads"], e["batch"]) for e in data["latency"]})
    fig, ax = plt.subplots(figsize=(11, 4.2), dpi=100)
    width = 0.85 / len(series)
    colors = plt.cm.tab20(np.linspace(0, 1, max(len(series), 2)))
    for k, (base, v) in enumerate(series):
        ys = [next((e["speedup"] for e in data["latency"] if (e["baseline"], e["variant"], e["threads"], e["batch"]) == (base, v, *st)),
                   np.nan) for st in settings]
        ax.bar(np.arange(len(settings)) + (k - (len(series) - 1) / 2) * width, ys, width, color=colors[k],
               label=f"{v} vs {base}", hatch="//" if base != "fp32" else None)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(settings)), [f"{t} thr, batch {b}" for t, b in settings], fontsize=8)
    ax.set_ylabel("speed-up (median of interleaved pairs)")
    ax.set_title(f"{cfg['title']}: onnxruntime CPU latency (hatched: against int8 alone)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"latency_{name}.png")
    plt.close(fig)


def plot_pareto(name: str, cfg: dict, data: dict, key: str, out: Path = DOCS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.8, 3.8), dpi=100)
    sw = data["sweep"]
    mib = 2 ** 20
    ax.plot([e["size"] / mib for e in sw], [e[key] for e in sw], "o-", label="low-rank (fp32)")
    for mode, mark in zip(QUANT, "sD"):
        ax.plot([e[f"{mode}_size"] / mib for e in sw], [e[f"{mode}_{key}"] for e in sw], mark + "-", ms=4,
                label=f"low-rank + {mode}")
        ax.plot([data[mode]["size"] / mib], [data[mode][key]], mark, ms=10, mfc="none", label=f"{mode} only")
    ax.plot([data["fp32"]["size"] / mib], [data["fp32"][key]], "k*", ms=10, label="fp32")
    for e in sw:
        ax.annotate(f"{e['weight_params_kept']:.2f}", (e["size"] / mib, e[key]), fontsize=7, xytext=(3, -9),
                    textcoords="offset points")
    if key == "cosine_mean":
        ax.axhline(0.95, color="gray", lw=0.6, ls="--")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("held-out embedding cosine to fp32" if key == "cosine_mean" else "held-out accuracy")
    ax.set_title(f"{cfg['title']}: quality vs size\n(labels: fraction of weight parameters kept)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out / f"latency_{name}_pareto.png")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=sorted(CONFIGS), help="run one model")
    p.add_argument("--quick", action="store_true", help="a tenth of the runs, and for MiniLM less data and work (a smoke "
                                                        "run, not for the docs: written to benchmarks/_work/latency-quick/)")
    p.add_argument("--out", help="folder for the tables, JSON and plots (default docs/benchmarks/; with --quick "
                                 "benchmarks/_work/latency-quick/)")
    args = p.parse_args()
    out = Path(args.out) if args.out else Path(real_models.WORK) / "latency-quick" if args.quick else DOCS
    out.mkdir(parents=True, exist_ok=True)
    for name in ([args.only] if args.only else list(CONFIGS)):
        run(name, args.quick, out)


if __name__ == "__main__":
    main()
