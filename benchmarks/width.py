"""Width reduction and the one allocator on all-MiniLM-L6-v2: parameters, quality and latency.

    python benchmarks/width.py [--calib 1965] [--runs64 6] [--only LABEL ...]

Each variant compresses MiniLM (sequence 128) with the calibration texts of
``benchmarks/_work/minilm_calib_128.npz`` (``--calib``: the first N; default all 1,965), is
scored on the 256 held-out texts of ``minilm_holdout_128.npz`` (mean and minimum cosine of the
sentence embedding to the fp32 model's) and timed against fp32 at 1 thread, batch 1 and batch
64, side by side in one process (``onnx_lowrank.bench``: interleaved runs, median of the
per-pair speed-ups).  Variants:

* ``ffn-keep 0.75``: a quarter of every feed-forward block's neurons dropped, ``W2`` refitted;
* ``adaptive, widths + ranks, 0.70``: ``--adaptive --ffn-keep auto --target-params 0.7`` (widths
  and factor ranks measured and allocated together, adaptive mode's default sample and points),
  with the lighter ridge ``--damping 0.001``;
* the same two with ``--ffn-select energy``: neurons kept by their own output energy instead of
  the refit's greedy elimination (the default), side by side;
* ``budget, widths + ranks, 0.70``: the same budget allocated on whitened errors instead
  (``--ffn-keep auto --data-aware --target-params 0.7``);
* ``ffn-keep 0.75 + int8 per-channel``: the quarter of the neurons dropped and refitted, no factor
  pairs (``--energy 1``), then the weights in int8 per output channel (``--quantize
  int8-per-channel``): the forms on top of onnxruntime's int8;
* ``int8 per-channel``: onnxruntime's ``quantize_dynamic``, the usual alternative.

Results go to ``docs/benchmarks/width.md`` and ``.json`` (``--only``: to ``benchmarks/_work/partial/``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (DOCS, MINILM_INPUTS, MINILM_SEQ, MINILM_SHAPES, WORK, command_line, embedding_quality,  # noqa: E402
                    environment, markdown_table, paired, quantize_int8, run_model, write)

import onnx_lowrank as ol  # noqa: E402

SEQ, SHAPES, INPUTS = MINILM_SEQ, MINILM_SHAPES, MINILM_INPUTS

VARIANTS = {
    "ffn-keep 0.75": dict(ffn_keep=0.75),
    "ffn-keep 0.75, energy selection": dict(ffn_keep=0.75, ffn_select="energy"),
    "adaptive, widths + ranks, 0.70": dict(adaptive=True, data_aware=True, ffn_keep="auto", target_params=0.7, damping=0.001),
    "adaptive, widths + ranks, 0.70, energy selection": dict(adaptive=True, data_aware=True, ffn_keep="auto", target_params=0.7,
                                                             damping=0.001, ffn_select="energy"),
    "budget, widths + ranks, 0.70": dict(data_aware=True, ffn_keep="auto", target_params=0.7, damping=0.001),
    "ffn-keep 0.75 + int8 per-channel": dict(ffn_keep=0.75, energy=1, quantize="int8-per-channel"),
}


def flags(kw: dict) -> str:
    out = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        out.append(flag if v is True else f"{flag} {v}")
    return " ".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=None, help="calibration texts (default: all)")
    ap.add_argument("--runs1", type=int, default=30, help="timed runs at batch 1")
    ap.add_argument("--runs64", type=int, default=6, help="timed runs at batch 64")
    ap.add_argument("--cores", type=int, default=2, help="cores the pass itself uses")
    ap.add_argument("--only", nargs="*", default=None, help="labels of the variants to run (fp32 always runs)")
    args = ap.parse_args(argv)

    model = onnx.load(str(WORK / "minilm.onnx"))
    cal = np.load(WORK / "minilm_calib_128.npz")
    hold = np.load(WORK / "minilm_holdout_128.npz")
    calib = {k: cal[k][:args.calib] for k in INPUTS}
    n_cal = len(calib["input_ids"])
    feeds = {k: hold[k] for k in INPUTS}
    ref = run_model(model, feeds, batch=32)
    params = lambda m: sum(int(np.prod(t.dims)) for t in m.graph.initializer if len(t.dims) == 2 and min(t.dims) >= 384)  # noqa: E731
    base_params = params(model)
    variants: dict[str, tuple[onnx.ModelProto, dict]] = {}
    for label, kw in VARIANTS.items():
        if args.only is not None and label not in args.only:
            continue
        t = time.perf_counter()
        res = ol.compress(model, calib=calib, calib_mask="attention_mask", cores=args.cores, **kw)
        info = {"flags": flags(kw), "seconds": round(time.perf_counter() - t, 1),
                "params_kept": res.totals.params_after / res.totals.params_before,
                "widths": [b["kept"] for b in res.sections.get("width", {}).get("blocks", [])],
                "ranks": [d.rank for d in res.layers if d.factorized]}
        if "adaptive" in res.sections:
            info["adaptive"] = {k: res.sections["adaptive"].get(k) for k in ("passes", "sensitivity_passes", "samples",
                                                                              "measured_drop", "final_drop")}
        variants[label] = (res.model, info)
        print(label, info, file=sys.stderr, flush=True)
    if args.only is None or "int8 per-channel" in args.only:
        variants["int8 per-channel"] = (quantize_int8(model, per_channel=True), {"flags": "quantize_dynamic(per_channel=True)"})
    data = {}
    for label, (m, info) in variants.items():
        entry = {**info, **embedding_quality(m, feeds, ref)}
        if "params_kept" not in entry:
            entry["params_kept"] = params(m) / base_params if params(m) else None
        for b, runs in ((1, args.runs1), (64, args.runs64)):
            p = paired(model, m, threads=1, batch=b, runs=runs, warmup=5 if b == 1 else 1, input_shape=SHAPES)
            entry[f"fp32_p50_ms_b{b}"], entry[f"p50_ms_b{b}"], entry[f"vs_fp32_b{b}"] = p["a_p50_ms"], p["b_p50_ms"], p["speedup"]
            entry[f"vs_fp32_b{b}_p10_p90"] = (p["speedup_p10"], p["speedup_p90"])
        data[label] = entry
        print(label, {k: v for k, v in entry.items() if k not in ("ranks",)}, file=sys.stderr, flush=True)

    rows = []
    for label, e in data.items():
        kept = f"{e['params_kept']:.3f}" if e.get("params_kept") is not None else "-"
        rows.append([label, f"`{e['flags']}`", kept, f"{e['cosine_mean']:.4f} ({e['cosine_min']:.3f})",
                     f"x{e['vs_fp32_b1']:.2f}", f"x{e['vs_fp32_b64']:.2f}"])
    text = "\n".join([
        "# Width reduction and the one allocator on all-MiniLM-L6-v2",
        "",
        f"Measured by `{command_line()}`: {n_cal} calibration texts, 256 held-out texts never used for calibration, "
        f"sequence 128; quality is the mean (minimum) cosine of each held-out sentence embedding to fp32's. Speed: each "
        f"model timed against fp32 at 1 thread, interleaved in one process, the median of the per-pair speed-ups "
        f"({args.runs1} pairs at batch 1, {args.runs64} at batch 64). The pass itself ran on {args.cores} cores.",
        "",
        environment([1], f"{args.runs1} / {args.runs64} paired runs"),
        "",
        markdown_table(["variant", "options", "MatMul weights kept", "held-out cosine", "vs fp32, batch 1",
                        "vs fp32, batch 64"], rows),
        "",
        "*MatMul weights kept*: the parameters of the candidate MatMul/Gemm weights after the pass, as a fraction of "
        "before (factor pairs count `r (m + n)`; a narrowed block its kept neurons); for int8 the parameters stay, "
        "only their bytes shrink. `--ffn-keep 0.75` alone also factorizes the other layers by the default rule "
        "(`--energy 0.95`: ten attention projections at ranks 177-191); docs/width.md's table keeps them dense "
        "(`--energy 1`). The speed-ups are medians of per-pair ratios on a shared machine; the p10-p90 range of each is "
        "in the JSON" + "".join(f"; {label} at batch 64: x{e['vs_fp32_b64_p10_p90'][0]:.2f}-x{e['vs_fp32_b64_p10_p90'][1]:.2f}"
                                for label, e in data.items()) + ".",
    ])
    folder = DOCS if args.only is None else WORK / "partial"
    write("width", text, {"variants": data, "calib": n_cal, "runs": {"1": args.runs1, "64": args.runs64}, "command": command_line()},
          folder)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
