"""Least-squares refit after truncation, measured on real models at equal parameter budgets.

    OMP_NUM_THREADS=2 python benchmarks/refit.py --only minilm --budgets 0.8 --variants none factor:1 seq-both
    python benchmarks/refit.py --only minilm --quick     # smoke run; writes benchmarks/_work/ only

For each budget the ranks come from ``whitened`` (``--data-aware --target-params F``) and
``adaptive`` (as in ``rank_selection.py``); the same ranks are then scored on the held-out data
with the whitened factors as they are and after each refit variant (see ``score_factors``;
:func:`onnx_lowrank.passes.refit.refit_factors`, statistics on the calibration set).  The scored
model is the pipeline's rewrite stage's, with the refitted factors handed to it as the refine
stage would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import real_models  # noqa: E402
from rank_selection import QUICK, Bench, _cores, as_feeds, log  # noqa: E402

from onnx_lowrank import linalg, pipeline  # noqa: E402
from onnx_lowrank.calibration import load_calibration  # noqa: E402
from onnx_lowrank.passes.calibrate import Calibration  # noqa: E402
from onnx_lowrank.passes.decide import Decided  # noqa: E402
from onnx_lowrank.passes.refit import Refine, Refits, refit_factors  # noqa: E402
from onnx_lowrank.passes.spectra import Spectra  # noqa: E402
from onnx_lowrank.verify import compare  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _refine_stage(b: Bench, ctx: pipeline.Context, decisions, calib) -> tuple[dict, int]:
    """What ``--refine`` does: the pipeline's refine stage on these decisions and feeds (both
    factors, level by level, attention-aware layers refitted on their output side only)."""
    cfg = ctx.request.config.replace(refine=True)
    results = {**ctx.results, "decide": Decided(dict(decisions)),
               "calibrate": Calibration(load_calibration(ctx.model, list(calib)))}
    run = pipeline.Context(dataclasses.replace(ctx.request, config=cfg), model=ctx.model, data=ctx.data, results=results)
    with _cores(b.threads):
        refits = pipeline.run([Refine()], run).need(Refits)
    return refits.factors, refits.runs


def score_factors(b: Bench, ctx: pipeline.Context, decisions, variant: str, calib, mask: str | None) -> dict:
    """Score the decisions' ranks with whitened factors as they are (``none``) or refitted:
    ``factor:P`` / ``both:P`` refit the output-side factor / both factors in ``P`` passes over
    all layers at once, ``seq-factor`` / ``seq-both`` level by level in graph order; ``refine``
    runs the pipeline's refine stage (``--refine``: ``seq-both``, except that attention-aware
    layers refit their output-side factor only)."""
    kind, _, k = variant.partition(":")
    both = kind.endswith("both")
    sequential = kind.startswith("seq")
    passes = 0 if kind in ("none", "refine") else int(k or 1)
    plans = ctx.need(Spectra).plans
    chosen = {key: d for key, d in decisions.items() if d.factorize}
    runs, t0 = 0, time.perf_counter()
    factors = None
    if kind == "refine":
        factors, runs = _refine_stage(b, ctx, chosen, calib)
    elif passes:
        factors = {key: linalg.factors(plans[key].view().spectrum, d.rank) for key, d in chosen.items()}
        weights = {key: ctx.data.read(plans[key].group.weight.tensor) for key in chosen}
        factors, runs = refit_factors(ctx.model, [plans[key].group for key in chosen], factors, weights, calib, ctx.data,
                                      passes=passes, both=both, sequential=sequential, mask_input=mask, threads=b.threads)
    seconds = time.perf_counter() - t0
    kept = b.kept(plans, chosen)
    z = b._run(b.rewritten(ctx, chosen, factors))
    c = compare("out", b.reference, z, b.labels)
    out = {"params_kept": kept / b.total, "refit": variant, "refit_runs": runs, "refit_seconds": round(seconds, 1),
           "cos_mean": c.cosine_mean, "cos_min": c.cosine_min}
    if c.accuracy_after is not None:
        out.update(accuracy=c.accuracy_after, macro_f1=c.f1_after)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["mnist", "minilm"], default="minilm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budgets", type=float, nargs="+")
    p.add_argument("--variants", nargs="+", help="none, factor:P, both:P, seq-factor, seq-both, refine (the pipeline's "
                                                 "refine stage) (default: all but refine)")
    p.add_argument("--methods", nargs="+", default=["whitened", "adaptive"])
    p.add_argument("--adaptive-texts", type=int, default=32)
    p.add_argument("--refit-texts", type=int, default=0, help="MiniLM calibration texts for the refit statistics (0: all)")
    p.add_argument("--json", help="where the results go (default docs/refit_results.json; with --quick "
                                  "benchmarks/_work/refit_quick_<model>.json)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run, not for the docs: one budget, the data and layers of rank_selection.py --quick, "
                        "variants none factor:1 seq-both refine unless given")
    args = p.parse_args()
    import onnxruntime

    q = QUICK[args.only] if args.quick else {}
    budgets = args.budgets or (q["fracs"][:1] if args.quick else [0.8, 0.85])
    variants = args.variants or (["none", "factor:1", "seq-both", "refine"] if args.quick
                                 else ["none", "factor:1", "both:1", "seq-factor", "seq-both"])
    default = real_models.WORK / f"refit_quick_{args.only}.json" if args.quick else DOCS / "refit_results.json"
    json_path = Path(args.json or default)
    if args.only == "minilm":
        rm = real_models.minilm()
        names, mask = ["input_ids", "attention_mask", "token_type_ids"], "attention_mask"
        calib, _ = as_feeds(str(rm.calib), names, batch=32, limit=q.get("calib"))
        hold, labels = as_feeds(str(rm.holdout), names, batch=32, limit=q.get("holdout"))
        sub = calib[: max(1, q.get("adaptive_texts", args.adaptive_texts) // 32)]
        refit_calib = calib[: args.refit_texts // 32] if args.refit_texts else calib
    else:
        rm = real_models.mnist_mlp()
        names, mask = ["pixels"], None
        calib, _ = as_feeds(str(rm.calib), names, batch=500, limit=q.get("calib"))
        hold, labels = as_feeds(str(rm.holdout), names, batch=1000, limit=q.get("holdout"))
        sub = calib[:2]
        refit_calib = calib
    b = Bench(rm.onnx, calib, hold, labels, args.threads, mask, sub, include=q.get("include"),
              cache_tag="_quick" if args.quick else "")
    rows = []
    for method in args.methods:
        for frac in budgets:
            ctx, decisions = b.assignment(method, frac)
            for variant in variants:
                r = dict(method=method, budget=frac, **score_factors(b, ctx, decisions, variant, refit_calib, mask))
                log(f"  {json.dumps(r)}")
                rows.append(r)
    out = {"model": args.only, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
           "threads": args.threads, "calib_samples": sum(len(next(iter(f.values()))) for f in calib),
           "holdout_samples": sum(len(next(iter(f.values()))) for f in hold), "adaptive_samples": sum(len(next(iter(f.values()))) for f in sub),
           "refit_samples": sum(len(next(iter(f.values()))) for f in refit_calib),
           "rows": rows}
    if args.quick:
        out["quick"] = q
    json_path.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {json_path}")


if __name__ == "__main__":
    main()
