"""Rank selection on real trained models: plain energy, entropy, whitened and adaptive at equal budgets.

    python benchmarks/rank_selection.py                 # both models, writes docs/rank_selection_*.png
    python benchmarks/rank_selection.py --only mnist

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

from onnx_lowrank import activations, adaptive, decompose, plan  # noqa: E402
from onnx_lowrank.config import CompressConfig  # noqa: E402
from onnx_lowrank.discovery import discover  # noqa: E402
from onnx_lowrank.policies import choose_rank  # noqa: E402
from onnx_lowrank.verify import compare, make_session  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
METHODS = ("energy", "entropy", "budget", "whitened", "adaptive")


def as_feeds(path: str, names: list[str], batch: int) -> tuple[list[dict], np.ndarray | None]:
    """The ``.npz`` at ``path`` cut into feeds of ``batch`` samples, and its ``labels`` if any."""
    with np.load(path) as d:
        arrays = {k: d[k] for k in names}
        labels = d["labels"] if "labels" in d else None
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n, batch)], labels


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Bench:
    """One model: its plans (plain and whitened), and a way to score any rank assignment."""

    def __init__(self, path: Path, calib_feeds, holdout_feeds, labels, threads: int, mask: str | None, adaptive_feeds):
        self.path, self.threads = path, threads
        self.model = onnx.load(str(path))
        self.found = discover(self.model, min_params=4096)
        self.holdout = holdout_feeds
        self.labels = labels
        sess = make_session(self.model, threads=threads)
        self.reference = self._run(sess)
        self.total = sum(int(np.prod(g.weight.shape)) for g in self.found.groups)
        t0 = time.perf_counter()
        self.plain = plan.build_plans(self.found, path.parent)
        groups = [g for g in self.found.groups if g.reason is None]
        cap = activations.capture_grams(self.model, groups, calib_feeds, path.parent, mask_input=mask, threads=threads,
                                        attention=True)
        self.whitened = self._whiten(cap)
        log(f"  spectra and activation statistics: {time.perf_counter() - t0:.1f}s ({cap.runs} runs)")
        t0 = time.perf_counter()
        active = [p for p in self.whitened if p.active]
        cache = real_models.WORK / f"{path.stem}_sensitivity_{sum(len(next(iter(f.values()))) for f in adaptive_feeds)}.json"
        # Measuring is the slow part and the curves depend only on model, data and grid: cached
        # points are reused, and only the grid ranks missing from the cache are measured.
        doc = json.loads(cache.read_text()) if cache.exists() else {"cost": None, "curves": [{}] * len(active)}
        # a curve belongs to one spectrum: its first singular value tells when the whitening changed
        # (curves cached without one were measured with input-only whitening)
        sigs = [round(float(p.spectrum.s[0]), 3) for p in active]
        known = [{int(r): s for r, s in zip(c.get("ranks", []), c.get("sens", []))}
                 if c.get("sig") == sig or ("sig" not in c and p.spectrum.out_whiten is None) else {}
                 for c, sig, p in zip(doc["curves"], sigs, active)]
        if len(known) != len(active):
            known = [{} for _ in active]
        wanted = [adaptive.grid_ranks(p) for p in active]
        if any(r not in k for w, k in zip(wanted, known) for r in w):
            self.ev = adaptive.Evaluator(self.model, [p.group.weight.name for p in active], adaptive_feeds, path.parent, threads)
            for p, w, k in zip(active, wanted, known):
                for r in w:
                    if r not in k:
                        k[r] = adaptive.distortion(self.ev.base, self.ev.run({p.group.weight.name: adaptive._truncated(p, r)}))
            fresh = {"ort_runs": self.ev.runs, "passes": self.ev.passes, "seconds": round(time.perf_counter() - t0, 1)}
            # the cost stated is what measuring the whole grid takes: one pass per grid rank, plus the reference
            per_pass = fresh["seconds"] / max(1, fresh["passes"])
            passes = 1 + sum(len(w) for w in wanted)
            doc["cost"] = {"ort_runs": passes * len(adaptive_feeds), "passes": passes, "seconds": round(per_pass * passes, 1),
                           "estimated": fresh["passes"] < passes}
        self.curves = [adaptive.Curve(w, [k[r] for r in w]) for w, k in zip(wanted, known)]
        self.adaptive_cost = doc["cost"]
        cache.write_text(json.dumps({"cost": doc["cost"], "curves": [{"ranks": sorted(k), "sens": [k[r] for r in sorted(k)], "sig": sig}
                                                                    for k, sig in zip(known, sigs)]}))
        log(f"  sensitivity: {self.adaptive_cost}")

    def _whiten(self, cap):
        found = discover(self.model, min_params=4096)
        grams, out_grams = {}, {}
        by_name = {g.weight.name: g for g in self.found.groups}
        for g in found.groups:
            src = by_name[g.weight.name]
            if id(src) in cap.grams:
                grams[id(g)] = cap.grams[id(src)]
            if id(src) in cap.out_grams:
                out_grams[id(g)] = cap.out_grams[id(src)]
        self.found_w = found
        self.attention_weighted = len(out_grams)
        log(f"  attention-aware: {len(out_grams)} projection(s)")
        return plan.build_plans(found, self.path.parent, grams=grams, out_grams=out_grams, damping=decompose.DEFAULT_DAMPING)

    def _run(self, sess):
        names = [o.name for o in sess.get_outputs()][:1]
        return np.concatenate([sess.run(names, dict(f))[0] for f in self.holdout])

    def score(self, plans, found) -> dict:
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        # plans point into self.model's graph; re-discover on the copy and map by weight name
        f2 = discover(m, min_params=4096)
        ranks = {p.group.weight.name: p.rank for p in plans if p.reason is None and p.choice is not None}
        spec = {p.group.weight.name: p for p in plans}
        copies = []
        for g in f2.groups:
            if g.weight.name in ranks:
                src = spec[g.weight.name]
                q = plan.LayerPlan(group=g, m=src.m, n=src.n, dtype=src.dtype, spectrum=src.spectrum, choice=src.choice)
                copies.append(q)
        plan.apply(m, copies)
        kept = self.total - sum(p.dense_params - p.params_at(p.rank) for p in copies)
        z = self._run(make_session(m, threads=self.threads))
        c = compare("out", self.reference, z, self.labels)
        out = {"params_kept": kept / self.total, "params": int(kept), "ranks": [p.rank for p in copies]}
        if c.accuracy_after is not None:
            out.update(accuracy=c.accuracy_after, accuracy_orig=c.accuracy_before, macro_f1=c.f1_after, f1_orig=c.f1_before)
        out.update(cos_mean=c.cosine_mean, cos_min=c.cosine_min)
        return out

    # ---- rank assignments
    def threshold(self, rule: str, frac: float) -> list:
        """Largest uniform threshold of ``rule`` whose ranks fit the budget."""
        budget = frac * self.total

        def assign(t: float) -> int:
            kept = self.total
            for p in self.plain:
                if p.spectrum is None:
                    continue
                p.reason = None
                p.choice = choose_rank(p.spectrum.s, p.m, p.n, energy=t, rule=rule)
                if p.choice.saves:
                    kept -= p.dense_params - p.params_at(p.rank)
                else:
                    p.reason = "dense"
            return kept

        lo, hi = 1e-6, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if assign(mid) <= budget:
                lo = mid
            else:
                hi = mid
        assign(lo)
        return self.plain

    def budget(self, plans, frac: float) -> list:
        for p in plans:
            p.reason, p.choice = None, None
        cfg = CompressConfig(target_params=frac, min_params=4096)
        plan.decide_budget(plans, cfg, plan.BudgetBase.of(self.found, plans, cfg, 0))
        return plans

    def adaptive(self, frac: float) -> list:
        active = [p for p in self.whitened if p.spectrum is not None]
        for p in active:
            p.reason, p.choice = None, None
        cfg = CompressConfig(target_params=frac, min_params=4096)
        base = plan.BudgetBase.of(self.found_w, active, cfg, 0)
        limits = base.limits(cfg)
        opts = [plan.budget_options(p, c.at, ["--target-params"], 1, min_rank=c.ranks[0]) for p, c in zip(active, self.curves)]
        plan.allocate_plans(active, opts, limits, base)
        return active

    def run(self, method: str, frac: float) -> dict:
        if method in ("energy", "entropy"):
            plans, found = self.threshold(method, frac), self.found
        elif method == "budget":
            plans, found = self.budget(self.plain, frac), self.found
        elif method == "whitened":
            plans, found = self.budget(self.whitened, frac), self.found_w
        else:
            plans, found = self.adaptive(frac), self.found_w
        return self.score(plans, found)


def spectra_note(b: Bench) -> list[dict]:
    """How the energy and entropy rules differ on the real spectra: ranks at the same threshold."""
    rows = []
    for t in (0.8, 0.9, 0.95, 0.99):
        e = [choose_rank(p.spectrum.s, p.m, p.n, energy=t, rule="energy").rank / p.spectrum.full_rank for p in b.plain if p.spectrum is not None]
        h = [choose_rank(p.spectrum.s, p.m, p.n, energy=t, rule="entropy").rank / p.spectrum.full_rank for p in b.plain if p.spectrum is not None]
        w = [choose_rank(p.spectrum.s, p.m, p.n, energy=t, rule="energy").rank / p.spectrum.full_rank for p in b.whitened if p.spectrum is not None]
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


def bench_mnist(threads: int) -> dict:
    rm = real_models.mnist_mlp()
    calib, _ = as_feeds(str(rm.calib), ["pixels"], batch=500)
    hold, labels = as_feeds(str(rm.holdout), ["pixels"], batch=1000)
    sub = calib[:2]  # 1,000 calibration digits for the sensitivity runs
    log("mnist:")
    b = Bench(rm.onnx, calib, hold, labels, threads, None, sub)
    fracs = [0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5]
    res = {m: [dict(budget=f, **b.run(m, f)) for f in fracs] for m in METHODS}
    plot(res, "accuracy", "held-out accuracy", DOCS / "rank_selection_mnist.png", "MNIST MLP 784-512-256-10",
         ref=res["energy"][0]["accuracy_orig"])
    return {"results": res, "spectra": spectra_note(b), "adaptive_cost": b.adaptive_cost, "note": rm.note}


def bench_minilm(threads: int, adaptive_texts: int) -> dict:
    rm = real_models.minilm()
    names = ["input_ids", "attention_mask", "token_type_ids"]
    calib, _ = as_feeds(str(rm.calib), names, batch=32)
    hold, _ = as_feeds(str(rm.holdout), names, batch=32)
    sub = calib[: max(1, adaptive_texts // 32)]
    log("minilm:")
    b = Bench(rm.onnx, calib, hold, None, threads, "attention_mask", sub)
    fracs = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9]
    res = {m: [dict(budget=f, **b.run(m, f)) for f in fracs] for m in METHODS}
    plot(res, "cos_mean", "held-out mean embedding cosine", DOCS / "rank_selection_minilm.png", "all-MiniLM-L6-v2", ref=0.965)
    return {"results": res, "spectra": spectra_note(b), "adaptive_cost": b.adaptive_cost, "note": rm.note,
            "adaptive_texts": len(sub) * 32}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=["mnist", "minilm"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adaptive-texts", type=int, default=128, help="MiniLM calibration texts used for sensitivity runs")
    p.add_argument("--json", default=str(DOCS / "rank_selection_results.json"))
    args = p.parse_args()
    import onnxruntime

    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    path = Path(args.json)
    out = json.loads(path.read_text()) if args.only and path.exists() else {}  # --only refreshes one section
    out |= {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version(),
           "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "threads": args.threads}
    t0 = time.perf_counter()
    if args.only in (None, "mnist"):
        out["mnist"] = bench_mnist(args.threads)
    if args.only in (None, "minilm"):
        out["minilm"] = bench_minilm(args.threads, args.adaptive_texts)
    key = f"seconds_{args.only or 'all'}"
    out[key] = round(time.perf_counter() - t0, 1)
    path.write_text(json.dumps(out, indent=1) + "\n")
    log(f"wrote {args.json} in {out[key]}s")


if __name__ == "__main__":
    main()
