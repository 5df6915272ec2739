"""Command line: argument parsing and printing only; the work is done by :func:`compress`.

    onnx-lowrank MODEL -o OUT [--energy E | --rank N] [--calib DATA --max-drop X] [options]
    onnx-lowrank verify ORIGINAL COMPRESSED [--calib DATA] [--max-drop X] [options]
    onnx-lowrank demo [-o OUT]

Exit codes: 0 done, 1 failure (unreadable model, failed check), 2 usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .errors import LowRankError, UsageError

PROG = "onnx-lowrank"
SUBCOMMANDS = ("demo", "verify")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def _energy(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got '{text}'; e.g. --energy 0.93") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text}; e.g. --energy 0.93")
    return value


def _positive_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}; e.g. {flag} 8")
        return value

    return parse


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got '{text}'; e.g. --max-drop 0.01 (one point)") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}; e.g. --max-drop 0.01 (one point)")
    return value


def _op_types(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _add_pass_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("rank selection (flags override --recipe)")
    rule = g.add_mutually_exclusive_group()
    rule.add_argument("--energy", type=_energy, metavar="E",
                      help="keep per layer the smallest rank holding this fraction of the squared singular values (default 0.95)")
    rule.add_argument("--rank", type=_positive_int("--rank"), metavar="N", help="fixed rank for every layer")
    g.add_argument("--rank-multiple", type=_positive_int("--rank-multiple"), metavar="K",
                   help="round ranks up to a multiple of K, never past break-even")
    g.add_argument("--recipe", metavar="NAME|FILE", help="a pass recipe: a shipped name (balanced, ...) or a TOML file")
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


def _add_verify_options(p: argparse.ArgumentParser, title: str) -> None:
    from .verify import METRICS

    g = p.add_argument_group(title)
    src = g.add_mutually_exclusive_group()
    src.add_argument("--calib", metavar="PATH", help="calibration data: an .npz (keys = input names, first axis = samples) or a directory of .npz files, one feed each")
    src.add_argument("--calib-script", metavar="FILE.py:FUNC", help="a function returning an iterable of feed dicts")
    g.add_argument("--calib-batch", type=_positive_int("--calib-batch"), metavar="N", help="samples per onnxruntime run when cutting an .npz (default 32)")
    g.add_argument("--labels", metavar="NPY", help="class ids, one per sample (else a 'labels' array in the .npz)")
    g.add_argument("--samples", type=_positive_int("--samples"), metavar="N", help="without --calib: random samples to compare on (default 32)")
    g.add_argument("--input-shape", action="append", metavar="NAME:DIMS", help="shape of a random input, e.g. input_ids:1x128 (repeatable, or comma-separated)")
    g.add_argument("--input-range", action="append", metavar="NAME:LOW,HIGH", help="values of a random input drawn from [LOW, HIGH), e.g. input_ids:0,30522")
    g.add_argument("--max-drop", type=_fraction, metavar="X", help="fail when the metric drops by more than X (a fraction: 0.01 is one point)")
    g.add_argument("--metric", choices=METRICS, help="what --max-drop is checked against (default: accuracy with labels, else top1 for outputs named like class scores, else cosine)")
    g.add_argument("--gate-output", metavar="NAME", help="judge only this model output (default: every output, the worst counts)")
    g.add_argument("--keep-failed", action="store_true", default=None, help="write the model even when the check fails (still exit 1)")
    g.add_argument("--threads", type=_positive_int("--threads"), metavar="N", help="onnxruntime intra-op threads (default: onnxruntime's choice)")


_VERIFY_FLAGS = ("calib", "calib_script", "calib_batch", "labels", "samples", "input_shape", "input_range", "max_drop", "metric",
                 "gate_output", "keep_failed", "threads")


def _verify_config(args: argparse.Namespace, *, always: bool = False):
    """A VerifyConfig from the flags given, or None when none was given (and ``always`` is off)."""
    from .verify import VerifyConfig

    given = {k: getattr(args, k) for k in _VERIFY_FLAGS if getattr(args, k, None) is not None}
    if not given and not always and not getattr(args, "verify", False):
        return None
    return VerifyConfig(**given)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="print only the final summary line and errors")
    p.add_argument("-v", "--verbose", action="store_true", help="log each decision and show tracebacks")


def _compress_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Factorize the constant weights of an ONNX model's MatMul/Gemm/Conv nodes into low-rank pairs.",
        epilog="Subcommands: 'onnx-lowrank verify ORIGINAL COMPRESSED' compares two models; "
               "'onnx-lowrank demo' runs the pass on a small model shipped with the package.",
    )
    p.add_argument("model", help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", metavar="OUT", help="output .onnx path (external data is written beside it)")
    _add_pass_options(p)
    out = p.add_argument_group("output")
    out.add_argument("--report", metavar="JSON", help="also write the report as JSON")
    out.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    _add_verify_options(p, "verification (runs before anything is written, when --verify or any of these is given)")
    p.add_argument("--verify", action="store_true", help="compare with the original in onnxruntime (on random inputs unless --calib)")
    _add_common(p)
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


_CONFIG_FLAGS = ("energy", "rank", "rank_multiple", "min_params", "include", "exclude", "op_types", "conv_mode",
                 "allow_input_weights")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k, None) is not None}


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
        sys.stderr.write(f"\rfactorizing [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<40}")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


def _print(*parts: str) -> None:
    print(*parts, file=sys.stdout)


def _write_report(path: str, doc_json: str) -> None:
    import os
    import tempfile

    target = Path(path)
    parent = target.resolve().parent
    if not parent.is_dir():
        raise UsageError(f"--report {path}: directory '{parent}' does not exist; create it first.")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(doc_json + "\n")
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _warn(lines: Sequence[str]) -> None:
    for line in lines:
        print(f"{PROG}: warning: {line}", file=sys.stderr)


def _run_compress(argv: Sequence[str]) -> int:
    from .api import compress
    from .errors import VerificationFailed
    from .io import check_input_path, check_output_path
    from .report import render_table, render_totals
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
            check_output_path(args.report, args.model)
    bar = _ProgressBar(enabled=not args.quiet)
    try:
        result = compress(args.model, recipe=args.recipe, dry_run=args.dry_run, progress=bar, verify=verify, **_overrides(args))
    except VerificationFailed as exc:
        refused = exc.result
        if refused is not None and not args.quiet:
            _print(render_table(refused.layers))
            _print("")
            _print(render_totals(refused.totals))
            _print("")
            _print(render_verification(exc.report))
        _warn(exc.report.warnings)
        raise VerificationFailed(f"{exc}; nothing written (pass --keep-failed to write it anyway)", report=exc.report, result=refused) from None
    finally:
        bar.close()
    written = [] if args.dry_run else result.save(args.output)
    check = result.verification
    if not args.quiet:
        _print(render_table(result.layers))
        _print("")
        _print(render_totals(result.totals))
        if check is not None:
            _print("")
            _print(render_verification(check))
        elif not args.dry_run:
            _print("")
            _print("not verified: add --calib data.npz (or --verify for random inputs) to compare with the original in onnxruntime")
    if check is not None:
        _warn(check.warnings)
    if args.dry_run:
        _print(f"dry run: {result.totals.factorized} layer(s) would be factorized; nothing written.")
        return 0
    if args.report:
        _write_report(args.report, result.to_json())
    files = " + ".join(str(p) for p in written)
    _print(f"wrote {files}" + (f" and report {args.report}" if args.report else "")
           + (f"; check {'passed' if check.passed else 'FAILED'}: {check.summary()}" if check is not None else ""))
    if check is not None and not check.passed:
        raise VerificationFailed(f"check failed: {check.summary()}; wrote the model anyway (--keep-failed)", report=check, result=result)
    return 0


def _run_verify(argv: Sequence[str]) -> int:
    from .io import check_input_path, check_output_path
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
        check_output_path(args.report, args.original)
    report = verify_models(args.original, args.compressed, _verify_config(args, always=True))
    if not args.quiet:
        _print(render_verification(report))
    _warn(report.warnings)
    if args.report:
        _write_report(args.report, dumps({"verification": report.to_dict()}))
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


def _setup_logging(args: argparse.Namespace) -> None:
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``onnx-lowrank``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        if argv and argv[0] == "demo":
            return _run_demo(argv[1:])
        if argv and argv[0] == "verify":
            return _run_verify(argv[1:])
        return _run_compress(argv)
    except LowRankError as exc:
        if verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unexpected model: one line unless --verbose
        if verbose:
            traceback.print_exc()
        print(f"{PROG}: error: {type(exc).__name__}: {exc} (run with --verbose for the traceback)", file=sys.stderr)
        return 1
