"""Per-layer decisions and totals, as dataclasses, a text table and JSON.

Parameter counts are per weight (a shared weight counts once).  MACs (multiply-accumulates)
are counted per node, in the unit its row names in ``macs_per``:

* ``row`` (MatMul/Gemm): per activation row (one sample of an MLP, one token of a
  transformer): ``m n`` for a dense ``(m, n)`` weight and ``r (m + n)`` for its factors;
* ``sample`` (Conv with a known spatial size): per sample at batch 1, output pixels included
  (see :mod:`onnx_lowrank.decompose` for the formulas);
* ``output pixel`` (Conv whose spatial size is unknown): per output pixel.

The totals add them up; :attr:`Totals.macs_note` says when the units differ.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["LayerDecision", "Totals", "render_table", "render_totals", "render_sections", "to_json_dict", "human_bytes"]


@dataclass(frozen=True)
class LayerDecision:
    """What the pass did with one MatMul/Gemm/Conv node.

    Attributes:
        node: Node name (with its If/Loop/Scan scope, if any).
        op_type: ``MatMul``, ``Gemm``, ``Conv`` (or ``ConvTranspose``, always skipped).
        weight: Name of the constant operand, if there is one.
        shape: Stored shape of the weight (``C_out x C_in x kh x kw`` for a Conv).
        rank: Rank kept (``None`` when no spectrum was computed).
        full_rank: ``min(m, n)`` of the matrix factorized.
        break_even: Largest rank that still saves parameters (and, for a Conv, MACs).
        energy: Energy kept at ``rank``.
        rel_error: Relative Frobenius error at ``rank``.
        params_before: Weight parameters before (0 for the second user of a shared weight).
        params_after: Weight parameters after.
        macs_before: Multiply-accumulates before, in the unit ``macs_per``.
        macs_after: Multiply-accumulates after.
        factorized: Whether the node now uses low-rank factors.
        reason: Why the node was left alone (``None`` when factorized).
        skip_code: The reason's stable code (:class:`~onnx_lowrank.plan.SkipCode`).
        skip_stage: The stage that decided to leave the node alone.
        factors: Names of the two factor tensors.
        shared_with: Display name of the first user when the weight is shared.
        whitened: Whether the spectrum (so ``energy``, ``rel_error``) is data-aware: then the
            energy is the fraction of ``||X W||_F^2`` kept over the calibration activations.
        sensitivity: In adaptive mode, the measured drop of the output when only this layer is
            compressed at ``rank`` (interpolated between the measured grid ranks).
        note: A remark on how the layer was treated (e.g. why the plain SVD was used).
        conv_mode: For a Conv with a chosen rank: ``channel`` or ``spatial``.
        macs_per: What the MAC counts are per: ``row``, ``sample`` or ``output pixel``
            (``None`` when not counted).
        width: For a projection of a width-reduced feed-forward block: ``[kept, hidden]``
            neurons (then ``factorized`` is false: the weight is narrower, not split).
        quantized: How ``--quantize int4`` stored the weight or its factors, e.g.
            ``int4 (block 32) + rank-16 correction``, ``... (stacked)`` when the branch rides in the
            4-bit blocks, or ``factors int8``.
    """

    node: str
    op_type: str
    weight: str | None = None
    shape: tuple[int, ...] | None = None
    rank: int | None = None
    full_rank: int | None = None
    break_even: int | None = None
    energy: float | None = None
    rel_error: float | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    factorized: bool = False
    reason: str | None = None
    skip_code: str | None = None
    skip_stage: str | None = None
    factors: tuple[str, str] | None = None
    shared_with: str | None = None
    whitened: bool = False
    sensitivity: float | None = None
    note: str | None = None
    conv_mode: str | None = None
    macs_per: str | None = "row"
    width: tuple[int, int] | None = None
    quantized: str | None = None


@dataclass
class Totals:
    """Model-level numbers before and after.

    ``macs_per`` is ``row`` when every MAC count is per activation row (MatMul/Gemm only), else
    ``mixed``; ``macs_note`` then says what the total adds up (Conv per sample at batch 1, or
    per output pixel where the spatial size is unknown).
    """

    layers: int = 0
    factorized: int = 0
    narrowed: int = 0
    params_before: int = 0
    params_after: int = 0
    model_params_before: int = 0
    model_params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0
    size_before: int | None = None
    size_after: int | None = None
    macs_per: str = "row"
    macs_note: str | None = None
    #: Bytes of the model's constants by kind (``matmul weights``, ``embeddings``, ...): ``[before, after]``
    #: (after ``None`` in a dry run).
    tensor_bytes: dict[str, list[int]] | None = None


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ratio(before: int | None, after: int | None) -> str:
    if not before or not after:
        return ""
    return f"  ({before / after:.2f}x smaller)" if after < before else "  (unchanged)" if after == before else ""


def _fmt_row(d: LayerDecision) -> list[str]:
    shape = "x".join(str(s) for s in d.shape) if d.shape else "-"
    if d.rank is not None:
        ranks = f"{d.rank}/{d.full_rank}/{d.break_even}"
        energy = f"{d.energy:.4f}"
        err = f"{d.rel_error:.4f}"
    else:
        ranks = energy = err = "-"
    if d.factorized:
        params = f"{d.params_before:,} -> {d.params_after:,}" if d.params_before else f"shared with {d.shared_with}"
        status = f"factorized ({d.conv_mode}-wise)" if d.conv_mode else "factorized"
        status += f"; {d.quantized}" if d.quantized else ""
    elif d.width is not None:
        params = f"{d.params_before:,} -> {d.params_after:,}"
        status = f"narrowed: {d.width[0]} of {d.width[1]} neurons" + (f"; {d.quantized}" if d.quantized else "")
    elif d.quantized:  # stored in 4 bits, not factorized: the factorization's columns describe nothing written
        ranks = energy = err = "-"
        params = f"{d.params_before:,}" if d.params_before else "-"
        status = d.quantized + (" (the byte budget's choice)" if d.skip_code == "left_dense_by_budget" else "")
    else:
        params = f"{d.params_before:,}" if d.params_before else "-"
        status = f"skipped: {d.reason}"
    if d.note:
        status += f" ({d.note})"
    if d.whitened and d.rank is not None and energy != "-":
        energy += " w"
    sens = f"{d.sensitivity:.5f}" if d.sensitivity is not None else "-"
    return [d.node, d.weight or "-", shape, ranks, energy, err, sens, params, status]


_HEADERS = ["node", "weight", "shape", "rank/full/even", "energy", "rel.err", "sensitivity", "params", "result"]
_SENS = _HEADERS.index("sensitivity")


def _clip(s: str, width: int) -> str:
    return s if len(s) <= width else "..." + s[-(width - 3):]


def render_table(decisions: list[LayerDecision], *, max_name: int = 40) -> str:
    """A fixed-width table, one row per MatMul/Gemm/Conv node."""
    if not decisions:
        return "No MatMul/Gemm/Conv nodes found: nothing to factorize; the output is a faithful copy."
    rows = [_fmt_row(d) for d in decisions]
    rows = [[_clip(r[0], max_name), _clip(r[1], max_name), *r[2:]] for r in rows]
    headers = list(_HEADERS)
    if all(d.sensitivity is None for d in decisions):  # the column only exists in adaptive mode
        headers.pop(_SENS)
        rows = [r[:_SENS] + r[_SENS + 1:] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers[:-1])]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers[:-1], widths)) + "  " + headers[-1]]
    lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
    if any(d.whitened and d.rank is not None for d in decisions):
        lines.append("energy 'w': data-aware, the fraction of ||X W||^2 kept over the calibration activations")
    if any(d.note == "attention-aware" and d.rank is not None for d in decisions):
        lines.append("attention-aware: a query/key projection, weighed also by the keys/queries it is scored against "
                     "(its energy is of ||X W R||^2, R from those)")
    return "\n".join(lines)


def render_totals(t: Totals) -> str:
    lines = [
        f"layers:        {t.factorized} of {t.layers} candidate nodes factorized"
        + (f", {t.narrowed} narrowed (feed-forward width)" if t.narrowed else ""),
        f"weights:       {t.params_before:,} -> {t.params_after:,} parameters in candidate layers{_ratio(t.params_before, t.params_after)}",
        f"model:         {t.model_params_before:,} -> {t.model_params_after:,} parameters{_ratio(t.model_params_before, t.model_params_after)}",
        f"{'MACs/row:' if t.macs_per == 'row' else 'MACs:':<15}{t.macs_before:,} -> {t.macs_after:,} in candidate layers"
        f"{_ratio(t.macs_before, t.macs_after)}",
    ]
    if t.macs_note:
        lines.append(f"               note: {t.macs_note}")
    if t.size_before is not None or t.size_after is not None:
        lines.append(f"file size:     {human_bytes(t.size_before)} -> {human_bytes(t.size_after)}{_ratio(t.size_before, t.size_after)}")
    if t.tensor_bytes:
        parts = [f"{kind} {human_bytes(b)}" + ("" if a is None else f" -> {human_bytes(a)}" if a != b else " (unchanged)")
                 for kind, (b, a) in t.tensor_bytes.items()]
        dry = any(a is None for _, a in t.tensor_bytes.values())
        lines.append(f"tensor bytes:  {'; '.join(parts)}" + (" (as loaded)" if dry else ""))
    return "\n".join(lines)


#: Sections shown in full under the totals, one line each.
_NUMBER_SECTIONS = ("data_aware", "adaptive", "refine")


def _fmt_width(w: dict[str, Any]) -> str:
    blocks = w.get("blocks", [])
    kept, hidden = sum(b["kept"] for b in blocks), sum(b["hidden"] for b in blocks)
    how = f", chosen by {w['selection']}" if w.get("selection") else ""
    if blocks:
        text = (f"{len(blocks)} feed-forward block(s) keep {kept:,} of {hidden:,} neurons (ffn_keep {w.get('ffn_keep')}{how}), "
                f"refit error {min(b['refit_error'] for b in blocks):.4f}-{max(b['refit_error'] for b in blocks):.4f}")
    else:
        text = f"no feed-forward block narrowed (ffn_keep {w.get('ffn_keep')}{how})"
    for n in w.get("not_reduced", []):
        text += f"\n               not reduced: {n['node']}: {n['reason']}"
    return text


def render_sections(sections: dict[str, Any]) -> str:
    """The stages' numbers under the totals: data-aware, adaptive, refine, latency and int8."""
    lines = [f"{(key.replace('_', '-') + ':').ljust(14)} {_fmt_extra(sections[key])}" for key in _NUMBER_SECTIONS if key in sections]
    recurrent = sections.get("recurrent")
    if recurrent:
        kinds = sorted({n["op_type"] for n in recurrent["nodes"]})
        lines.append(f"{'recurrent:':<14} {len(recurrent['nodes'])} {'/'.join(kinds)} node(s) with "
                     f"{sum(n['params'] for n in recurrent['nodes']):,} constant weight parameters, left as they are "
                     "(recurrent operators are not factorized)")
    fold = sections.get("fold")
    if fold:
        ops = sorted({op for c in fold["chains"] for op in c["ops"]})
        lines.insert(0, f"{'folded:':<14} {len(fold['chains'])} weight(s) read through {'/'.join(ops)}, now read as constants "
                        "(the same values, nothing stored twice), so that they are candidates")
    if "width" in sections:
        lines.append(f"{'width:':<14} {_fmt_width(sections['width'])}")
    lat = sections.get("latency")
    if lat:
        kept = sum(1 for v in lat.get("layers", {}).values() if v.get("kept"))
        lines.append(f"latency:       {kept} of {len(lat.get('layers', {}))} planned layer(s) measured faster factored")
        for c in lat.get("model") or []:
            lines.append(f"               whole model x{c['speedup']:.2f} vs {lat.get('baseline', 'input')} "
                         f"at {c['threads']} thread(s), batch {c['batch']}")
        if lat.get("undone"):
            lines.append("               the whole model was not faster: factorization undone")
    q = sections.get("quantize")
    if q:
        lines.append(f"int8:          onnxruntime dynamic quantization ({q['mode']}); {q['factors_quantized']} of {q['factors']} factor(s) quantized"
                     + (f"; left in float: {', '.join(q['unquantized_factors'])}" if q["unquantized_factors"] else ""))
        if q.get("body_weights_quantized"):
            lines.append(f"               {q['body_weights_quantized']} weight(s) read inside If/Loop/Scan bodies, which "
                         "onnxruntime's quantizer does not reach, written in int8 as it writes the main graph's")
        if q.get("dense_left_float"):
            inside = q["dense_left_float_in_bodies"]
            lines.append(f"               {len(q['dense_left_float'])} dense weight(s) left in float"
                         + (f" ({inside} read inside If/Loop/Scan bodies by something other than MatMul alone; "
                            "--quantize int4 takes Gemm readers too)" if inside else ""))
        if q.get("other_ops_quantized"):
            lines.append("               onnxruntime's quantizer also converted (its default op types): "
                         + ", ".join(f"{n} {op}" for op, n in q["other_ops_quantized"].items())
                         + "; --int8-ops matmul keeps them float")
    q4 = sections.get("int4")
    if q4:
        lines.append(_fmt_int4(q4))
    return "\n".join(lines)


def _fmt_int4(q: dict[str, Any]) -> str:
    gptq = f"; {q['gptq_rounded']} rounded with error feedback (gptq)" if q.get("gptq_rounded") else ""
    if q["corrected"]:
        branch = (f"{q['corrected']} with a correction branch ({q['correction']}; {q['statistics']}{gptq}"
                  + (f"; {q['stacked']} inside the 4-bit blocks" if q.get("stacked") else "")
                  + (f"; the error's mean in the bias of {q['mean_corrected']}" if q.get("mean_corrected") else ""))
    else:  # (the note on statistics then says what stands in for a branch, the mean correction included)
        branch = f"no correction branch ({q['statistics']}{gptq}"
    text = (f"int4:          {q['weights_quantized']} weight(s) as MatMulNBits (block {q['block']}), {branch}"
            + "); the weights and factors it stored: "
            f"{human_bytes(q['matmul_weight_bytes_before'])} in float -> {human_bytes(q['matmul_weight_bytes_after'])}")
    errors = [(l["error_int4"], l["error_corrected"]) for l in q.get("layers", [])]
    if errors:
        what = "output" if q.get("whitened") or q.get("statistics", "").startswith("whitened") else "weight"
        text += (f"\n               relative {what} error per layer: 4-bit alone {min(e[0] for e in errors):.4f}-"
                 f"{max(e[0] for e in errors):.4f}, with the branch {min(e[1] for e in errors):.4f}-{max(e[1] for e in errors):.4f}")
    left = list(q.get("left_float", {}).items())
    for name, why in left[:5]:
        text += f"\n               left float: {name}: {why}"
    if len(left) > 5:
        text += f"\n               left float: {len(left) - 5} more (the JSON report lists them)"
    return text


def _fmt_extra(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} {_fmt_extra(v)}" for k, v in value.items() if v is not None)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt_extra(v) for v in value) + "]"
    return str(value)


def to_json_dict(decisions: list[LayerDecision], totals: Totals, **sections: Any) -> dict[str, Any]:
    def layer(d: LayerDecision) -> dict[str, Any]:
        out = asdict(d)
        out["shape"] = list(d.shape) if d.shape else None
        out["factors"] = list(d.factors) if d.factors else None
        return out

    doc: dict[str, Any] = {"layers": [layer(d) for d in decisions], "totals": asdict(totals)}
    doc.update({k: v for k, v in sections.items() if v is not None})
    return doc


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=False, default=str)
