"""Command line: argument parsing and printing only; the work is done by :func:`compress`.

    onnx-lowrank MODEL -o OUT [--energy E | --rank N] [--calib DATA --max-drop X] [options]
    onnx-lowrank verify ORIGINAL COMPRESSED [--calib DATA] [--max-drop X] [options]
    onnx-lowrank demo [-o OUT]
    onnx-lowrank bench MODEL [OTHER] [--threads 1,2] [--batch 1,64] [--input-shape NAME:1x128]

Exit codes: 0 done, 1 failure (unreadable model, failed check), 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from typing import Any, Callable, Sequence

from . import __version__
from .errors import Interrupted, LowRankError, UsageError, flag_names

PROG = "onnx-lowrank"
SUBCOMMANDS = ("demo", "verify", "bench")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def _number(kind: type, what: str, *, low: float | None = None, low_open: bool = False, high: float | None = None,
            example: str | None = None) -> Callable[[str], Any]:
    """An argparse type: ``kind`` (int or float) within bounds, with one message for both failures."""
    hint = f"; e.g. {example}" if example else ""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got '{text}'{hint}") from None
        ok = (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
        if not ok:  # written so that NaN fails too
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}{hint}")
        return value

    return parse


_energy = _number(float, "a number in (0, 1]", low=0.0, low_open=True, high=1.0, example="--energy 0.93")
_non_negative_int = _number(int, "a non-negative integer", low=0)
_drop_limit = _number(float, "a non-negative number", low=0.0, example="--max-drop 0.01 (one point)")


def _fraction(flag: str) -> Callable[[str], float]:
    return _number(float, "a fraction in (0, 1]", low=0.0, low_open=True, high=1.0, example=f"{flag} 0.5")


def _non_negative_float(flag: str, example: str) -> Callable[[str], float]:
    return _number(float, "a non-negative number", low=0.0, example=f"{flag} {example}")


def _positive_int(flag: str) -> Callable[[str], int]:
    return _number(int, "a positive integer", low=1, example=f"{flag} 8")


def _positive_float(flag: str) -> Callable[[str], float]:
    return _number(float, "a positive number", low=0.0, low_open=True, example=f"{flag} 1.1")


def _int_list(flag: str) -> Callable[[str], tuple[int, ...]]:
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(s) for s in text.split(",") if s.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, got '{text}'; e.g. {flag} 1,2") from None
        if not values or any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, got '{text}'; e.g. {flag} 1,2")
        return values

    return parse


def _op_types(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _add_pass_options(p: argparse.ArgumentParser) -> None:
    from .config import QUANTIZE_MODES

    g = p.add_argument_group("rank selection (flags override --recipe)")
    rule = g.add_mutually_exclusive_group()
    rule.add_argument("--energy", type=_energy, metavar="E",
                      help="keep per layer the smallest rank holding this fraction of the squared singular values (default 0.95)")
    rule.add_argument("--rank", type=_positive_int("--rank"), metavar="N", help="fixed rank for every layer")
    g.add_argument("--rank-multiple", type=_positive_int("--rank-multiple"), metavar="K",
                   help="round ranks up to a multiple of K, never past break-even")
    g.add_argument("--rank-rule", choices=["energy", "entropy"],
                   help="per-layer rule that --energy thresholds: squared singular values (energy, default) or "
                        "ARSVD's spectral entropy (entropy)")
    g.add_argument("--recipe", metavar="NAME|FILE", help="a pass recipe: a shipped name (balanced, ...) or a TOML file")
    b = p.add_argument_group("global budgets and data-aware selection (replace the per-layer rule)")
    b.add_argument("--target-params", type=_fraction("--target-params"), metavar="F",
                   help="keep at most this fraction of the parameters; ranks are allocated across layers")
    b.add_argument("--target-macs", type=_fraction("--target-macs"), metavar="F",
                   help="keep at most this fraction of the candidate layers' MACs per row")
    b.add_argument("--budget-scope", choices=["weights", "model"],
                   help="what --target-params is a fraction of: the MatMul/Gemm weights (default) or the whole model")
    b.add_argument("--data-aware", action="store_true", default=None,
                   help="truncate in the space whitened by real input activations (needs --calib or --calib-script)")
    b.add_argument("--no-attention-aware", dest="attention_aware", action="store_false", default=None,
                   help="with --data-aware: weigh attention query/key projections by their input only, not also by "
                        "the keys/queries their output is scored against")
    b.add_argument("--damping", type=_non_negative_float("--damping", "0.01"), metavar="D",
                   help="damping of the activation Gram matrix, relative to its mean diagonal (default 0.01)")
    b.add_argument("--adaptive", action="store_true", default=None,
                   help="allocate ranks by sensitivity measured on --calib (goal: --max-drop, accuracy with labels "
                        "else mean output cosine; or a budget)")
    b.add_argument("--adaptive-samples", type=_positive_int("--adaptive-samples"), metavar="N",
                   help="with --adaptive: measure sensitivity, search and check on the first N calibration samples, "
                        "rounded up to whole feeds (default all; --data-aware statistics and verification use all)")
    b.add_argument("--refine", action="store_true", default=None,
                   help="after choosing ranks, refit the factors by least squares on --calib activations of the "
                        "compressed model, layer by layer in graph order")
    b.add_argument("--calib-mask", metavar="INPUT",
                   help="with --data-aware: input whose zeros mark padded rows to leave out (e.g. attention_mask)")
    s = p.add_argument_group("layer selection")
    s.add_argument("--min-params", type=_non_negative_int, metavar="N", help="leave weights with fewer elements alone (default 4096)")
    s.add_argument("--include", metavar="REGEX", help="only factorize nodes or weights whose name matches")
    s.add_argument("--exclude", metavar="REGEX", help="leave nodes or weights whose name matches alone")
    s.add_argument("--op-types", type=_op_types, metavar="LIST",
                   help="node types to consider, a comma-separated subset of MatMul,Gemm,Conv (default: all three)")
    s.add_argument("--conv-mode", choices=("channel", "spatial", "auto"),
                   help="how a Conv is split: channel (k x k conv to r channels, then 1 x 1), spatial (kh x 1, then 1 x kw), "
                        "or auto: per layer, whichever needs fewer MACs (default auto)")
    s.add_argument("--allow-input-weights", action="store_true", default=None,
                   help="also factorize weights that are graph inputs (every initializer is one in IR < 4)")
    lat = p.add_argument_group("latency and int8")
    lat.add_argument("--latency-aware", action="store_true", default=None,
                     help="factorize a layer only where onnxruntime runs its factored form faster, at every --threads x --batch")
    lat.add_argument("--threads", type=_int_list("--threads"), metavar="LIST", help="onnxruntime intra-op thread counts the model runs with (default 1); verification uses the first")
    lat.add_argument("--batch", type=_int_list("--batch"), metavar="LIST", help="batch sizes the model runs at (default 1)")
    lat.add_argument("--input-shape", action="append", metavar="NAME:DIMS",
                     help="shape of an input with dynamic axes, e.g. input_ids:1x128 (comma-separated, repeatable); "
                          "for latency-aware mode and for random verification inputs")
    lat.add_argument("--min-speedup", type=_positive_float("--min-speedup"), metavar="X",
                     help="speed-up a layer must show at every setting in latency-aware mode (default 1.1)")
    lat.add_argument("--quantize", choices=list(QUANTIZE_MODES),
                     help="onnxruntime dynamic int8 quantization after factorization: int8 (onnxruntime's defaults, one scale "
                          "per weight) or int8-per-channel (one scale per output column of MatMul/Gemm weights; "
                          "better quality, same size; Conv kernels keep one scale)")


def _add_verify_options(p: argparse.ArgumentParser, title: str, *, run_settings: bool = True) -> None:
    """The verification flags.  ``run_settings`` off: ``--threads`` and ``--input-shape`` come from
    the pass's latency group instead (one flag each, shared by both)."""
    from .verify import METRICS

    g = p.add_argument_group(title)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--calib", metavar="PATH", help="calibration data: an .npz (keys = input names, first axis = samples) or a directory of .npz files, one feed each")
    src.add_argument("--calib-script", metavar="FILE.py:FUNC", help="a function returning an iterable of feed dicts")
    g.add_argument("--calib-batch", type=_positive_int("--calib-batch"), metavar="N", help="samples per onnxruntime run when cutting an .npz (default 32)")
    g.add_argument("--labels", metavar="NPY", help="class ids, one per sample (else a 'labels' array in the .npz)")
    g.add_argument("--samples", type=_positive_int("--samples"), metavar="N", help="without --calib: random samples to compare on (default 32)")
    if run_settings:
        g.add_argument("--input-shape", action="append", metavar="NAME:DIMS", help="shape of a random input, e.g. input_ids:1x128 (repeatable, or comma-separated)")
    g.add_argument("--input-range", action="append", metavar="NAME:LOW,HIGH", help="values of a random input drawn from [LOW, HIGH), e.g. input_ids:0,30522")
    g.add_argument("--max-drop", type=_drop_limit, metavar="X", help="fail when the metric drops by more than X (a fraction: 0.01 is one point; "
                   "for --metric max_abs, in the output's units); with --adaptive also the goal of the rank search")
    g.add_argument("--metric", choices=METRICS, help="what --max-drop is checked against (default: accuracy with labels, else top1 for "
                   "outputs named like class scores, else rel_l2, the relative L2 error; use cosine for embeddings)")
    g.add_argument("--gate-output", metavar="NAME", help="judge only this model output (default: every output, the worst counts)")
    g.add_argument("--keep-failed", action="store_true", default=None, help="write the model even when the check fails (still exit 1)")
    if run_settings:
        g.add_argument("--threads", type=_positive_int("--threads"), metavar="N", help="onnxruntime intra-op threads (default: onnxruntime's choice)")


_VERIFY_FLAGS = ("calib", "calib_script", "calib_batch", "labels", "samples", "input_shape", "input_range", "max_drop", "metric",
                 "gate_output", "keep_failed", "threads")


def _verify_config(args: argparse.Namespace, *, always: bool = False):
    """A VerifyConfig from the flags given, or None when none was given (and ``always`` is off)."""
    from .verify import VerifyConfig

    given = {k: getattr(args, k) for k in _VERIFY_FLAGS if getattr(args, k, None) is not None}
    # --threads is a run setting, never a request for a check; --input-shape also serves
    # latency-aware mode, and there, alone, does not ask for one either.
    shared = ["threads"]
    if getattr(args, "latency_aware", None):
        shared.append("input_shape")
        if "calib" in given or "calib_script" in given:
            given.pop("input_shape", None)  # real data needs no shapes; they were for the latency probes
    if getattr(args, "dry_run", False) and (getattr(args, "data_aware", None) or getattr(args, "adaptive", None)):
        # In a dry run the calibration flags feed rank selection only; nothing is written to check.
        shared += ["calib", "calib_script", "labels", "calib_batch"]
    asked = {k for k in given if k not in shared}
    if not asked and not always and not getattr(args, "verify", False):
        return None
    if isinstance(given.get("threads"), tuple):
        given["threads"] = given["threads"][0]  # the pass takes a list of settings; the check runs once
    return VerifyConfig(**given)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final summary line and errors")
    p.add_argument("-v", "--verbose", action="store_true", help="log each decision and show tracebacks")


def _compress_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Factorize the constant weights of an ONNX model's MatMul/Gemm/Conv nodes into low-rank pairs.",
        epilog="Subcommands: 'onnx-lowrank verify ORIGINAL COMPRESSED' compares two models; "
               "'onnx-lowrank bench MODEL [OTHER]' measures onnxruntime latency; "
               "'onnx-lowrank demo' runs the pass on a small model shipped with the package.",
    )
    p.add_argument("model", help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", metavar="OUT", help="output .onnx path (external data is written beside it)")
    _add_pass_options(p)
    out = p.add_argument_group("output")
    out.add_argument("--report", metavar="JSON", help="also write the report as JSON")
    out.add_argument("--dry-run", action="store_true", help="print the plan; write no model (only --report, if given)")
    _add_verify_options(p, "verification (runs before anything is written, when --verify or any of these is given)", run_settings=False)
    p.add_argument("--verify", action="store_true", help="compare with the original in onnxruntime (on random inputs unless --calib)")
    _add_common(p)
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


_CONFIG_FLAGS = ("energy", "rank", "rank_multiple", "min_params", "include", "exclude", "op_types", "conv_mode",
                 "allow_input_weights", "rank_rule", "target_params", "target_macs", "budget_scope", "data_aware", "attention_aware", "damping",
                 "calib_mask", "adaptive", "adaptive_samples", "refine", "latency_aware", "threads", "batch", "input_shape", "min_speedup", "quantize")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "adaptive", None):
        # one --max-drop and one --metric: the goal of the search and the verification gate
        out.update({k: getattr(args, k) for k in ("max_drop", "metric") if getattr(args, k, None) is not None})
    return out


class _ProgressBar:
    """A one-line progress bar on stderr; silent unless stderr is a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.shown = False

    def __call__(self, done: int, total: int, label: str) -> None:
        if not self.enabled or total <= 0:
            return
        width = 24
        filled = int(width * done / total)
        label = label if len(label) <= 40 else "..." + label[-37:]
        sys.stderr.write(f"\rworking [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<40}")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


def _print(*parts: str) -> None:
    print(*parts, file=sys.stdout)


def _warn(lines: Sequence[str]) -> None:
    for line in lines:
        print(f"{PROG}: warning: {line}", file=sys.stderr)


def _run_compress(argv: Sequence[str]) -> int:
    from .api import compress
    from .errors import VerificationFailed
    from .io import check_input_path, check_output_path
    from .report import render_sections, render_table, render_totals
    from .verify import render_verification

    args = _compress_parser().parse_args(argv)
    _setup_logging(args)
    verify = _verify_config(args)
    check_input_path(args.model)
    if not args.dry_run:
        if not args.output:
            raise UsageError("missing -o/--output; pass -o small.onnx (or --dry-run to only print the plan).")
        check_output_path(args.output, args.model)
        if args.report:
            check_output_path(args.report, args.model, flag="--report", keep=(args.output,))
    bar = _ProgressBar(enabled=not args.quiet)
    try:
        result = compress(args.model, recipe=args.recipe, dry_run=args.dry_run, progress=bar, verify=verify,
                          calib=args.calib, calib_script=args.calib_script, labels=args.labels,
                          calib_batch=args.calib_batch or 32, **_overrides(args))
    except VerificationFailed as exc:
        refused = exc.result
        if refused is not None and not args.quiet:
            _print(render_table(refused.layers))
            _print("")
            _print(render_totals(refused.totals))
            if refused.sections:
                _print(render_sections(refused.sections))
            _print("")
            _print(render_verification(exc.report))
        _warn(exc.report.warnings)
        raise VerificationFailed(f"{exc}; nothing written (pass --keep-failed to write it anyway)", report=exc.report, result=refused) from None
    finally:
        bar.close()
    if args.dry_run and args.report:
        check_output_path(args.report, args.model, flag="--report")
    written = [] if args.dry_run else result.save(args.output, report=args.report)
    check = result.verification
    if not args.quiet:
        _print(render_table(result.layers))
        _print("")
        _print(render_totals(result.totals))
        if result.sections:
            _print(render_sections(result.sections))
        if check is not None:
            _print("")
            _print(render_verification(check))
        elif not args.dry_run:
            _print("")
            _print("not verified: add --calib data.npz (or --verify for random inputs) to compare with the original in onnxruntime")
    if check is not None:
        _warn(check.warnings)
        if (args.data_aware or args.adaptive or args.refine) and not check.synthetic:
            _warn(["the check ran on the calibration data the ranks were chosen from (or the factors refitted on); measure held-out data with "
                   f"'{PROG} verify {args.model} {args.output or 'OUT'} --calib HELDOUT'"])
    if args.dry_run:
        if args.report:
            result.write_report(args.report)
        _print(f"dry run: {result.totals.factorized} layer(s) would be factorized; "
               + (f"wrote only the plan to {args.report}." if args.report else "nothing written."))
        return 0
    files = " + ".join(str(p) for p in written)
    _print(f"wrote {files}" + (f" and report {args.report}" if args.report else "")
           + (f"; check {'passed' if check.passed else 'FAILED'}: {check.summary()}" if check is not None else ""))
    if check is not None and not check.passed:
        raise VerificationFailed(f"check failed: {check.summary()}; wrote the model anyway (--keep-failed)", report=check, result=result)
    return 0


def _run_verify(argv: Sequence[str]) -> int:
    from .io import check_input_path, check_output_path, write_text
    from .report import dumps
    from .verify import render_verification, verify_models

    p = _Parser(prog=f"{PROG} verify", description="Compare two models in onnxruntime on the same data; exit 1 when --max-drop is exceeded.")
    p.add_argument("original", help="the reference .onnx model")
    p.add_argument("compressed", help="the .onnx model to check (same inputs and outputs)")
    _add_verify_options(p, "data and gate")
    p.add_argument("--report", metavar="JSON", help="also write the measured numbers as JSON (written on failure too)")
    _add_common(p)
    args = p.parse_args(argv)
    _setup_logging(args)
    if args.keep_failed:
        raise UsageError("--keep-failed applies to the main command, which writes a model; 'verify' writes none.")
    for path in (args.original, args.compressed):
        check_input_path(path)
    if args.report:
        check_output_path(args.report, args.original, flag="--report", keep=(args.compressed,))
    report = verify_models(args.original, args.compressed, _verify_config(args, always=True))
    if not args.quiet:
        _print(render_verification(report))
    _warn(report.warnings)
    if args.report:
        write_text(args.report, dumps({"verification": report.to_dict()}) + "\n")
    _print(f"check {'passed' if report.passed else 'FAILED'}: {report.summary()}")
    report.check()
    return 0


def _run_demo(argv: Sequence[str]) -> int:
    from .demo import run_demo

    p = _Parser(prog=f"{PROG} demo", description="Compress a small real model shipped with the package and check it on held-out digits.")
    p.add_argument("-o", "--output", metavar="OUT", default="digits_mlp.lowrank.onnx", help="where to write the result (default: %(default)s)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--energy", type=_energy, metavar="E", default=None, help="energy threshold (default 0.93)")
    rule.add_argument("--rank", type=_positive_int("--rank"), metavar="N", help="fixed rank for every layer")
    _add_common(p)
    args = p.parse_args(argv)
    _setup_logging(args)
    return run_demo(args.output, energy=args.energy, rank=args.rank, quiet=args.quiet, echo=_print)


def _bench_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"{PROG} bench",
        description="Measure onnxruntime CPU latency of a model, or of two models run interleaved (A B, B A, ...) "
                    "with the speed-up per pair of runs.",
    )
    p.add_argument("model", help="the .onnx model (the baseline when two are given)")
    p.add_argument("other", nargs="?", help="a second model to compare, e.g. the compressed one")
    p.add_argument("--threads", type=_int_list("--threads"), default=(1,), metavar="LIST",
                   help="intra-op thread counts, comma-separated (default 1)")
    p.add_argument("--batch", type=_int_list("--batch"), default=None, metavar="LIST",
                   help="sizes of the dynamic first axis, comma-separated (default: from --input-shape, else 1)")
    p.add_argument("--input-shape", action="append", default=None, metavar="NAME:DIMS",
                   help="shape of an input with dynamic axes, e.g. input_ids:1x128 (comma-separated, repeatable)")
    p.add_argument("--runs", type=_positive_int("--runs"), default=100, metavar="N", help="timed runs per model (default 100)")
    p.add_argument("--warmup", type=_non_negative_int, default=10, metavar="N", help="untimed runs first (default 10)")
    p.add_argument("--profile", action="store_true", help="also show per-op and per-layer times from onnxruntime's profiler")
    p.add_argument("--top", type=_positive_int("--top"), default=8, metavar="N", help="rows of the profile tables (default 8)")
    p.add_argument("--json", metavar="OUT", help="also write the measurements as JSON")
    _add_common(p)
    return p


def _run_bench(argv: Sequence[str]) -> int:
    from .bench import bench, render_report
    from .io import check_input_path, check_output_path, write_text

    args = _bench_parser().parse_args(argv)
    _setup_logging(args)
    paths = [args.model] + ([args.other] if args.other else [])
    for path in paths:
        check_input_path(path)
    if args.json:
        check_output_path(args.json, args.model, flag="--json", keep=tuple(p for p in (args.other,) if p))
    report = bench(paths, threads=args.threads, batch=args.batch, input_shape=args.input_shape, runs=args.runs,
                   warmup=args.warmup, profile=args.profile)
    if args.json:
        write_text(args.json, report.to_json() + "\n")
    if args.quiet:
        for s in report.settings:
            if s.speedup is not None:
                _print(f"threads {s.threads} batch {s.batch if s.batch is not None else '-'}: x{s.speedup:.2f}")
            else:
                _print(f"threads {s.threads} batch {s.batch if s.batch is not None else '-'}: p50 {s.timings[0].stats.p50_ms:.3f} ms")
    else:
        _print(render_report(report, top=args.top))
        if args.json:
            _print(f"wrote {args.json}")
    return 0


def _setup_logging(args: argparse.Namespace) -> None:
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``onnx-lowrank``; returns the exit code."""
    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    previous = None
    try:
        if threading_main():
            # SIGTERM raises like Ctrl-C does, so that temporary files are removed on the way out
            previous = signal.signal(signal.SIGTERM, _terminate)
        with flag_names():
            if argv and argv[0] == "demo":
                return _run_demo(argv[1:])
            if argv and argv[0] == "verify":
                return _run_verify(argv[1:])
            if argv and argv[0] == "bench":
                return _run_bench(argv[1:])
            return _run_compress(argv)
    except LowRankError as exc:
        if verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        written = getattr(exc, "written", [])
        signum = getattr(exc, "signum", signal.SIGINT)
        if written:
            print(f"{PROG}: interrupted after writing {' + '.join(str(p) for p in written)}, which are complete.", file=sys.stderr)
        else:
            print(f"{PROG}: interrupted; nothing was written.", file=sys.stderr)
        return 128 + int(signum)
    except Exception as exc:  # a bug or an unexpected model: one line unless --verbose
        if verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {type(exc).__name__}: {exc} (run with --verbose for the traceback)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _terminate(signum: int, frame: Any) -> None:
    raise Interrupted(signum)
