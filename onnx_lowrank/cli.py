"""Command line: argument parsing and printing only; the work is done by :func:`compress`.

    onnx-lowrank MODEL -o OUT [--energy E | --rank N] [--calib DATA --max-drop X] [options]
    onnx-lowrank verify ORIGINAL COMPRESSED [--calib DATA] [--max-drop X] [options]
    onnx-lowrank demo [-o OUT]
    onnx-lowrank bench MODEL [OTHER] [--threads 1,2] [--batch 1,64] [--input-shape NAME:1x128]

Exit codes: 0 done, 1 failure (unreadable model, failed check), 2 usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from typing import Any, Callable, Sequence

from . import __version__
from .errors import Interrupted, LowRankError, UsageError, flag_names

PROG = "onnx-lowrank"
SUBCOMMANDS = ("demo", "verify", "bench")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _CommandLineError(f"{message} (see {self.prog} --help)")


class _CommandLineError(UsageError):
    """A mistake in the command line itself: its traceback (argparse's) says nothing, even with --verbose."""


def _int_list(name: str) -> Callable[[str], tuple[int, ...]]:
    from .options import Opt, int_list

    return int_list(name, Opt("int_list", "", example=(1, 2)))


def _positive_int(flag: str, example: int = 8, *, low: int = 1) -> Callable[[str], int]:
    what = "a positive integer" if low == 1 else "a non-negative integer"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got '{text}'; e.g. {flag} {example}")
        return value

    return parse


def _pass_options(p: argparse.ArgumentParser) -> None:
    """Every option of the pass, a group per config section; ``--max-drop``/``--metric`` come
    with the verification flags (one flag each: they are the adaptive goal and the gate)."""
    from .config import SECTIONS
    from .options import add_arguments

    for k, section in enumerate(SECTIONS):
        add_arguments(p, dataclasses.fields(section), section.title, skip=("max_drop", "metric"))
        if k == 0:
            p.add_argument("--recipe", metavar="NAME|FILE", help="a pass recipe: a shipped name (balanced, ...) or a TOML file")


def _verify_options(p: argparse.ArgumentParser, title: str, *, skip: Sequence[str] = ()) -> None:
    from .options import add_arguments
    from .verify import VerifyConfig

    add_arguments(p, dataclasses.fields(VerifyConfig), title, skip=skip)


def _add_common(p: argparse.ArgumentParser) -> None:
    loud = p.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", help="print only the final summary line, warnings and errors")
    loud.add_argument("-v", "--verbose", action="store_true", help="log each decision and show tracebacks")


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
    _pass_options(p)
    out = p.add_argument_group("output")
    out.add_argument("--report", metavar="FILE", help="also write the report: Markdown for .md, the printed text for .txt, "
                                                    "JSON otherwise")
    out.add_argument("--dry-run", action="store_true", help="print the plan; write no model (only --report, if given)")
    _verify_options(p, "verification (runs before anything is written, when --verify or any of these is given)",
                    skip=("threads", "input_shape"))
    p.add_argument("--verify", action="store_true", help="compare with the original in onnxruntime (on random inputs unless --calib)")
    _add_common(p)
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class _ProgressBar:
    """Progress on stderr with the time left in the current step: a one-line bar on a terminal;
    elsewhere (a log) a plain line at most every ``every`` seconds, once a step has run long
    enough to be worth waiting on."""

    def __init__(self, enabled: bool, *, tty: bool | None = None, every: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.every, self.clock = every, clock
        self.shown = False
        self.step: tuple[int, int, float] | None = None  # (total, done at its first call, time of it)
        self.done = 0
        self.last_line = -float("inf")

    def left(self, done: int, total: int) -> float | None:
        """Seconds left in this step at the rate since its first call (``None`` before a rate)."""
        if self.step is None or done <= self.step[1]:
            return None
        _, first, start = self.step
        return (self.clock() - start) / (done - first) * (total - done)

    def __call__(self, done: int, total: int, label: str) -> None:
        if not self.enabled or total <= 0:
            return
        now = self.clock()
        if self.step is None or self.step[0] != total or done < self.done:  # a new step
            self.step = (total, done, now)
        self.done = done
        left = self.left(done, total)
        eta = f", about {_duration(left)} left" if left is not None and done < total else ""
        if self.tty:
            width = 24
            filled = int(width * done / total)
            label = label if len(label) <= 40 else "..." + label[-37:]
            sys.stderr.write(f"\rworking [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{eta} {label:<40}")
            sys.stderr.flush()
            self.shown = True
        elif eta and now - self.step[2] >= 30.0 and now - self.last_line >= self.every:
            sys.stderr.write(f"{PROG}: working {done}/{total}{eta} ({label})\n")
            sys.stderr.flush()
            self.last_line = now

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * 120 + "\r")
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
    from .verify import render_verification

    from .api import keywords

    args = _compress_parser().parse_args(argv)
    _setup_logging(args)
    options = keywords(vars(args), verify=args.verify, dry_run=args.dry_run)
    check_input_path(args.model)
    read = _files_read(args)
    if not args.dry_run:
        if not args.output:
            raise UsageError("missing -o/--output; pass -o small.onnx (or --dry-run to only print the plan).")
        check_output_path(args.output, args.model, keep=read)
        if args.report:
            check_output_path(args.report, args.model, flag="--report", keep=(args.output, *read))
    bar = _ProgressBar(enabled=not args.quiet)
    try:
        result = compress(args.model, recipe=args.recipe, dry_run=args.dry_run, progress=bar, **options)
    except VerificationFailed as exc:
        refused = exc.result
        if refused is not None and not args.quiet:
            _print(refused.render())  # (its verification is the refused check)
            if refused.verification is None:
                _print("")
                _print(render_verification(exc.report))
        _warn(exc.report.warnings)
        raise VerificationFailed(f"{exc}; nothing written (pass --keep-failed to write it anyway)", report=exc.report, result=refused) from None
    finally:
        bar.close()
    if args.dry_run and args.report:
        check_output_path(args.report, args.model, flag="--report", keep=read)
    written = [] if args.dry_run else result.save(args.output, report=args.report)
    check = result.verification
    if not args.quiet:
        _print(result.render())
        if check is None and not args.dry_run:
            _print("")
            _print("not verified: add --calib data.npz (or --verify for random inputs) to compare with the original in onnxruntime")
    if check is not None:
        _warn(check.warnings)
        if (args.data_aware or args.adaptive or args.refine or args.ffn_keep is not None) and not check.synthetic:
            _warn(["the check ran on the calibration data the compression was fitted to (ranks chosen, factors or feed-forward "
                   f"blocks refitted); measure held-out data with '{PROG} verify {args.model} {args.output or 'OUT'} --calib HELDOUT'"])
    if args.dry_run:
        if args.report:
            result.write_report(args.report)
        narrowed = f", {result.totals.narrowed} narrowed (feed-forward width)" if result.totals.narrowed else ""
        _print(f"dry run: {result.totals.factorized} layer(s) would be factorized{narrowed}; "
               + (f"wrote only the plan to {args.report}." if args.report else "nothing written."))
        return 0
    files = " + ".join(str(p) for p in written)
    _print(f"wrote {files}" + (f" and report {args.report}" if args.report else "")
           + (f"; check {'passed' if check.passed else 'FAILED'}: {check.summary()}" if check is not None else ""))
    if check is not None and not check.passed:
        raise VerificationFailed(f"check failed: {check.summary()}; wrote the model anyway (--keep-failed)", report=check, result=result)
    return 0


def _files_read(args: argparse.Namespace) -> tuple[Path, ...]:
    """The files a command reads besides the model (calibration data, labels, a script, a
    recipe): no output may replace them."""
    out: list[Path] = []
    for name in ("calib", "labels", "calib_script", "recipe"):
        value = getattr(args, name, None)
        if isinstance(value, str) and value:
            path = Path(value)
            if not path.exists() and ":" in value:  # a script given as FILE:FUNCTION
                path = Path(value.rsplit(":", 1)[0])
            out.extend(sorted(path.glob("*.npz")) if path.is_dir() else [path])
    return tuple(out)


def _run_verify(argv: Sequence[str]) -> int:
    from .io import check_input_path, check_output_path, external_files, write_text
    from .report import dumps
    from .verify import VerifyConfig, render_verification, verify_models

    p = _Parser(prog=f"{PROG} verify", description="Compare two models in onnxruntime on the same data; exit 1 when --max-drop is exceeded.")
    p.add_argument("original", help="the reference .onnx model")
    p.add_argument("compressed", help="the .onnx model to check (same inputs and outputs)")
    _verify_options(p, "data and gate", skip=("keep_failed",))
    p.add_argument("--keep-failed", action="store_true", help=argparse.SUPPRESS)  # (refused below in one line)
    p.add_argument("--report", metavar="JSON", help="also write the measured numbers as JSON (written on failure too)")
    _add_common(p)
    args = p.parse_args(argv)
    _setup_logging(args)
    if args.keep_failed:
        raise UsageError("--keep-failed applies to the main command, which writes a model; 'verify' writes none.")
    for path in (args.original, args.compressed):
        check_input_path(path)
    if args.report:
        check_output_path(args.report, args.original, flag="--report",
                          keep=(args.compressed, *external_files(args.compressed), *_files_read(args)))
    fields = {f.name for f in dataclasses.fields(VerifyConfig)}
    report = verify_models(args.original, args.compressed, VerifyConfig(**{k: v for k, v in vars(args).items()
                                                                           if v is not None and k in fields}))
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
    from .config import RankRule
    from .options import add_arguments

    add_arguments(p, [f for f in dataclasses.fields(RankRule) if f.name in ("energy", "rank")], "rank (default: --energy 0.93)")
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
    p.add_argument("--threads", type=_int_list("threads"), default=(1,), metavar="LIST",
                   help="intra-op thread counts, comma-separated (default 1)")
    p.add_argument("--batch", type=_int_list("batch"), default=None, metavar="LIST",
                   help="sizes of the dynamic first axis, comma-separated (default: from --input-shape, else 1)")
    p.add_argument("--input-shape", action="append", default=None, metavar="NAME:DIMS",
                   help="shape of an input with dynamic axes, e.g. input_ids:1x128 (comma-separated, repeatable)")
    p.add_argument("--runs", type=_positive_int("--runs"), default=100, metavar="N", help="timed runs per model (default 100)")
    p.add_argument("--warmup", type=_positive_int("--warmup", 10, low=0), default=10, metavar="N", help="untimed runs first (default 10)")
    p.add_argument("--profile", action="store_true", help="also show per-op and per-layer times from onnxruntime's profiler")
    p.add_argument("--top", type=_positive_int("--top"), default=8, metavar="N", help="rows of the profile tables (default 8)")
    p.add_argument("--json", metavar="OUT", help="also write the measurements as JSON")
    _add_common(p)
    return p


def _run_bench(argv: Sequence[str]) -> int:
    from .bench import bench, render_report
    from .io import check_input_path, check_output_path, external_files, write_text

    args = _bench_parser().parse_args(argv)
    _setup_logging(args)
    paths = [args.model] + ([args.other] if args.other else [])
    for path in paths:
        check_input_path(path)
    if args.json:
        check_output_path(args.json, args.model, flag="--json", keep=(args.other, *external_files(args.other)) if args.other else ())
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
    # Python warnings (numpy's among them) go to the log: stderr holds one line unless --verbose.
    verbose = bool(getattr(args, "verbose", False))
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.propagate = verbose
    if not warnings_log.handlers:
        warnings_log.addHandler(logging.NullHandler())
    package = logging.getLogger("onnx_lowrank")
    ours = [h for h in package.handlers if isinstance(h, _WarningLines)]
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        for h in ours:  # the records reach stderr through the root logger's handler instead
            package.removeHandler(h)
    elif not ours:  # the package's warnings, one line each (its logger otherwise has only a NullHandler)
        package.addHandler(_WarningLines())


class _WarningLines(logging.Handler):
    """Warnings of the package as ``onnx-lowrank: warning: ...`` on the current ``sys.stderr``."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{PROG}: warning: {record.getMessage()}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``onnx-lowrank``; returns the exit code."""
    import signal

    command_line = argv is None
    if command_line:
        # multiprocessing's resource tracker (a process of its own, started with this process's
        # -W options) warns of the worker pool's semaphores after an interrupt ends the run with
        # os._exit below; it removes them all the same, so its warning is only noise after our line
        sys.warnoptions.append("ignore:resource_tracker:UserWarning")
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
        if verbose and not isinstance(exc, _CommandLineError):
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
        from .runtime.executor import worker_processes_started

        if command_line and worker_processes_started():
            # (the command line: everything is cleaned up and said; the interpreter's exit would
            # wait on the stopped worker pool's threads, which may never return)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + int(signum))
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
