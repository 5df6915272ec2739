"""``compress()``: the one facade; the CLI is a thin shell over it.

``compress()`` validates the request and runs the stages of :mod:`onnx_lowrank.passes` (load,
discover, decide, rewrite, verify, ...); :meth:`CompressResult.save` writes the model, its data
and the report all or nothing.  Verification runs only when asked for (``verify=``); it compares
the rewritten model with the original in onnxruntime before anything is handed over, and a
failed gate raises :class:`~onnx_lowrank.errors.VerificationFailed` so that a refused model
cannot be saved by mistake.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import onnx

from . import io, pipeline
from .calibration import reads_once
from .config import CompressConfig, load_recipe
from .errors import UsageError, option, option_style
from .pipeline import Progress
from .report import LayerDecision, Totals, to_json_dict
from .verify import VerifyConfig, VerifyReport, calib_rules

if TYPE_CHECKING:
    from .passes.latency import LatencyProbe

__all__ = ["compress", "CompressResult", "Progress"]

log = logging.getLogger(__name__)

from .passes.report import METADATA_KEY  # noqa: E402,F401  (re-exported; the one definition)


@dataclass
class CompressResult:
    """The compressed model and everything the pass decided.

    Attributes:
        model: The compressed model.  Tensors kept in external data files still point there
            (:attr:`data`); :meth:`save` writes a complete copy.
        layers: One decision per MatMul/Gemm/Conv node, in graph order.
        totals: Parameters, MACs and file sizes before and after.
        config: The configuration used.
        data: Where :attr:`model`'s external data resolves (the input's folder, and the spill
            file the factors of a model with external data went to).
        dry_run: True when the model was planned but not rewritten.
        verification: What the onnxruntime check measured, when ``verify=`` was given.
        sections: Each stage's numbers for the report (``data_aware``, ``adaptive``, ``refine``,
            ``latency``, ``quantize``), by name.
        source_path: The input model's file, when it was given as a path (never overwritten).
        source_external: Whether the input kept tensors in external data files; :meth:`save`
            then writes the output's data outside too.
        seconds: Wall time of each stage that ran.
        warnings: What the pass warned about while it ran, from the calling thread and the pass's
            task threads (the lines the command line prints as warnings; the check's own are in
            ``verification.warnings``), for a caller that has not set up logging.
    """

    model: onnx.ModelProto
    layers: list[LayerDecision]
    totals: Totals
    config: CompressConfig
    data: io.DataFiles = field(default_factory=io.DataFiles)
    dry_run: bool = False
    verification: VerifyReport | None = None
    sections: dict[str, Any] = field(default_factory=dict)
    source_path: Path | None = None
    source_external: bool = False
    source_files: tuple[Path, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, ctx: pipeline.Context) -> "CompressResult":
        """The result of a finished pipeline."""
        from .passes.latency import ModelTimed
        from .passes.load import Loaded
        from .passes.report import Reported
        from .passes.verify import Verified

        loaded, reported = ctx.need(Loaded), ctx.need(Reported)
        sections = dict(pipeline.sections(ctx))
        sections.pop("verification", None)
        timed = ctx.get(ModelTimed)
        if timed is not None and timed.undone and "quantize" in sections:
            # the undone factorization leaves no factor to quantize
            sections["quantize"] = {**sections["quantize"], "factors": 0, "factors_quantized": 0, "unquantized_factors": []}
        verified = ctx.get(Verified)
        return cls(model=ctx.model, layers=reported.layers, totals=reported.totals, config=ctx.config, data=ctx.data,
                   dry_run=ctx.request.dry_run, verification=verified.report if verified else None, sections=sections,
                   source_path=loaded.path, source_external=loaded.external, source_files=loaded.files, seconds=dict(ctx.seconds))

    @property
    def modified(self) -> bool:
        return self.totals.factorized > 0 or self.totals.narrowed > 0

    @property
    def source_dir(self) -> Path | None:
        """The folder the input's external data resolves against."""
        return self.data.base_dir

    def save(self, path: str | os.PathLike, *, external: bool | None = None,
             report: str | os.PathLike | None = None) -> list[Path]:
        """Write the model to ``path``, its data file and the JSON report with it, all or nothing.

        The data file is ``OUT.onnx.<hash>.data``, named after its content; an earlier output
        at ``path`` is replaced whole, its data file included (``docs/safety.md``).

        Args:
            path: The ``.onnx`` file to write.
            external: Force external data on or off (default: on when the input had it or the
                model would pass 2 GiB).
            report: Also write :meth:`to_json` here, in the same commit.

        Returns:
            The model files written: the model, then its data file when there is one.
        """
        if self.dry_run:
            raise UsageError("this result is a dry run; nothing to save (run without dry_run=True).")
        path_flag = "-o" if option_style() == "flag" else "path"
        for what, value in ((path_flag, path), (option("report"), report)):
            if not isinstance(value, (str, os.PathLike)) and (value is not None or what == path_flag):
                raise UsageError(f"save() takes a file path for {what} (a str or os.PathLike), got {value!r}.")
        protect = self.source_files
        io.check_output_path(path, self.source_path, flag=path_flag, input_files=protect)
        if report is not None:
            io.check_output_path(report, self.source_path, flag=option("report"), keep=(path,), input_files=protect)
        if external is None and self.source_external:
            external = True  # the input kept its data outside; so does the output, even if every external tensor was factorized
        with io.terminate_raises(), io.OutputSet() as files:
            written = io.stage_model(files, self.model, path, data=self.data, external=external, protect=protect)
            self.totals.size_after = sum(files.staged_size(p) for p in written)
            clash = next((p for p in written if report is not None and Path(report).resolve() == p.resolve()), None)
            if clash is not None:  # (a data file is named after its content: known only now)
                raise UsageError(f"{option('report')} {report}: is the data file of the model being written; choose a "
                                 f"different {option('report')}; nothing was written.")
            if report is not None:
                text = self.report_text(report)
                files.stage(report, lambda f: f.write(text.encode("utf-8")))
            files.commit_reporting(written + ([Path(report)] if report is not None else []))
        return written

    def write_report(self, path: str | os.PathLike) -> Path:
        """Write :meth:`report_text` to ``path`` alone (a dry run's plan), all or nothing."""
        if not isinstance(path, (str, os.PathLike)):
            raise UsageError(f"write_report() takes a file path (a str or os.PathLike), got {path!r}.")
        io.check_output_path(path, self.source_path, flag=option("report"))
        return io.write_text(path, self.report_text(path))

    def render(self) -> str:
        """The report as the command line prints it: the layer table, the totals, each stage's
        numbers and the check."""
        from .report import render_sections, render_table, render_totals
        from .verify import render_verification

        parts = [render_table(self.layers), "", render_totals(self.totals)]
        if self.sections:
            parts.append(render_sections(self.sections))
        if self.verification is not None:
            parts += ["", render_verification(self.verification)]
        return "\n".join(parts)

    def report_text(self, path: str | os.PathLike) -> str:
        """The report in the form ``path``'s suffix names: ``.md`` Markdown (the printed report
        in a text block), ``.txt`` the printed report, anything else JSON (:meth:`to_json`)."""
        suffix = Path(path).suffix.lower()
        if suffix not in (".md", ".markdown", ".txt"):
            return self.to_json() + "\n"
        if suffix == ".txt":
            return self.render() + "\n"
        source = f"`{self.source_path.name}`" if self.source_path is not None else "an in-memory model"
        what = "plan (dry run)" if self.dry_run else "report"
        defaults = CompressConfig().to_dict(results_only=True)
        changed = {k: v for k, v in self.config.to_dict(results_only=True).items() if v != defaults.get(k)}
        return (f"# onnx-lowrank {what}: {source}\n\nOptions other than the defaults: `{json.dumps(changed, sort_keys=True)}`"
                f"\n\n```text\n{self.render()}\n```\n")

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data: layers, totals, config, and each stage's section once."""
        sections = dict(self.sections)
        if self.verification is not None:
            sections["verification"] = self.verification.to_dict()
        if self.warnings:
            sections["warnings"] = list(self.warnings)
        return to_json_dict(self.layers, self.totals, config=self.config.to_dict(), dry_run=self.dry_run, **sections)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def _resolve_config(config: CompressConfig | None, recipe: str | os.PathLike | None, overrides: dict[str, Any]) -> CompressConfig:
    if config is not None and not isinstance(config, CompressConfig):
        hint = (f"recipe={config!r}" if isinstance(config, (str, os.PathLike)) else
                "the options as keywords (compress(model, energy=0.9)) or CompressConfig(**options)")
        raise UsageError(f"config= takes a CompressConfig, got a {type(config).__name__}; pass {hint}.")
    base: dict[str, Any] = {}
    if recipe is not None:
        base.update(load_recipe(recipe))
        # what the caller gives overrides the recipe, with the recipe keys that only go with what it replaced
        groups = {f.name: f.metadata["opt"].exclusive for f in CompressConfig.fields() if f.metadata["opt"].exclusive}
        for name in overrides:
            for other in [k for k in base if k != name and name in groups and groups.get(k) == groups[name]]:
                base.pop(other)  # (--rank on the command line replaces the recipe's energy)
        if overrides.get("quantize", "int4") != "int4":
            for key in [k for k in base if k.startswith("int4_")]:
                base.pop(key)
    if config is not None:
        if base:
            raise UsageError(f"pass either config= or {option('recipe')}=, not both.")
        cfg = config
    else:
        cfg = CompressConfig.from_mapping(base, source=f"{option('recipe')} {recipe}") if base else CompressConfig()
    known = {f.name for f in CompressConfig.fields()}
    unknown = sorted(set(overrides) - known)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"; did you mean {close[0]}=?" if close else f"; the options are {', '.join(sorted(known))}."
        raise UsageError(f"compress() got an unknown option {unknown[0]}={overrides[unknown[0]]!r}{hint}")
    return cfg.replace(**overrides) if overrides else cfg


def compress(
    model: str | os.PathLike | onnx.ModelProto,
    config: CompressConfig | None = None,
    *,
    recipe: str | os.PathLike | None = None,
    dry_run: bool = False,
    base_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
    calib: Any = None,
    labels: Any = None,
    calib_batch: int = 32,
    calib_script: str | None = None,
    verify: VerifyConfig | Mapping[str, Any] | None = None,
    probe: "LatencyProbe | None" = None,
    **options: Any,
) -> CompressResult:
    """Factorize the constant weights of a model's MatMul/Gemm/Conv nodes.

    Args:
        model: A path to an ``.onnx`` file, or an ``onnx.ModelProto`` (left unmodified).  An
            ``onnx_graphsurgeon.Graph`` (left unmodified) gives a result whose ``model`` is the
            compressed graph (:mod:`onnx_lowrank.integrations.graphsurgeon`).
        config: A :class:`CompressConfig`; its fields can also be given as keywords
            (``energy=0.93``), which override the config or recipe.
        recipe: A recipe name (``"balanced"``) or TOML path, as with ``--recipe``.
        dry_run: Decide ranks but leave the model as it is.
        base_dir: Where external data of an in-memory ``model`` lives.
        progress: Called as ``progress(done, total, label)`` after each SVD, calibration batch
            and sensitivity measurement.
        calib: Calibration data for ``data_aware``, ``adaptive``, ``refine`` and ``ffn_keep``, in
            any form :func:`onnx_lowrank.calibration.load_calibration` takes: an ``.npz`` path or
            a folder of them, a ``CalibrationDataReader``, an iterable of feed dicts, or arrays.
            Given when none of them reads it (and no ``verify=``), the result is checked on it,
            as ``--calib`` alone does on the command line.
        labels: Class ids of the calibration samples (overrides an ``.npz``'s ``labels``);
            with them adaptive mode bounds the accuracy drop.
        calib_batch: Samples per onnxruntime run when cutting an ``.npz``.
        calib_script: ``file.py:func`` returning an iterable of feed dicts, instead of ``calib``.
        verify: Check the rewritten model against the original in onnxruntime: a
            :class:`~onnx_lowrank.verify.VerifyConfig` or a dict of its fields
            (``{"calib": "data.npz", "max_drop": 0.01}``).  ``None`` skips the check.  Without
            data of its own it checks on ``calib`` (unless that can be read only once).
        probe: What latency-aware mode measures with (default: onnxruntime micro-benchmarks,
            cached under :func:`onnx_lowrank.passes.latency.default_cache_dir`).

    Returns:
        A :class:`CompressResult`; ``result.verification`` holds the check's numbers.

    Raises:
        UsageError: bad option values or paths (also ``verify`` with ``dry_run``).
        ModelError: the model cannot be read or rewritten.
        CalibrationError: the calibration data does not fit the model.
        VerificationFailed: the gate failed and ``keep_failed`` is off; the exception carries
            ``.report`` and the refused ``.result``.
    """
    from .integrations import graphsurgeon

    if graphsurgeon.is_graph(model):  # the same type back: result.model is a gs.Graph
        return graphsurgeon.compress_graph(model, config, recipe=recipe, dry_run=dry_run, base_dir=base_dir, progress=progress,
                                           calib=calib, labels=labels, calib_batch=calib_batch, calib_script=calib_script,
                                           verify=verify, probe=probe, **options)
    if base_dir is not None and not isinstance(base_dir, (str, os.PathLike)):
        raise UsageError(f"base_dir= takes the folder the model's external data is in (a str or os.PathLike), got {base_dir!r}.")
    cfg, check = _resolve_config(config, recipe, options), _resolve_verify(verify)
    calib_rules(calib, calib_script, calib_batch)
    read = cfg.data_aware or cfg.adaptive or cfg.refine or cfg.ffn_keep is not None
    if check is None and not read and not dry_run and (calib is not None or calib_script is not None):
        # nothing else reads the data: it is the check's, as --calib alone is on the command line
        check = VerifyConfig(calib=calib, calib_script=calib_script, labels=labels, calib_batch=calib_batch)
    elif check is not None and check.calib is None and check.calib_script is None and (calib is not None or calib_script is not None):
        # verify= without data of its own checks on the run's data, as --calib does for both on the command line
        if calib is not None and reads_once(calib):
            log.warning("verify= has no data of its own and calib= can be read only once (the run reads it): the check "
                        "runs on random inputs; give verify={'calib': ...} held-out data")
        else:
            default_batch = VerifyConfig().calib_batch
            check = check.replace(calib=calib, calib_script=calib_script, labels=check.labels if check.labels is not None else labels,
                                  calib_batch=calib_batch if check.calib_batch == default_batch else check.calib_batch)
    if check is not None and not check.input_shape and cfg.input_shape:  # (as --input-shape does for both)
        check = check.replace(input_shape=",".join(cfg.input_shape) if not isinstance(cfg.input_shape, Mapping) else cfg.input_shape)
    request = pipeline.Request(source=model, config=cfg, verify=check,
                               dry_run=dry_run, base_dir=Path(base_dir) if base_dir is not None else None, calib=calib,
                               labels=labels, calib_batch=calib_batch, calib_script=calib_script, probe=probe, progress=progress)
    if request.verify is not None and dry_run:
        raise UsageError(f"{option('dry_run')} leaves the model as it is, so there is nothing to verify; drop "
                         f"{option('dry_run')} or the verification options.")
    from .passes import PIPELINE
    from .runtime import limit
    from .runtime.executor import make_executor

    cfg = request.config
    with _Warnings() as warned:
        _warn_oversubscribed(cfg)
        executor = make_executor(cfg.workers, cfg.executor, cfg.cores, cfg.ray_address)
        with limit(cfg.cores):  # BLAS and the pass's onnxruntime sessions share the cores given
            result = CompressResult.of(pipeline.run(PIPELINE, pipeline.Context(request, executor=executor)))
    result.warnings = warned.messages
    if result.verification is not None and not request.verify.keep_failed:
        result.verification.check(result=result)
    return result


class _Warnings(logging.Handler):
    """Collects the package's warnings logged while the block runs by this thread and the pass's
    task threads (worker processes log to their own process)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []
        self.logger = logging.getLogger(__package__)

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread or (record.threadName or "").startswith("onnx-lowrank"):  # (and its task threads)
            try:
                self.messages.append(record.getMessage())
            except Exception:
                self.handleError(record)

    def __enter__(self) -> "_Warnings":
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


def _warn_oversubscribed(cfg: CompressConfig) -> None:
    """More threads than this machine gives the process: say what that does to the run."""
    from .runtime import available_cores

    have = available_cores()
    if cfg.executor == "local" and cfg.cores is not None and cfg.cores > have:
        log.warning("%s %d: this process may run on %d CPU core(s); the threads past them only take turns (the result is "
                    "the same)", option("cores"), cfg.cores, have)
    if cfg.latency_aware and max(cfg.threads) > have:
        log.warning("%s %s: this process may run on %d CPU core(s); latency-aware timings at more threads than cores measure "
                    "threads taking turns, not the machine the model will run on (time on that machine, or lower %s)",
                    option("threads"), ",".join(map(str, cfg.threads)), have, option("threads"))


#: Calibration options: they feed rank selection and, when a check is asked for, the check.
_CALIBRATION = ("calib", "calib_script", "labels", "calib_batch")


def keywords(given: Mapping[str, Any], *, verify: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """``compress()`` keywords from option values named as everywhere (``max_drop``, ``calib``).

    This is where the command line's flags become a request, so that the rules live behind the
    API: options of :class:`CompressConfig` configure the pass; ``max_drop`` and ``metric`` are
    the goal of ``adaptive`` and the gate at once; the options of :class:`VerifyConfig` ask for
    a check, except the run settings the pass shares with it (``threads``; ``input_shape`` in
    latency-aware mode, and only for random data) and, in a dry run of a data-aware or adaptive
    pass, the calibration data (which then feeds rank selection only).

    Args:
        given: The options given (``None`` values count as not given).
        verify: Check even when no option asks for it (``--verify``).
        dry_run: Plan only.
    """
    given = {k: v for k, v in given.items() if v is not None}
    config = {f.name for f in CompressConfig.fields()} - {"max_drop", "metric"}
    out: dict[str, Any] = {k: given[k] for k in config if k in given}
    if given.get("adaptive"):
        out.update({k: given[k] for k in ("max_drop", "metric") if k in given})
    checks = {k: given[k] for k in (f.name for f in dataclasses.fields(VerifyConfig)) if k in given}
    shared = {"threads"}
    if given.get("latency_aware"):
        shared.add("input_shape")
        if "calib" in checks or "calib_script" in checks:
            checks.pop("input_shape", None)  # real data needs no shapes; they were for the latency probes
    if dry_run and (given.get("data_aware") or given.get("adaptive") or given.get("ffn_keep") is not None or given.get("refine")):
        shared.update(_CALIBRATION)  # the plan itself reads the data: with nothing to verify, it is not a verification option
    if set(checks) - shared or verify:
        if isinstance(checks.get("threads"), tuple):
            checks["threads"] = checks["threads"][0]  # the pass takes a list of settings; the check runs once
        out["verify"] = VerifyConfig(**checks)
    out.update({k: given[k] for k in _CALIBRATION if k in given})
    return out


def _resolve_verify(verify: VerifyConfig | Mapping[str, Any] | None) -> VerifyConfig | None:
    if verify is None or isinstance(verify, VerifyConfig):
        return verify
    if isinstance(verify, Mapping):
        known = {f.name for f in dataclasses.fields(VerifyConfig)}
        unknown = sorted(set(verify) - known)
        if unknown:
            raise UsageError(f"verify: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}.")
        return VerifyConfig(**verify)
    raise UsageError(f"got a {type(verify).__name__} as verify; expected a VerifyConfig or a dict of its fields.")


