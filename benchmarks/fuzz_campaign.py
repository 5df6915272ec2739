"""A long fuzz campaign: the property-test graphs and the byte-level mutants of tests/, for minutes.

    python benchmarks/fuzz_campaign.py --minutes 10 --seed 0

Each case is one of

* ``graph_energy``: a random graph (tests/strategies.py) through ``compress(energy=1.0)``; the
  result must pass the checker, run in onnxruntime, match the original, and be no larger;
* ``graph_rank``: the same with ``rank=1..8``, compared with the original whose factorized weights
  were replaced by their truncated SVD; for some graphs also: a dry run predicts the run, and a
  second run on the result keeps it valid and exact;
* ``mutant_seed``: a damaged file of one of the fuzz seed models (tests/fuzzing.py) through the API and
  the CLI; ``mutant_graph``: the same for a random graph's file (sometimes with external data).

Anything else than success or a clean ``LowRankError`` is a FAILURE: an unexpected exception (the
pipeline's ``StageError``, a ``ModelError`` wrapping an unexpected exception, counts as one), a
checker or onnxruntime error on the result, an output mismatch, a traceback or extra line on the
CLI's stderr, files left behind, a changed input, or a crash (the cases run in a child process,
restarted after a crash).  Each failure's files go to ``benchmarks/_work/fuzz_failures/`` (git-
ignored) with ``info.json`` saying how to replay it; the summary goes to ``--json``.

Replay one case: ``python benchmarks/fuzz_campaign.py --seed S --replay INDEX``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

KINDS = ("graph_energy", "graph_rank", "mutant_seed", "mutant_graph")
WEIGHTS = (3, 3, 2, 2)
MAX_REPRODUCERS_PER_SIGNATURE = 5


def _case_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7919 + 17) % (2**63)


# --------------------------------------------------------------------------------------------
# one case (runs in the worker)
# --------------------------------------------------------------------------------------------


def run_case(seed: int, index: int, seeds: dict, scratch: Path) -> dict:
    """Run case ``index`` of campaign ``seed``; returns a JSON-ready record."""
    import random

    import onnx

    import onnx_lowrank as ol
    from fuzzing import Mutant, check_mutant, make_mutant, seed_files
    from strategies import RandomDraw, build_case, check_counts, check_dry_run, check_original, check_result, check_twice

    rng = random.Random(_case_seed(seed, index))
    kind = rng.choices(KINDS, WEIGHTS)[0]
    rec: dict = {"index": index, "kind": kind, "failures": []}
    files: dict[str, bytes] = {}

    def fail(category: str, message: str, extra_files: dict[str, bytes] | None = None) -> None:
        rec["failures"].append({"category": category, "message": message[:2000]})
        if extra_files:
            files.update(extra_files)

    if kind.startswith("graph"):
        case = build_case(RandomDraw(rng.randrange(2**62)))
        rec["describe"] = case.describe()
        files["model.onnx"] = case.model.SerializeToString()
        try:
            reference = check_original(case)
        except Exception as exc:  # the generator's fault, not the package's
            rec["generator_invalid"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            rec["files"] = files
            return rec
        options = {"energy": 1.0} if kind == "graph_energy" else {"rank": rng.randint(1, 8)}
        options.update(min_params=0, allow_input_weights=case.allow_input_weights)
        rec["options"] = options
        try:
            res = ol.compress(case.model, **options)
        except ol.LowRankError as exc:
            rec["api"] = type(exc).__name__
            cause = f" (wrapping {type(exc.__cause__).__name__}:\n{''.join(traceback.format_exception(exc.__cause__))})" if exc.__cause__ else ""
            fail("valid model refused", f"{type(exc).__name__}: {exc}{cause}")
        except Exception as exc:  # noqa: BLE001
            rec["api"] = f"UNEXPECTED {type(exc).__name__}"
            fail(f"unexpected {type(exc).__name__}", traceback.format_exc())
        else:
            rec["api"] = "ok"
            rec["compressed"] = res.totals.factorized > 0
            files["compressed.onnx"] = res.model.SerializeToString()
            try:
                check_result(case, res, reference if kind == "graph_energy" else None, truncated=kind == "graph_rank")
            except AssertionError as exc:
                fail(_property_category(str(exc)), str(exc))
            except onnx.checker.ValidationError as exc:
                fail("checker refuses the result", str(exc))
            except Exception as exc:  # noqa: BLE001 - onnxruntime refusing the result, mostly
                fail(f"result fails to run ({type(exc).__name__})", str(exc))
            try:
                check_counts(case, res)
            except AssertionError as exc:
                fail("reported parameter count differs from the model", str(exc))
            if rng.random() < 0.3:
                opts = {k: v for k, v in options.items() if k in ("energy", "rank")}
                try:
                    check_dry_run(case, res, **opts)
                except AssertionError as exc:
                    fail("dry run differs from the run", str(exc))
                except Exception as exc:  # noqa: BLE001
                    fail(f"dry run: unexpected {type(exc).__name__}", traceback.format_exc())
                if kind == "graph_energy":
                    try:
                        check_twice(case, res, reference)
                    except AssertionError as exc:
                        fail("second run: " + _property_category(str(exc)), str(exc))
                    except Exception as exc:  # noqa: BLE001
                        fail(f"second run: unexpected {type(exc).__name__}", traceback.format_exc())
        rec["files"] = files
        return rec

    if kind == "mutant_seed":
        mutant = make_mutant(rng, seeds)
    else:
        case = build_case(RandomDraw(rng.randrange(2**62)))
        rec["describe"] = case.describe()
        if rng.random() < 0.5 and case.model.ir_version >= 4:
            base = seed_files({"graph": case.model}, tmp=scratch)
            mutant = make_mutant(rng, base)
        else:
            mutant = make_mutant(rng, {"graph": {"model.onnx": case.model.SerializeToString()}})
    rec["mutant"] = {"seed": mutant.seed, "how": mutant.how}
    work = Path(tempfile.mkdtemp(dir=scratch))
    try:
        out = check_mutant(work, mutant)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rec["api"] = out.api
    rec["cli_rc"] = out.cli_rc
    rec["compressed"] = out.compressed
    for p in out.problems:
        fail(_mutant_category(p), p)
    rec["files"] = mutant.files
    return rec


def _property_category(message: str) -> str:
    if message.startswith("output"):
        return "output mismatch"
    if "grew" in message:
        return "parameters grew"
    if "NaN or Inf" in message:
        return "non-finite factors"
    return "property failed"


def _mutant_category(problem: str) -> str:
    m = re.match(r"API raised (\w+)( wrapping \w+)?", problem)
    if m:
        return f"API raised {m.group(1)}{m.group(2) or ''}"
    if problem.startswith("CLI reported an internal error"):
        return "CLI reported an internal error"
    if problem.startswith("CLI hit its catch-all"):
        m = re.search(r"error: (\w+):", problem)
        return f"CLI catch-all ({m.group(1) if m else '?'})"
    if problem.startswith("CLI printed") or problem.startswith("CLI stderr"):
        return "CLI stderr not one line"
    return problem.split(":")[0][:80]


def _signature(category: str, message: str) -> str:
    first = message.strip().splitlines()[-1] if category.startswith("unexpected") else message.strip().splitlines()[0]
    first = re.sub(r"/tmp/\S+", "<tmp>", first)
    first = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", first)
    first = re.sub(r"'[^']*'", "'…'", first)
    return f"{category}: {first[:160]}"


# --------------------------------------------------------------------------------------------
# worker and parent
# --------------------------------------------------------------------------------------------


def worker(seed: int, start: int, deadline: float, log: Path, fail_dir: Path) -> None:
    from fuzzing import seed_files

    scratch = Path(tempfile.mkdtemp(prefix="fuzz-campaign-"))
    seeds = seed_files(tmp=scratch)
    index = start
    with open(log, "a", encoding="utf-8") as f:
        while time.time() < deadline:
            f.write(json.dumps({"start": index}) + "\n")
            f.flush()
            rec = run_case(seed, index, seeds, scratch)
            files = rec.pop("files", {})
            if rec["failures"]:
                rec["reproducer"] = _save_reproducer(fail_dir, seed, rec, files)
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            index += 1
    shutil.rmtree(scratch, ignore_errors=True)


def _save_reproducer(fail_dir: Path, seed: int, rec: dict, files: dict[str, bytes]) -> str | None:
    sig = _signature(rec["failures"][0]["category"], rec["failures"][0]["message"])
    slug = re.sub(r"[^A-Za-z0-9]+", "-", rec["failures"][0]["category"]).strip("-").lower()[:40]
    existing = list(fail_dir.glob(f"*__{slug}"))
    if len(existing) >= MAX_REPRODUCERS_PER_SIGNATURE * 4:
        return None
    folder = fail_dir / f"seed{seed}-case{rec['index']}__{slug}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    info = {k: v for k, v in rec.items() if k != "reproducer"}
    info["signature"] = sig
    info["replay"] = f"python benchmarks/fuzz_campaign.py --seed {seed} --replay {rec['index']}"
    (folder / "info.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder)


def parent(args: argparse.Namespace) -> dict:
    import numpy as np
    import onnx
    import onnxruntime

    import onnx_lowrank

    fail_dir = Path(args.failures_dir)
    fail_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    deadline = started + args.minutes * 60
    log = Path(tempfile.mkstemp(prefix="fuzz-campaign-", suffix=".jsonl")[1])
    index, crashes, restarts = 0, [], 0
    records: list[dict] = []
    while time.time() < deadline:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--seed", str(args.seed), "--start", str(index),
               "--deadline", str(deadline), "--log", str(log), "--failures-dir", str(fail_dir)]
        try:
            proc = subprocess.run(cmd, timeout=max(60.0, deadline - time.time() + 120), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
            rc, err = proc.returncode, proc.stderr.decode("utf-8", "replace")
        except subprocess.TimeoutExpired as exc:
            rc, err = "timeout", (exc.stderr or b"").decode("utf-8", "replace")
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        log.write_text("")
        last_start = None
        for item in lines:
            if "start" in item:
                last_start = item["start"]
            else:
                records.append(item)
                last_start = None
        if rc == 0:
            break
        restarts += 1
        if last_start is None:  # died outside a case
            crashes.append({"index": None, "rc": rc, "stderr": err[-2000:]})
            index = (records[-1]["index"] + 1) if records else index + 1
            continue
        crashes.append({"index": last_start, "rc": rc, "stderr": err[-2000:],
                        "replay": f"python benchmarks/fuzz_campaign.py --seed {args.seed} --replay {last_start}"})
        index = last_start + 1
    elapsed = time.time() - started
    return summarize(records, crashes, restarts, args, elapsed, {
        "onnx_lowrank": onnx_lowrank.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count()})


def summarize(records: list[dict], crashes: list[dict], restarts: int, args, elapsed: float, versions: dict) -> dict:
    by_kind = Counter(r["kind"] for r in records)
    compressed = Counter(r["kind"] for r in records if r.get("compressed"))
    clean = Counter(r["api"] for r in records if r.get("api") not in (None, "ok") and not str(r.get("api")).startswith("UNEXPECTED")
                    and not any(f["category"].startswith("API raised") for f in r["failures"]))
    cli_rc = Counter(str(r["cli_rc"]) for r in records if "cli_rc" in r)
    invalid = [r for r in records if "generator_invalid" in r]
    sigs: dict[str, dict] = {}
    failed_cases = 0
    for r in records:
        if r["failures"]:
            failed_cases += 1
        for f in r["failures"]:
            sig = _signature(f["category"], f["message"])
            entry = sigs.setdefault(sig, {"signature": sig, "category": f["category"], "count": 0, "first_case": r["index"],
                                          "kind": r["kind"], "describe": r.get("describe"), "mutant": r.get("mutant"),
                                          "message": f["message"][:1500], "reproducer": r.get("reproducer")})
            entry["count"] += 1
            if entry.get("reproducer") is None and r.get("reproducer"):
                entry["reproducer"] = r["reproducer"]
    by_category = Counter()
    for s in sigs.values():
        by_category[s["category"]] += s["count"]
    return {
        "command": "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(ROOT)) if Path(sys.argv[0]).resolve().is_relative_to(ROOT) else sys.argv[0], *sys.argv[1:]]),
        "seed": args.seed,
        "minutes_requested": args.minutes,
        "elapsed_s": round(elapsed, 1),
        "versions": versions,
        "cases": {"total": len(records), "by_kind": dict(by_kind), "per_second": round(len(records) / elapsed, 1) if elapsed else None},
        "compressed": {"total": sum(compressed.values()), "by_kind": dict(compressed)},
        "clean_errors": dict(clean.most_common()),
        "cli_exit_codes": dict(cli_rc.most_common()),
        "generator_invalid": {"count": len(invalid), "examples": [{"index": r["index"], "describe": r.get("describe"),
                                                                    "error": r["generator_invalid"]} for r in invalid[:5]]},
        "failures": {
            "cases": failed_cases,
            "crashes": crashes,
            "worker_restarts": restarts,
            "by_category": dict(by_category.most_common()),
            "distinct": sorted(sigs.values(), key=lambda s: -s["count"]),
        },
    }


def replay(seed: int, index: int) -> None:
    from fuzzing import seed_files

    scratch = Path(tempfile.mkdtemp(prefix="fuzz-replay-"))
    try:
        rec = run_case(seed, index, seed_files(tmp=scratch), scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rec.pop("files", None)
    print(json.dumps(rec, indent=2, default=str))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    p.add_argument("--seed", type=int, default=0, help="campaign seed; case i of seed s is always the same case")
    p.add_argument("--json", default=str(ROOT / "docs" / "benchmarks" / "fuzz_campaign.json"), help="where to write the summary")
    p.add_argument("--failures-dir", default=str(ROOT / "benchmarks" / "_work" / "fuzz_failures"),
                   help="where reproducers go (default benchmarks/_work/fuzz_failures)")
    p.add_argument("--replay", type=int, metavar="INDEX", help="run one case of --seed and print its record")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--log", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.seed, args.start, args.deadline, Path(args.log), Path(args.failures_dir))
        return 0
    if args.replay is not None:
        replay(args.seed, args.replay)
        return 0
    summary = parent(args)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    f = summary["failures"]
    print(f"{summary['cases']['total']} cases in {summary['elapsed_s']} s ({summary['cases']['by_kind']}); "
          f"{summary['compressed']['total']} compressed; clean errors {summary['clean_errors']}; "
          f"{f['cases']} failing case(s), {len(f['crashes'])} crash(es), {len(f['distinct'])} distinct failure(s); wrote {out}")
    for s in f["distinct"]:
        print(f"  {s['count']:5d}  {s['signature']}  (first: case {s['first_case']}, {s.get('reproducer')})")
    return 1 if f["cases"] or f["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
