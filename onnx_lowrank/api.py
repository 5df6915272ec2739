"""``compress()``: the one facade; the CLI is a thin shell over it.

Data flows one way: load -> discover -> decide ranks -> rewrite -> verify -> save -> report.
Verification runs only when asked for (``verify=``); it compares the rewritten model with the
original in onnxruntime before anything is handed over, and a failed gate raises
:class:`~onnx_lowrank.errors.VerificationFailed` so that a refused model cannot be saved by mistake.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
import onnx

from . import __version__, activations, io, plan, shapes
from .config import CompressConfig, load_recipe
from .discovery import discover
from .errors import UsageError, option, option_value
from .report import LayerDecision, Totals, to_json_dict
from .verify import VerifyConfig, VerifyReport, verify_models

if TYPE_CHECKING:
    from .latency import LatencyProbe

__all__ = ["compress", "CompressResult", "Progress"]

log = logging.getLogger(__name__)

#: ``progress(done, total, label)`` is called after each weight's SVD.
Progress = Callable[[int, int, str], None]

METADATA_KEY = "onnx_lowrank"


@dataclass
class CompressResult:
    """The compressed model and everything the pass decided.

    Attributes:
        model: The compressed model.  Tensors the input kept in external data files still point
            there (``source_dir``); :meth:`save` writes a complete copy.
        layers: One decision per MatMul/Gemm/Conv node, in graph order.
        totals: Parameters, MACs and file sizes before and after.
        config: The configuration used.
        source_dir: Directory that external data references of ``model`` are relative to.
        source_path: The input model's file, when it was given as a path (never overwritten).
        source_external: Whether the input kept tensors in external data files; :meth:`save`
            then writes the output's data to ``OUT.data`` too.
        dry_run: True when the model was planned but not rewritten.
        verification: What the onnxruntime check measured, when ``verify=`` was given.
    """

    model: onnx.ModelProto
    layers: list[LayerDecision]
    totals: Totals
    config: CompressConfig
    source_dir: Path | None = None
    dry_run: bool = False
    verification: VerifyReport | None = None
    sections: dict[str, Any] = field(default_factory=dict)
    source_path: Path | None = None
    source_external: bool = False

    @property
    def modified(self) -> bool:
        return self.totals.factorized > 0

    @property
    def data(self) -> io.DataFiles:
        """Where the external data of :attr:`model` resolves."""
        return io.DataFiles(self.source_dir, label=str(self.source_path) if self.source_path else "the model")

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
        io.check_output_path(path, self.source_path)
        if report is not None:
            io.check_output_path(report, self.source_path, flag="--report", keep=(path,))
        if external is None and self.source_external:
            external = True  # the input kept its data outside; so does the output, even if every external tensor was factorized
        protect = tuple(io.external_files(self.source_path)) if self.source_path is not None else ()
        with io.terminate_raises(), io.OutputSet() as files:
            written = io.stage_model(files, self.model, path, data=self.data, external=external, protect=protect)
            self.totals.size_after = sum(files.staged_size(p) for p in written)
            if report is not None:
                text = self.to_json() + "\n"
                files.stage(report, lambda f: f.write(text.encode("utf-8")))
            files.commit_reporting(written + ([Path(report)] if report is not None else []))
        return written

    def write_report(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` alone (a dry run's plan), all or nothing."""
        io.check_output_path(path, self.source_path, flag="--report")
        return io.write_text(path, self.to_json() + "\n")

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data: layers, totals, config, and any extra sections."""
        sections = dict(self.sections)
        if self.verification is not None:
            sections["verification"] = self.verification.to_dict()
        return to_json_dict(self.layers, self.totals, config=self.config.to_dict(), dry_run=self.dry_run, **sections)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def _latency_batch(model: onnx.ModelProto, cfg: CompressConfig) -> tuple[int, ...]:
    """The batch sizes to time: ``cfg.batch``, except that the default (1) on a model whose batch
    axis is fixed to another size times that size, the only one the model runs at."""
    if tuple(cfg.batch) == (1,):
        from .calibration import fixed_batch, model_inputs

        fixed = fixed_batch(model_inputs(model))
        if fixed is not None:
            return (fixed,)
    return tuple(cfg.batch)


def _resolve_config(config: CompressConfig | None, recipe: str | os.PathLike | None, overrides: dict[str, Any]) -> CompressConfig:
    base: dict[str, Any] = {}
    if recipe is not None:
        base.update(load_recipe(recipe))
    if config is not None:
        if base:
            raise UsageError("pass either config= or recipe=, not both.")
        cfg = config
    else:
        cfg = CompressConfig.from_mapping(base, source=f"recipe {recipe}") if base else CompressConfig()
    known = {f.name for f in dataclasses.fields(CompressConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        hint = f"; did you mean {close[0]}=?" if close else f"; the options are {', '.join(sorted(known))}."
        raise UsageError(f"compress() got an unknown option {unknown[0]}={overrides[unknown[0]]!r}{hint}")
    return cfg.replace(**overrides) if overrides else cfg


def _load(model: str | os.PathLike | onnx.ModelProto, base_dir: str | os.PathLike | None) -> tuple[onnx.ModelProto, Path | None, int | None]:
    if isinstance(model, onnx.ModelProto):
        io.check_tensors(model)
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy, Path(base_dir) if base_dir is not None else None, None
    if isinstance(model, (str, os.PathLike)):
        loaded = io.load_model(model)
        return loaded.model, loaded.base_dir, io.model_size_on_disk(loaded.path, loaded.model)
    raise UsageError(f"got a {type(model).__name__} as model; expected a path or an onnx.ModelProto.")


def _count_params(model: onnx.ModelProto) -> int:
    total = 0
    for g in io.iter_graphs(model.graph):
        for t in g.initializer:
            total += int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        total += int(np.prod(a.t.dims, dtype=np.int64)) if len(a.t.dims) else 1
    return total


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
        model: A path to an ``.onnx`` file, or an ``onnx.ModelProto`` (left unmodified).
        config: A :class:`CompressConfig`; its fields can also be given as keywords
            (``energy=0.93``), which override the config or recipe.
        recipe: A recipe name (``"balanced"``) or TOML path, as with ``--recipe``.
        dry_run: Decide ranks but leave the model as it is.
        base_dir: Where external data of an in-memory ``model`` lives.
        progress: Called as ``progress(done, total, label)`` after each SVD, calibration batch
            and sensitivity measurement.
        calib: Calibration data for ``data_aware`` and ``adaptive``, in any form
            :func:`onnx_lowrank.calibration.load_calibration` takes: an ``.npz`` path or a folder
            of them, a ``CalibrationDataReader``, an iterable of feed dicts, or arrays.
        labels: Class ids of the calibration samples (overrides an ``.npz``'s ``labels``);
            with them adaptive mode bounds the accuracy drop.
        calib_batch: Samples per onnxruntime run when cutting an ``.npz``.
        calib_script: ``file.py:func`` returning an iterable of feed dicts, instead of ``calib``.
        verify: Check the rewritten model against the original in onnxruntime: a
            :class:`~onnx_lowrank.verify.VerifyConfig` or a dict of its fields
            (``{"calib": "data.npz", "max_drop": 0.01}``).  ``None`` skips the check.
        probe: What latency-aware mode measures with (default: onnxruntime micro-benchmarks,
            cached under :func:`onnx_lowrank.latency.default_cache_dir`).

    Returns:
        A :class:`CompressResult`; ``result.verification`` holds the check's numbers.

    Raises:
        UsageError: bad option values or paths (also ``verify`` with ``dry_run``).
        ModelError: the model cannot be read or rewritten.
        CalibrationError: the calibration data does not fit the model.
        VerificationFailed: the gate failed and ``keep_failed`` is off; the exception carries
            ``.report`` and the refused ``.result``.
    """
    cfg = _resolve_config(config, recipe, options)
    vcfg = _resolve_verify(verify)
    if vcfg is not None and dry_run:
        raise UsageError("--dry-run leaves the model as it is, so there is nothing to verify; drop --dry-run or the verification flags.")
    proto, source_dir, size_before = _load(model, base_dir)
    source_external = io.uses_external_data(proto)
    input_dir = source_dir  # quantization may move the result's data in memory; the input's stays here
    found = discover(proto, op_types=cfg.op_types, include=cfg.include, exclude=cfg.exclude, min_params=cfg.min_params,
                     allow_input_weights=cfg.allow_input_weights)
    params_model_before = _count_params(proto)
    feeds = _calibration(proto, cfg, calib=calib, calib_script=calib_script, labels=labels,
                                       calib_batch=calib_batch)
    threads = None  # calibration runs use onnxruntime's own thread choice
    sections: dict[str, Any] = {}
    adaptive_outputs = None
    grams, notes, out_grams = None, None, None
    if cfg.data_aware:
        groups = [g for g in found.groups if g.reason is None and not g.layers[0].is_conv]
        cap = activations.capture_grams(proto, groups, feeds, source_dir, mask_input=cfg.calib_mask, threads=threads, progress=progress,
                                        attention=cfg.attention_aware)
        grams, notes, out_grams = cap.grams, cap.skipped, cap.out_grams
        sections["data_aware"] = {"weights_whitened": len(cap.grams), "ort_runs": cap.runs, "damping": cfg.damping,
                                  "mask": cfg.calib_mask, "attention_weighted": len(cap.out_grams)}
    # Conv MACs scale with the output size, which only the model's shapes tell; read them
    # before the rewrite changes the graph.
    known = shapes.value_shapes(proto) if any(l.is_conv for l in found.layers) else None
    plans = plan.build_plans(found, source_dir, progress, grams=grams, out_grams=out_grams, damping=cfg.damping, notes=notes,
                             conv_mode=cfg.conv_mode, shapes=known)
    if cfg.adaptive:
        from . import adaptive

        base = plan.BudgetBase.of(found, plans, cfg, params_model_before)
        adaptive_feeds = feeds.head(cfg.adaptive_samples) if cfg.adaptive_samples is not None else feeds
        sections["adaptive"], adaptive_outputs = adaptive.decide_adaptive(proto, plans, cfg, base, adaptive_feeds,
                                                                          adaptive_feeds.labels, source_dir, threads=threads,
                                                                          progress=progress)
        if adaptive_feeds.samples is not None:
            sections["adaptive"]["samples"] = adaptive_feeds.samples
    elif cfg.has_budget:
        plan.decide_budget(plans, cfg, plan.BudgetBase.of(found, plans, cfg, params_model_before))
    else:
        plan.decide(plans, cfg)
    if cfg.latency_aware:
        from . import latency

        probe = probe if probe is not None else latency.OrtProbe(latency.default_cache_dir())
        sections["latency"] = {"layers": latency.filter_plans(
            proto, plans, threads=cfg.threads, batch=_latency_batch(proto, cfg), input_shape=_input_shapes(cfg), min_speedup=cfg.min_speedup,
            quantize=cfg.quantize, probe=probe, base_dir=source_dir)}
    if not dry_run:
        original, original_dir = (_copy(proto) if cfg.latency_aware else None), source_dir
        if cfg.refine:
            sections["refine"] = _refine(proto, plans, feeds, source_dir, cfg, threads, progress)
        plan.apply(proto, plans)
        if cfg.adaptive and adaptive_outputs is not None and any(p.factor_names for p in plans):
            sections["adaptive"]["final_drop"] = _verify_final(proto, source_dir, adaptive_feeds, adaptive_outputs,
                                                               sections["adaptive"], threads, cfg.metric)
        if cfg.quantize:
            proto, source_dir = _quantize(proto, source_dir, plans, sections, cfg.quantize)
        if cfg.latency_aware and any(p.factor_names for p in plans):
            proto, source_dir = _check_whole_model(original, original_dir, proto, source_dir, plans, cfg, probe, sections)
    decisions = plan.decisions(found, plans, shapes=known)

    totals = Totals(layers=len(decisions), factorized=sum(d.factorized for d in decisions), size_before=size_before)
    for d in decisions:
        totals.params_before += d.params_before
        totals.params_after += d.params_after
        totals.macs_before += d.macs_before
        totals.macs_after += d.macs_after
    totals.macs_per, totals.macs_note = _macs_units(decisions, known)
    totals.model_params_before = params_model_before
    totals.model_params_after = params_model_before - totals.params_before + totals.params_after
    for key in ("data_aware", "adaptive", "refine"):
        if key in sections:
            totals.extra[key] = sections[key]
    if not dry_run and totals.factorized:
        _record_metadata(proto, cfg, totals)
    result = CompressResult(model=proto, layers=decisions, totals=totals, config=cfg, source_dir=source_dir, dry_run=dry_run,
                            sections=sections, source_path=Path(model) if isinstance(model, (str, os.PathLike)) else None,
                            source_external=source_external)
    if vcfg is not None:
        # The caller's ModelProto was copied by _load, so it still is the original.
        result.verification = verify_models(model, proto, vcfg, base_dir=input_dir, compressed_data=io.DataFiles(source_dir))
        if not vcfg.keep_failed:
            result.verification.check(result=result)
    return result


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


def _macs_units(decisions: list[LayerDecision], known: shapes.ShapeInfo | None) -> tuple[str, str | None]:
    units = {d.macs_per for d in decisions if d.macs_per is not None and d.macs_before}
    if units <= {"row"}:
        return "row", None
    parts = []
    if "sample" in units:
        parts.append("Conv per sample at batch 1")
    if "row" in units:
        parts.append("MatMul/Gemm per activation row")
    pixel = sum(d.macs_per == "output pixel" for d in decisions)
    if pixel:
        why = known.note if known is not None and known.note else "its input's spatial dims are dynamic"
        parts.append(f"{pixel} Conv node(s) per output pixel, their size being unknown ({why}); "
                     "fix the input size (python -m onnxruntime.tools.make_dynamic_shape_fixed) to count them per sample")
    return "mixed", "; ".join(parts)


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    return copy


def _input_shapes(cfg: CompressConfig) -> dict[str, tuple[int, ...]]:
    from .calibration import parse_input_shapes

    return parse_input_shapes(cfg.input_shape)


def _quantize(proto: onnx.ModelProto, source_dir: Path | None, plans: list[plan.LayerPlan],
              sections: dict[str, Any], mode: str) -> tuple[onnx.ModelProto, Path | None]:
    """int8 after factorization; records whether every factor ended up quantized."""
    from .quantize import quantize, unquantized

    quantized = quantize(proto, mode, base_dir=source_dir)
    factors = [name for p in plans if p.factor_names for name in p.factor_names]
    missed = unquantized(quantized, factors)
    if missed:
        log.warning("int8 quantization left %d factor(s) in float: %s", len(missed), ", ".join(missed))
    sections["quantize"] = {"mode": mode, "factors": len(factors), "factors_quantized": len(factors) - len(missed),
                            "unquantized_factors": missed}
    return quantized, None


def _check_whole_model(original: onnx.ModelProto, original_dir: Path | None, proto: onnx.ModelProto,
                       source_dir: Path | None, plans: list[plan.LayerPlan], cfg: CompressConfig, probe: Any,
                       sections: dict[str, Any]) -> tuple[onnx.ModelProto, Path | None]:
    """Time the result against the input; undo the factorization if it is slower anywhere.

    With ``quantize``, the baseline is the input quantized the same way, so the check asks
    whether factorization pays on top of int8.
    """
    from . import latency

    baseline, base_dir = original, original_dir
    if cfg.quantize:
        from .quantize import quantize

        baseline, base_dir = quantize(original, cfg.quantize, base_dir=original_dir), None
    checks = latency.check_model(baseline, proto, threads=cfg.threads, batch=_latency_batch(baseline, cfg), input_shape=_input_shapes(cfg),
                                 probe=probe, before_dir=base_dir, after_dir=source_dir)
    sections["latency"]["model"] = checks
    sections["latency"]["baseline"] = f"input quantized ({cfg.quantize})" if cfg.quantize else "input"
    worst = min(checks, key=lambda c: c["speedup"])
    if worst["speedup"] >= 1.0:
        return proto, source_dir
    where = f"{worst['threads']} thread{'s' if worst['threads'] != 1 else ''}, batch {worst['batch']}"
    reason = f"no latency gain: the whole model measured x{worst['speedup']:.2f} at {where}; factorization undone"
    log.warning("%s", reason)
    for p in plans:
        if p.factor_names:
            p.reason = reason
            p.factor_names = None
    sections["latency"]["undone"] = True
    if "quantize" in sections:
        sections["quantize"].update(factors=0, factors_quantized=0, unquantized_factors=[])
    return baseline, base_dir


def _refine(proto: onnx.ModelProto, plans: list[plan.LayerPlan], feeds: Any, source_dir: Path | None, cfg: CompressConfig,
            threads: int | None, progress: Any) -> dict[str, Any]:
    """Refit the factors of every chosen MatMul/Gemm plan on propagated activations (``refine``)."""
    from . import linalg

    chosen = [p for p in plans if p.reason is None and p.choice is not None and not p.is_conv and p.spectrum is not None]
    factors = {id(p.group): linalg.factors(p.spectrum, p.rank) for p in chosen}
    weights = {id(p.group): io.read_tensor(p.group.weight.tensor, source_dir) for p in chosen}
    refitted, runs = activations.refit_factors(proto, [p.group for p in chosen], factors, weights, feeds, source_dir,
                                               both=True, sequential=True, damping=cfg.damping, mask_input=cfg.calib_mask,
                                               threads=threads, progress=progress,
                                               output_only={id(p.group) for p in chosen if p.spectrum.out_whiten is not None})
    changed = 0
    for p in chosen:
        a, b = refitted[id(p.group)]
        if a is not factors[id(p.group)][0] or b is not factors[id(p.group)][1]:
            p.refit = (a, b)
            changed += 1
    return {"layers_refitted": changed, "ort_runs": runs}


def _calibration(proto: onnx.ModelProto, cfg: CompressConfig, *, calib: Any, calib_script: str | None,
                 labels: Any, calib_batch: int) -> Any:
    """The calibration data (feeds and labels) that data-aware and adaptive modes need (validated up front)."""
    if not cfg.needs_calibration:
        if calib is not None or calib_script is not None:
            log.info("calibration data given but unused by rank selection: it serves %s and %s", option("data_aware"), option("adaptive"))
        return None
    flag = option("data_aware" if cfg.data_aware else "adaptive" if cfg.adaptive else "refine")
    if calib is None and calib_script is None:
        raise UsageError(f"{flag} needs calibration data: pass {option_value('calib', 'data.npz')} (keys = the model's input names) "
                         f"or {option_value('calib_script', 'file.py:func')}.")
    from .calibration import load_calibration

    return load_calibration(proto, calib, calib_script=calib_script, calib_batch=calib_batch, labels=labels)


def _verify_final(proto: onnx.ModelProto, source_dir: Path | None, feeds: Any, original: list[np.ndarray],
                  section: dict[str, Any], threads: int | None, metric: str | None) -> float:
    """Run the rewritten model on the calibration set: the drop the user actually gets."""
    from .adaptive import quality_drop
    from .runtime import run_all, session

    sess = session(proto, threads=threads, data=io.DataFiles(source_dir))
    outs = run_all(sess, feeds)
    names = [o.name for o in sess.get_outputs()]
    section["ort_runs"] = section.get("ort_runs", 0) + sum(1 for _ in feeds)
    section["passes"] = section.get("passes", 0) + 1
    drop = quality_drop(original, outs, feeds.labels, metric=metric, names=names)[1]
    if section.get("max_drop") is not None and drop > section["max_drop"] + 1e-6:
        log.warning("the rewritten model loses %.5f on the calibration set, above %s %g", drop, option("max_drop"), section["max_drop"])
    return drop


def _record_metadata(proto: onnx.ModelProto, cfg: CompressConfig, totals: Totals) -> None:
    value = json.dumps(
        {
            "version": __version__,
            "config": cfg.to_dict(),
            "factorized": totals.factorized,
            "weight_params_before": totals.params_before,
            "weight_params_after": totals.params_after,
        },
        sort_keys=True,
    )
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            entry.value = value
            return
    proto.metadata_props.add(key=METADATA_KEY, value=value)
