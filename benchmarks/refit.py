"""Least-squares refit after truncation, measured on real models at equal parameter budgets.

    OMP_NUM_THREADS=2 python benchmarks/refit.py --only minilm --budgets 0.8 --variants none factor:1 seq-both

For each budget the ranks come from ``whitened`` (``--data-aware --target-params F``) and
``adaptive`` (as in ``rank_selection.py``); the same ranks are then scored on the held-out data
with the whitened factors as they are and after each refit variant (see ``score_factors``;
:func:`onnx_lowrank.activations.refit_factors`, statistics on the calibration set).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import real_models  # noqa: E402
from rank_selection import Bench, as_feeds, log  # noqa: E402

from onnx_lowrank import activations, decompose, io  # noqa: E402
from onnx_lowrank.discovery import discover  # noqa: E402
from onnx_lowrank.rewrite import NameScope, factorize_group  # noqa: E402
from onnx_lowrank.verify import compare, make_session  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"


def score_factors(b: Bench, plans, variant: str, calib, mask: str | None) -> dict:
    """Score the plans' ranks with whitened factors as they are (``none``) or refitted:
    ``factor:P`` / ``both:P`` refit the output-side factor / both factors in ``P`` passes over
    all layers at once, ``seq-factor`` / ``seq-both`` level by level in graph order."""
    kind, _, k = variant.partition(":")
    both = kind.endswith("both")
    sequential = kind.startswith("seq")
    passes = 0 if kind == "none" else int(k or 1)
    chosen = [p for p in plans if p.reason is None and p.choice is not None]
    factors = {id(p.group): decompose.factors(p.spectrum, p.rank) for p in chosen}
    weights = {id(p.group): io.read_tensor(p.group.weight.tensor, b.path.parent) for p in chosen}
    runs, t0 = 0, time.perf_counter()
    if passes:
        factors, runs = activations.refit_factors(b.model, [p.group for p in chosen], factors, weights, calib, b.path.parent,
                                                  passes=passes, both=both, sequential=sequential,
                                                  mask_input=mask, threads=b.threads)
    seconds = time.perf_counter() - t0
    m = onnx.ModelProto()
    m.CopyFrom(b.model)
    by_name = {g.weight.name: g for g in discover(m, min_params=4096).groups}
    names = NameScope(m)
    for p in chosen:
        a, bb = factors[id(p.group)]
        factorize_group(m, by_name[p.group.weight.name], np.asarray(a, p.dtype), np.asarray(bb, p.dtype), names)
    kept = b.total - sum(p.dense_params - p.params_at(p.rank) for p in chosen)
    z = b._run(make_session(m, threads=b.threads))
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
    p.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.85])
    p.add_argument("--variants", nargs="+", default=["none", "factor:1", "both:1", "seq-factor", "seq-both"])
    p.add_argument("--methods", nargs="+", default=["whitened", "adaptive"])
    p.add_argument("--adaptive-texts", type=int, default=32)
    p.add_argument("--refit-texts", type=int, default=0, help="MiniLM calibration texts for the refit statistics (0: all)")
    p.add_argument("--json", default=str(DOCS / "refit_results.json"))
    args = p.parse_args()
    import onnxruntime

    if args.only == "minilm":
        rm = real_models.minilm()
        names, mask = ["input_ids", "attention_mask", "token_type_ids"], "attention_mask"
        calib, _ = as_feeds(str(rm.calib), names, batch=32)
        hold, labels = as_feeds(str(rm.holdout), names, batch=32)
        sub = calib[: max(1, args.adaptive_texts // 32)]
        refit_calib = calib[: args.refit_texts // 32] if args.refit_texts else calib
    else:
        rm = real_models.mnist_mlp()
        names, mask = ["pixels"], None
        calib, _ = as_feeds(str(rm.calib), names, batch=500)
        hold, labels = as_feeds(str(rm.holdout), names, batch=1000)
        sub = calib[:2]
        refit_calib = calib
    b = Bench(rm.onnx, calib, hold, labels, args.threads, mask, sub)
    rows = []
    for method in args.methods:
        for frac in args.budgets:
            plans = b.budget(b.whitened, frac) if method == "whitened" else b.adaptive(frac)
            for variant in args.variants:
                r = dict(method=method, budget=frac, **score_factors(b, plans, variant, refit_calib, mask))
                log(f"  {json.dumps(r)}")
                rows.append(r)
    out = {"model": args.only, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
           "threads": args.threads, "calib_samples": sum(len(next(iter(f.values()))) for f in calib),
           "holdout_samples": sum(len(next(iter(f.values()))) for f in hold), "adaptive_samples": sum(len(next(iter(f.values()))) for f in sub),
           "refit_samples": sum(len(next(iter(f.values()))) for f in refit_calib),
           "rows": rows}
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
