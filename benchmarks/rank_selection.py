"""Rank selection on real trained models: plain energy, entropy, whitened and adaptive at equal budgets.

    python benchmarks/rank_selection.py                 # both models, writes docs/rank_selection_*.png
    python benchmarks/rank_selection.py --only mnist
    python benchmarks/rank_selection.py --quick         # smoke run; writes benchmarks/_work/ only

Methods, each brought to the same parameter budgets (fraction F of the MatMul/Gemm weight
parameters; the x axis of the plots is the fraction actually kept):

* ``energy``   one energy threshold for every layer (the default rule), the largest threshold
               that fits the budget, found by bisection;
* ``entropy``  the same with ARSVD's spectral-entropy rule;
* ``budget``   ``--target-params F``: greedy water-filling on the plain truncation error;
* ``whitened`` ``--data-aware --target-params F``: the same on the whitened spectra;
* ``adaptive`` ``--adaptive --data-aware --target-params F``: allocation by sensitivity measured
               on (a subset of) the calibration set.

Quality on held-out data only: accuracy and macro-F1 for the MNIST MLP, mean and minimum
sentence-embedding cosine to the original for MiniLM.  The models come from ``real_models.py``.
onnxruntime runs with ``--threads`` intra-op threads (default 2).

Every step is the pipeline's own (:mod:`onnx_lowrank.passes`): spectra and statistics from its
stages, decisions from its deciders (the adaptive allocator on sensitivity curves measured here
and cached in ``benchmarks/_work/``), and the scored model from its rewrite stage.
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
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import real_models  # noqa: E402

from onnx_lowrank import linalg, pipeline  # noqa: E402
from onnx_lowrank.config import CompressConfig  # noqa: E402
from onnx_lowrank.passes import adaptive  # noqa: E402
from onnx_lowrank.passes.calibrate import Calibrate  # noqa: E402
from onnx_lowrank.passes.decide import BudgetBase, Decide, Decided, allocate_decisions, budget_options  # noqa: E402
from onnx_lowrank.passes.discover import Discover, Discovery  # noqa: E402
from onnx_lowrank.passes.load import Load, Loaded  # noqa: E402
from onnx_lowrank.passes.refit import Refits  # noqa: E402
from onnx_lowrank.passes.rewrite import Rewrite  # noqa: E402
from onnx_lowrank.passes.spectra import Spectra, TakeSpectra  # noqa: E402
from onnx_lowrank.passes.statistics import CaptureStatistics, Statistics  # noqa: E402
from onnx_lowrank.plan import Decision  # noqa: E402
from onnx_lowrank.runtime import session  # noqa: E402
from onnx_lowrank.runtime.threads import limit  # noqa: E402
from onnx_lowrank.verify import compare  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
METHODS = ("energy", "entropy", "budget", "whitened", "adaptive")
#: What --quick does: a smoke run (few budgets, few texts, MiniLM's first encoder layer only),
#: written to benchmarks/_work/ and never to docs/.
QUICK = {"mnist": dict(fracs=[0.1, 0.3], calib=1000, holdout=1000),
         "minilm": dict(fracs=[0.9, 0.95], calib=64, holdout=64, adaptive_texts=32, include=r"/layer\.0/")}


def as_feeds(path: str, names: list[str], batch: int, limit: int | None = None) -> tuple[list[dict], np.ndarray | None]:
    """The ``.npz`` at ``path`` (its first ``limit`` samples) cut into feeds of ``batch`` samples,
    and its ``labels`` if any."""
    with np.load(path) as d:
        arrays = {k: d[k][:limit] for k in names}
        labels = d["labels"][:limit] if "labels" in d else None
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n, batch)], labels


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cores(n: int):
    """Cap the pass's own BLAS and onnxruntime threads at ``n``, as ``compress()`` does for its
    stages (``cores``)."""
    return limit(n)


class _Given(pipeline.Step):
    """A stage that returns a result computed earlier (decisions, or refitted factors)."""

    def __init__(self, name: str, result: pipeline.StageResult):
        self.name, self.result = name, result

    def run(self, ctx: pipeline.Context) -> pipeline.StageResult:
        return self.result


class _Rebound(pipeline.Step):
    """The cached spectra, bound to this run's discovery: the plans point into the graph they were
    taken from, and the rewrite edits this run's copy (same model: same keys, checked by name)."""

    name = "spectra"

    def __init__(self, spectra: Spectra):
        self.spectra = spectra

    def run(self, ctx: pipeline.Context) -> Spectra:
        found = ctx.need(Discovery)
        plans = {}
        for key, p in self.spectra.plans.items():
            group = found.group(key)
            if group.weight.name != p.name:
                raise RuntimeError(f"weight group {key} is {group.weight.name} here but {p.name} in the cached spectra")
            if p.conv_uses:
                raise NotImplementedError("rebinding Conv plans (conv_uses) is not needed by these benchmarks")
            plans[key] = dataclasses.replace(p, group=group)
        return Spectra(plans, self.spectra.shapes)


class Bench:
    """One model: its plans (plain and whitened), and a way to score any rank assignment.

    Spectra and activation statistics are taken once, by the pipeline's own stages (load,
    discover, calibrate, statistics, spectra) under a budget configuration, which keeps every
    singular value and the singular vectors up to break-even: all that any method here can use.
    Each method then decides with the pipeline's deciders, and each assignment is scored on the
    model the pipeline's rewrite stage makes from it.
    """

    def __init__(self, path: Path, calib_feeds, holdout_feeds, labels, threads: int, mask: str | None, adaptive_feeds,
                 include: str | None = None, cache_tag: str = ""):
        self.path, self.threads = path, threads
        self.model = onnx.load(str(path))
        self.select = dict(min_params=4096, include=include)
        self.holdout = holdout_feeds
        self.labels = labels
        self.reference = self._run(self.model)
        t0 = time.perf_counter()
        self.plain_ctx = self._plan(CompressConfig(target_params=1.0, **self.select))
        found = self.plain_ctx.need(Discovery)
        self.total = sum(int(np.prod(g.weight.shape)) for g in found.groups if g.weight.tensor is not None)
        self.whitened_ctx = self._plan(CompressConfig(target_params=1.0, data_aware=True, calib_mask=mask, **self.select),
                                       calib=calib_feeds)
        stats = self.whitened_ctx.need(Statistics)
        self.attention_weighted = len(stats.capture.out_grams)
        log(f"  attention-aware: {self.attention_weighted} projection(s)")
        log(f"  spectra and activation statistics: {time.perf_counter() - t0:.1f}s ({stats.capture.runs} runs)")
        self.plain = self.plain_ctx.need(Spectra).plans
        self.whitened = self.whitened_ctx.need(Spectra).plans
        t0 = time.perf_counter()
        self.active = [p for p in self.whitened.values() if p.active and not p.is_conv]
        active = self.active
        names = [p.name for p in active]
        samples = sum(len(next(iter(f.values()))) for f in adaptive_feeds)
        cache = real_models.WORK / f"{path.stem}_sensitivity_{samples}{cache_tag}.json"
        # Measuring is the slow part and the curves depend only on model, data and grid: cached
        # points are reused, and only the grid ranks missing from the cache are measured.
        doc = json.loads(cache.read_text()) if cache.exists() else {"cost": None, "curves": [{}] * len(active)}
        # a curve belongs to one spectrum: its first singular value tells when the whitening changed
        # (curves cached without one were measured with input-only whitening)
        sigs = [round(float(p.view().spectrum.s[0]), 3) for p in active]
        known = [{int(r): s for r, s in zip(c.get("ranks", []), c.get("sens", []))}
                 if c.get("sig") == sig or ("sig" not in c and p.view().spectrum.out_whiten is None) else {}
                 for c, sig, p in zip(doc["curves"], sigs, active)]
        if len(known) != len(active) or doc.get("names", names) != names:
            known = [{} for _ in active]
        wanted = [adaptive.grid_ranks(p) for p in active]
        if any(r not in k for w, k in zip(wanted, known) for r in w):
            self.ev = adaptive.Evaluator(self.model, names, adaptive_feeds, self.whitened_ctx.data, threads)
            for p, w, k in zip(active, wanted, known):
                for r in w:
                    if r not in k:
                        k[r] = adaptive.distortion(self.ev.base, self.ev.run({p.name: adaptive._truncated(p, r)}))
            fresh = {"ort_runs": self.ev.runs, "passes": self.ev.passes, "seconds": round(time.perf_counter() - t0, 1)}
            # the cost stated is what measuring the whole grid takes: one pass per grid rank, plus the reference
            per_pass = fresh["seconds"] / max(1, fresh["passes"])
            passes = 1 + sum(len(w) for w in wanted)
            doc["cost"] = {"ort_runs": passes * len(adaptive_feeds), "passes": passes, "seconds": round(per_pass * passes, 1),
                           "estimated": fresh["passes"] < passes}
        self.curves = [adaptive.Curve(w, [k[r] for r in w]) for w, k in zip(wanted, known)]
        self.adaptive_cost = doc["cost"]
        cache.write_text(json.dumps({"cost": doc["cost"], "names": names,
                                     "curves": [{"ranks": sorted(k), "sens": [k[r] for r in sorted(k)], "sig": sig}
                                                for k, sig in zip(known, sigs)]}))
        log(f"  sensitivity: {self.adaptive_cost}")

    def _plan(self, cfg: CompressConfig, calib=None) -> pipeline.Context:
        """The pipeline up to the spectra (the statistics too with ``data_aware``)."""
        stages = [Load(), Discover(), Calibrate(), CaptureStatistics(), TakeSpectra()]
        with _cores(self.threads):
            return pipeline.run(stages, pipeline.Context(pipeline.Request(source=self.model, config=cfg, calib=calib)))

    def _run(self, model: onnx.ModelProto) -> np.ndarray:
        sess = session(model, threads=self.threads)
        names = [o.name for o in sess.get_outputs()][:1]
        return np.concatenate([sess.run(names, dict(f))[0] for f in self.holdout])

    def decide(self, ctx: pipeline.Context, cfg: CompressConfig) -> dict[int, Decision]:
        """The decide stage's decisions under ``cfg``, on the spectra taken in ``ctx``."""
        again = pipeline.Context(dataclasses.replace(ctx.request, config=cfg), model=ctx.model, data=ctx.data,
                                 results=dict(ctx.results))
        return pipeline.run([Decide()], again).latest(Decided).decisions

    def rewritten(self, ctx: pipeline.Context, decisions: dict[int, Decision],
                  factors: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> onnx.ModelProto:
        """The model the rewrite stage makes with ``decisions`` (and refitted ``factors``, by key)
        on a fresh copy of the model, with the spectra taken in ``ctx``."""
        stages = [Load(), Discover(), _Rebound(ctx.need(Spectra)), _Given("decide", Decided(dict(decisions)))]
        if factors is not None:
            stages.append(_Given("refine", Refits(dict(factors))))
        stages.append(Rewrite())
        request = pipeline.Request(source=self.model, config=ctx.request.config)
        return pipeline.run(stages, pipeline.Context(request)).model

    def kept(self, plans, decisions: dict[int, Decision]) -> int:
        return self.total - sum(plans[k].dense_params - plans[k].params_at(d.rank, d.mode)
                                for k, d in decisions.items() if d.factorize)

    def score(self, ctx: pipeline.Context, decisions: dict[int, Decision]) -> dict:
        plans = ctx.need(Spectra).plans
        chosen = {k: d for k, d in decisions.items() if d.factorize}
        kept = self.kept(plans, chosen)
        z = self._run(self.rewritten(ctx, chosen))
        c = compare("out", self.reference, z, self.labels)
        out = {"params_kept": kept / self.total, "params": int(kept), "ranks": [d.rank for _, d in sorted(chosen.items())]}
        if c.accuracy_after is not None:
            out.update(accuracy=c.accuracy_after, accuracy_orig=c.accuracy_before, macro_f1=c.f1_after, f1_orig=c.f1_before)
        out.update(cos_mean=c.cosine_mean, cos_min=c.cosine_min)
        return out

    # ---- rank assignments
    def threshold(self, rule: str, frac: float) -> dict[int, Decision]:
        """Largest uniform threshold of ``rule`` whose ranks fit the budget (the per-layer rule)."""
        budget = frac * self.total

        def assign(t: float) -> dict[int, Decision]:
            return self.decide(self.plain_ctx, CompressConfig(energy=t, rank_rule=rule, **self.select))

        lo, hi = 1e-6, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if self.kept(self.plain, assign(mid)) <= budget:
                lo = mid
            else:
                hi = mid
        return assign(lo)

    def budget(self, ctx: pipeline.Context, frac: float) -> dict[int, Decision]:
        """``--target-params frac``: the decide stage's water-filling on the spectra of ``ctx``."""
        return self.decide(ctx, ctx.request.config.replace(target_params=frac))

    def adaptive(self, frac: float) -> dict[int, Decision]:
        """The adaptive stage's allocation on the (cached) measured curves, for ``target_params=frac``."""
        cfg = CompressConfig(target_params=frac, **self.select)
        ctx = self.whitened_ctx
        base = BudgetBase.of(ctx.need(Discovery).groups, self.active, cfg, ctx.need(Loaded).params)
        limits = base.limits(cfg)
        opts = [budget_options(p, c.at, ["target_params"], 1, min_rank=c.ranks[0]) for p, c in zip(self.active, self.curves)]
        return allocate_decisions(self.active, opts, limits, base, stage="adaptive")

    def assignment(self, method: str, frac: float) -> tuple[pipeline.Context, dict[int, Decision]]:
        """The spectra a method's ranks belong to (plain or whitened), and its decisions."""
        if method in ("energy", "entropy"):
            return self.plain_ctx, self.threshold(method, frac)
        if method == "budget":
            return self.plain_ctx, self.budget(self.plain_ctx, frac)
        if method == "whitened":
            return self.whitened_ctx, self.budget(self.whitened_ctx, frac)
        return self.whitened_ctx, self.adaptive(frac)

    def run(self, method: str, frac: float) -> dict:
        return self.score(*self.assignment(method, frac))


def spectra_note(b: Bench) -> list[dict]:
    """How the energy and entropy rules differ on the real spectra: ranks at the same threshold."""

    def fractions(plans, t: float, rule: str) -> list[float]:
        out = []
        for p in plans.values():
            v = p.view()
            if v.spectrum is not None:
                out.append(linalg.choose_rank(v.spectrum.s, v.m, v.n, energy=t, rule=rule, total=v.spectrum.total).rank
                           / v.spectrum.full_rank)
        return out

    rows = []
    for t in (0.8, 0.9, 0.95, 0.99):
        e, h, w = fractions(b.plain, t, "energy"), fractions(b.plain, t, "entropy"), fractions(b.whitened, t, "energy")
        rows.append({"threshold": t, "energy_rank_frac": float(np.mean(e)), "entropy_rank_frac": float(np.mean(h)),
                     "whitened_energy_rank_frac": float(np.mean(w))})
    return rows


def plot(results: dict, key: str, label: str, path: Path, title: str, ref: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=100)
    for method in METHODS:
        pts = sorted((r["params_kept"], r[key]) for r in results[method])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=method)
    if ref is not None:
        ax.axhline(ref, color="grey", lw=0.8, ls="--", label="original" if key == "accuracy" else "target 0.965")
    ax.set_xlabel("fraction of MatMul/Gemm weight parameters kept")
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bench_mnist(threads: int, quick: bool = False, plots: Path = DOCS) -> dict:
    q = QUICK["mnist"] if quick else {}
    rm = real_models.mnist_mlp()
    calib, _ = as_feeds(str(rm.calib), ["pixels"], batch=500, limit=q.get("calib"))
    hold, labels = as_feeds(str(rm.holdout), ["pixels"], batch=1000, limit=q.get("holdout"))
    sub = calib[:2]  # 1,000 calibration digits for the sensitivity runs
    log("mnist:")
    b = Bench(rm.onnx, calib, hold, labels, threads, None, sub, cache_tag="_quick" if quick else "")
    fracs = q.get("fracs", [0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5])
    res = {m: [dict(budget=f, **b.run(m, f)) for f in fracs] for m in METHODS}
    plot(res, "accuracy", "held-out accuracy", plots / "rank_selection_mnist.png", "MNIST MLP 784-512-256-10",
         ref=res["energy"][0]["accuracy_orig"])
    return {"results": res, "spectra": spectra_note(b), "adaptive_cost": b.adaptive_cost, "note": rm.note}


def bench_minilm(threads: int, adaptive_texts: int, quick: bool = False, plots: Path = DOCS) -> dict:
    q = QUICK["minilm"] if quick else {}
    rm = real_models.minilm()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    calib, _ = as_feeds(str(rm.calib), names, batch=32, limit=q.get("calib"))
    hold, _ = as_feeds(str(rm.holdout), names, batch=32, limit=q.get("holdout"))
    adaptive_texts = q.get("adaptive_texts", adaptive_texts)
    sub = calib[: max(1, adaptive_texts // 32)]
    log("minilm:")
    b = Bench(rm.onnx, calib, hold, None, threads, "attention_mask", sub, include=q.get("include"),
              cache_tag="_quick" if quick else "")
    fracs = q.get("fracs", [0.5, 0.6, 0.7, 0.8, 0.85, 0.9])
    res = {m: [dict(budget=f, **b.run(m, f)) for f in fracs] for m in METHODS}
    plot(res, "cos_mean", "held-out mean embedding cosine", plots / "rank_selection_minilm.png", "all-MiniLM-L6-v2", ref=0.965)
    out = {"results": res, "spectra": spectra_note(b), "adaptive_cost": b.adaptive_cost, "note": rm.note,
           "adaptive_texts": len(sub) * 32}
    if quick:
        out["quick"] = {**q, "calib_texts": sum(len(f["input_ids"]) for f in calib)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["mnist", "minilm"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adaptive-texts", type=int, default=128, help="MiniLM calibration texts used for sensitivity runs")
    p.add_argument("--json", help="where the results go (default docs/rank_selection_results.json; with --quick "
                                  "benchmarks/_work/rank_selection_quick.json)")
    p.add_argument("--plots", help="folder for the plots (default docs/; with --quick benchmarks/_work/)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run, not for the docs: two budgets, MiniLM's first encoder layer only, 64 calibration and "
                        "64 held-out texts, 32 for the sensitivity; plots and results go to benchmarks/_work/")
    args = p.parse_args()
    import onnxruntime

    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    plots = Path(args.plots) if args.plots else real_models.WORK if args.quick else DOCS
    default = real_models.WORK / "rank_selection_quick.json" if args.quick else DOCS / "rank_selection_results.json"
    path = Path(args.json or default)
    out = json.loads(path.read_text()) if args.only and path.exists() else {}  # --only refreshes one section
    out |= {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
           "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "threads": args.threads}
    t0 = time.perf_counter()
    if args.only in (None, "mnist"):
        out["mnist"] = bench_mnist(args.threads, args.quick, plots)
    if args.only in (None, "minilm"):
        out["minilm"] = bench_minilm(args.threads, args.adaptive_texts, args.quick, plots)
    key = f"seconds_{args.only or 'all'}"
    out[key] = round(time.perf_counter() - t0, 1)
    path.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {path} in {out[key]}s")


if __name__ == "__main__":
    main()
