"""Byte-level fuzzing of model files through ``compress(path)`` and the CLI, shared by
tests/test_fuzz.py and benchmarks/fuzz_campaign.py.

A mutant is a valid small model file (plain, with external data, with a Constant node, with an If
body) whose bytes were flipped, overwritten, inserted, deleted, duplicated or truncated; sometimes
its external data file is damaged instead.  What must hold for every mutant:

* ``compress(path)`` succeeds or raises an ``onnx_lowrank.LowRankError`` (so does ``save``), but not
  the pipeline's ``StageError``, which wraps an unexpected exception of a stage;
* the CLI returns 0, 1 or 2 and writes at most one line to stderr, starting with ``onnx-lowrank:``,
  never a traceback, and never its catch-all for unexpected exceptions ("run with --verbose");
* on a non-zero return the output folder is empty: no model, no ``*.data``, no hidden temp file;
* the input files are byte-for-byte unchanged;
* the CLI and the API agree (the CLI writes a model exactly when the API could);
* when the checker accepts the mutant, it accepts the output too.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from strategies import mutate, seed_models

__all__ = ["seed_files", "Mutant", "make_mutant", "check_mutant", "run_cli", "Outcome", "CATCH_ALL", "INTERNAL", "is_internal_error"]

#: What the CLI prints when an exception that is not a LowRankError reached it.
CATCH_ALL = "(run with --verbose for the traceback)"

#: How the pipeline words an unexpected exception inside a stage, which it re-raises as a
#: ``StageError`` (a ``ModelError``): a clean-looking error that is really an internal one.
INTERNAL = re.compile(r"stage '[^']+' failed: \w+")


def is_internal_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the pipeline's wrapper around an unexpected exception (``StageError``)."""
    return type(exc).__name__ == "StageError" or bool(INTERNAL.search(str(exc)))

MODEL = "model.onnx"
DATA = "weights.bin"


def seed_files(models: dict[str, onnx.ModelProto] | None = None, tmp: Path | None = None) -> dict[str, dict[str, bytes]]:
    """Each seed model as the files it is saved to: ``{name: {filename: bytes}}``.

    ``name:external`` variants keep every tensor (Constant values too) in ``weights.bin``.
    """
    import tempfile

    models = seed_models() if models is None else models
    out: dict[str, dict[str, bytes]] = {}
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        for name, model in models.items():
            out[name] = {MODEL: model.SerializeToString()}
            ext = onnx.ModelProto()
            ext.CopyFrom(model)
            if ext.ir_version < 4:
                continue
            folder = Path(d) / name
            folder.mkdir()
            onnx.save_model(ext, str(folder / MODEL), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=DATA, size_threshold=0, convert_attribute=True)
            out[f"{name}:external"] = {p.name: p.read_bytes() for p in folder.iterdir()}
    return out


@dataclass
class Mutant:
    seed: str
    how: str
    files: dict[str, bytes]


def make_mutant(rng: random.Random, seeds: dict[str, dict[str, bytes]]) -> Mutant:
    name = rng.choice(sorted(seeds))
    files = dict(seeds[name])
    hows = []
    if DATA in files and rng.random() < 0.25:
        files[DATA], how = mutate(rng, files[DATA])
        hows.append(f"data:{how}")
    if not hows or rng.random() < 0.3:
        files[MODEL], how = mutate(rng, files[MODEL])
        hows.append(f"model:{how}")
    return Mutant(name, ", ".join(hows), files)


@dataclass
class Outcome:
    """What happened to one mutant."""

    api: str  # "ok" or the LowRankError subclass name (or "UNEXPECTED <class>")
    cli_rc: int | None = None
    problems: list[str] = field(default_factory=list)
    compressed: bool = False  # the API returned a result with a factorized layer


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_cli(argv: list[str]) -> tuple[int, str, str, str | None]:
    """``main(argv)`` in-process as a user's shell would see it: ``(rc, stdout, stderr, problem)``.

    Warnings use Python's default filters and print to stderr, as in a fresh process (pytest
    would otherwise record them instead).  ``problem`` says what escaped ``main``, if anything.
    """
    from onnx_lowrank.cli import main

    err, std = io.StringIO(), io.StringIO()
    problem = None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std), warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse exits; it should not for these arguments
            rc = exc.code if isinstance(exc.code, int) else -1
            problem = f"CLI raised SystemExit({exc.code!r})"
        except BaseException as exc:  # noqa: BLE001
            rc = -1
            problem = f"CLI raised {type(exc).__name__}: {exc}"
    return rc, std.getvalue(), err.getvalue(), problem


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _checker_accepts(path: Path) -> bool:
    try:
        onnx.checker.check_model(str(path), full_check=True)
        return True
    except Exception:
        return False


def check_mutant(work: Path, mutant: Mutant, *, checker: bool = True) -> Outcome:
    """Run one mutant through the API and the CLI in ``work`` (created, left behind)."""
    import onnx_lowrank as ol

    src, api_dir, cli_dir = work / "in", work / "api", work / "cli"
    for d in (src, api_dir, cli_dir):
        d.mkdir(parents=True)
    for name, data in mutant.files.items():
        (src / name).write_bytes(data)
    path = src / MODEL
    before = _digests(src)
    out = Outcome(api="ok")

    api_saved = False
    try:
        res = ol.compress(path, min_params=0)
        out.compressed = res.totals.factorized > 0
        res.save(api_dir / "o.onnx")
        api_saved = True
    except ol.LowRankError as exc:
        out.api = type(exc).__name__
        if is_internal_error(exc):
            cause = exc.__cause__
            out.problems.append(f"API raised {type(exc).__name__} wrapping {type(cause).__name__ if cause else '?'}: "
                                f"{str(exc).splitlines()[0][:200]}")
        if list(api_dir.iterdir()):
            out.problems.append(f"API: {type(exc).__name__} left files behind: {sorted(p.name for p in api_dir.iterdir())}")
    except Exception as exc:  # noqa: BLE001 - this is what the fuzz looks for
        out.api = f"UNEXPECTED {type(exc).__name__}"
        out.problems.append(f"API raised {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")

    rc, _, text, raised = run_cli([str(path), "-o", str(cli_dir / "o.onnx"), "--min-params", "0", "-q"])
    if raised:
        out.problems.append(raised)
    out.cli_rc = rc
    lines = text.splitlines()
    if rc not in (0, 1, 2):
        out.problems.append(f"CLI returned {rc}")
    if len(lines) > 1:
        out.problems.append(f"CLI printed {len(lines)} lines to stderr: {text[:300]!r}")
    if lines and not lines[0].startswith("onnx-lowrank:"):
        out.problems.append(f"CLI stderr does not start with 'onnx-lowrank:': {lines[0][:200]!r}")
    if "Traceback" in text:
        out.problems.append("CLI printed a traceback")
    if CATCH_ALL in text:
        out.problems.append(f"CLI hit its catch-all for unexpected exceptions: {text.strip()[:300]}")
    if INTERNAL.search(text):
        out.problems.append(f"CLI reported an internal error: {text.strip()[:300]}")
    left = sorted(p.name for p in cli_dir.iterdir())
    if rc != 0 and left:
        out.problems.append(f"CLI returned {rc} but left {left} in the output folder")
    if rc == 0 and "o.onnx" not in left:
        out.problems.append(f"CLI returned 0 but wrote no model (folder: {left})")
    if rc == 0 and any(n.startswith(".") for n in left):
        out.problems.append(f"CLI left hidden files: {left}")
    if (rc == 0) != api_saved and not out.api.startswith("UNEXPECTED"):
        out.problems.append(f"CLI returned {rc} but the API {'saved a model' if api_saved else 'raised ' + out.api}")
    after = _digests(src)
    if after != before:
        out.problems.append(f"input files changed: {sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))}")
    if checker and rc == 0 and _checker_accepts(path) and not _checker_accepts(cli_dir / "o.onnx"):
        try:
            onnx.checker.check_model(str(cli_dir / "o.onnx"), full_check=True)
        except Exception as exc:  # noqa: BLE001
            out.problems.append(f"the checker accepts the input but not the output: {str(exc).splitlines()[0][:200]}")
    return out
