"""What adaptive mode costs on all-MiniLM-L6-v2, and what its cheaper settings give up.

    python benchmarks/adaptive_cost.py [--texts 256] [--target 0.8] [--cores 2] [--only NAME ...]

Every setting runs ``compress(minilm.onnx, data_aware=True, adaptive=True, target_params=0.8,
metric="cosine")`` on the same ``--texts`` calibration texts (sequence 128) and is scored on 256
held-out texts never used for calibration (mean and minimum cosine of the sentence embedding to
the fp32 model's):

* ``full grid, all texts``: every layer measured at its 10 grid ranks on every calibration text
  (``1 + 10 L`` passes over them), the mode's cost before ``--sensitivity-points`` and the
  cheaper sample;
* ``full grid, 64 texts``: the same grid on the first 64 texts (``--adaptive-samples 64``);
* ``2 points, 64 texts`` / ``1 point, 64 texts``: ``--sensitivity-points 2 / 1`` (each layer
  measured at that many ranks, its whitened truncation loss scaled to them for the rest).

The data-aware statistics use every calibration text in all settings.  Results go to
``docs/benchmarks/adaptive_cost.md`` (and ``.json``); each finished setting is also kept in
``benchmarks/_work/adaptive_cost.json``, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCS, embedding_quality, markdown_table, run_model  # noqa: E402
import real_models  # noqa: E402
import onnx_lowrank as ol  # noqa: E402

WORK = Path(real_models.WORK)
PARTIAL = WORK / "adaptive_cost.json"

SETTINGS = {
    "1 point, 64 texts": dict(sensitivity_points=1, adaptive_samples=64),
    "2 points, 64 texts": dict(sensitivity_points=2, adaptive_samples=64),
    "full grid, 64 texts": dict(adaptive_samples=64),
    "full grid, all texts": dict(),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="settings to run (default all)")
    args = ap.parse_args()
    real = real_models.minilm()
    with np.load(real.calib) as d:
        calib = {k: d[k][:args.texts] for k in d.files}
    holdout = {k: v for k, v in np.load(real.holdout).items()}
    base = onnx.load(str(real.onnx))
    ref = run_model(base, holdout, batch=32)
    done = json.loads(PARTIAL.read_text()) if PARTIAL.exists() else {}
    key = f"{args.texts}-{args.target}-{args.cores}"
    results = done.setdefault(key, {})
    for name, extra in SETTINGS.items():
        if (args.only and name not in args.only) or name in results:
            continue
        start = time.perf_counter()
        res = ol.compress(real.onnx, data_aware=True, adaptive=True, target_params=args.target, metric="cosine",
                          calib=calib, calib_mask="attention_mask", cores=args.cores, **extra)
        seconds = time.perf_counter() - start
        quality = embedding_quality(res.model, holdout, ref)
        results[name] = dict(seconds=seconds, adaptive_seconds=res.seconds.get("adaptive"),
                             passes=res.sections["adaptive"]["passes"], params_kept=res.totals.params_after / res.totals.params_before,
                             factorized=res.totals.factorized, ranks={d.weight: d.rank for d in res.layers if d.factorized},
                             options=extra, **quality)
        print(name, {k: v for k, v in results[name].items() if k != "ranks"}, flush=True)
        PARTIAL.write_text(json.dumps(done, indent=1))
    write(args, results)


def write(args, results: dict) -> None:
    full = results.get("full grid, all texts")

    def texts_run(r: dict) -> int:  # the load-independent cost: texts the model ran over
        return r["passes"] * min(args.texts, r["options"].get("adaptive_samples", args.texts))

    rows = []
    for name in SETTINGS:
        r = results.get(name)
        if r is None:
            continue
        vs = (f"x{texts_run(full) / texts_run(r):.1f} / x{full['adaptive_seconds'] / r['adaptive_seconds']:.1f}" if full else "-")
        dq = f"{r['cosine_mean'] - full['cosine_mean']:+.4f}" if full else "-"
        rows.append([name, r["passes"], f"{texts_run(r):,}", f"{r['adaptive_seconds']:.0f} s", vs, f"{r['seconds']:.0f} s",
                     f"{r['params_kept']:.3f}", r["factorized"], f"{r['cosine_mean']:.4f}", dq, f"{r['cosine_min']:.4f}"])
    text = "\n".join([
        "# Adaptive mode's cost on all-MiniLM-L6-v2",
        "",
        f"Measured by `python benchmarks/adaptive_cost.py --texts {args.texts} --target {args.target} --cores {args.cores}` on "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}: `--data-aware --adaptive "
        f"--target-params {args.target} --metric cosine` with {args.texts} calibration texts of 128 tokens; quality on 256 "
        "held-out texts (cosine of the sentence embedding to the fp32 model's). One run per setting, one after another, "
        "in one session.",
        "",
        markdown_table(["setting", "passes", "texts run", "adaptive stage", "cheaper than full (texts / time)", "whole pass",
                        "weights kept", "layers", "held-out cosine", "vs full", "min cosine"], rows),
        "",
        "*Passes*: runs of the model over the sensitivity sample (the calibration texts, or the first 64 of them) "
        "during sensitivity and the budget's check; *texts run*: passes times the texts in each, the cost that does not "
        "depend on what else the machine runs. The machine was shared with other jobs during these runs, unevenly (the "
        "full grid on all texts ran at low priority beside them), so the times are indicative and the texts-run ratio is "
        "the one to compare.",
    ])
    (DOCS / "adaptive_cost.md").write_text(text + "\n")
    (DOCS / "adaptive_cost.json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
