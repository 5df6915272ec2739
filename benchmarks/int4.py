"""int4 with a whitened low-rank correction, against fp32, int8 and onnxruntime's own int4, on all-MiniLM-L6-v2.

    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1 python benchmarks/int4.py          # writes docs/benchmarks/int4.{md,json}
    python benchmarks/int4.py --quick                                           # smoke run; writes benchmarks/_work/ only
    python benchmarks/int4.py --branch-pair --runs64 16                         # stacked vs separate branches, same ranks

Inputs (built by ``benchmarks/real_models.py``): ``benchmarks/_work/minilm.onnx``, the calibration
texts ``minilm_calib_128.npz`` (the first 256 are used, padded rows left out with
``calib_mask="attention_mask"``) and the held-out texts ``minilm_holdout_128.npz`` (never used
for calibration).  Quality is the cosine of each held-out sentence embedding to fp32's.

Variants, side by side in one run:

* ``fp32``; ``int8-per-channel`` (``onnxruntime.quantization.quantize_dynamic``, per channel);
* ``ort-int4`` (onnxruntime's ``MatMulNBitsQuantizer``, block 32, asymmetric: the reference for
  speed); ``ort-int4-acc4`` the same with ``accuracy_level=4`` (int8 activations);
  ``ort-int4-gptq`` the same with onnxruntime's own GPTQ on the same calibration texts (all
  token rows, padding included: its reader has no mask);
* ``ours`` (``compress(..., quantize="int4")``, factorization off with ``energy=1``) without a
  correction, with the plain residual SVD, and whitened (``--data-aware``) at a few energies and
  ranks and block sizes; ``-acc4`` at accuracy level 4;
* ``ours-b32-mean``: input statistics and no branch: the blocks rounded with error feedback
  (``--int4-rounding gptq``, the default with statistics) and the mean of the 4-bit error in the
  bias (the mean correction of ``--data-aware``); ``-nearest``: rounded to the nearest level
  instead (as are ``ours-b32`` and ``ours-b32-plain-r16``, which have no statistics);
* ``ours-adaptive-b64-separate``: the adaptive block-64 budget with every branch a product of
  its own (``int4_branch="separate"``; the default stacks it into the blocks where it pays);
* ``onnxsim-lqer-r*`` (onnxsim 0.8.1's ``apply_lqer`` on its ``quantize_weight_only_int4``,
  opset 21) when onnxsim is installed, at a rank near our bytes and at rank 16.

Bytes: "MatMul weight bytes" are the constants that MatMul/Gemm/MatMulNBits/DequantizeLinear/
MatMulInteger nodes read (codes, scales, zero points, factors); "file" the whole model.
Latency: :func:`onnx_lowrank.bench.bench` (``common.paired``), each model interleaved with
``ort-int4`` at 1 thread, batch 1 and 64 of 128 tokens; the ratio is ``ort-int4``'s time over
the variant's (below 1: slower).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (DOCS, MINILM_INPUTS, MINILM_SEQ, MINILM_SHAPES, WORK, command_line, compress,  # noqa: E402
                    embedding_quality, environment, markdown_table, paired, quantize_int8, run_model, write)

from onnx_lowrank.passes.int4 import weight_bytes  # noqa: E402

SEQ, SHAPES, INPUTS = MINILM_SEQ, MINILM_SHAPES, MINILM_INPUTS

#: Our variants: label -> compress() keywords (``energy=1`` keeps every weight dense).
OURS = {
    "ours-b32": dict(int4_correction=0),
    "ours-b32-plain-r16": dict(int4_correction=16),
    # input statistics without a branch: the blocks rounded with error feedback (gptq, the default),
    # the 4-bit error's mean in the bias; and the same with nearest rounding
    "ours-b32-mean": dict(data_aware=True, int4_correction=0),
    "ours-b32-mean-nearest": dict(data_aware=True, int4_correction=0, int4_rounding="nearest"),
    "ours-b32-e0.5": dict(data_aware=True, int4_correction=0.5),
    "ours-b32-e0.6": dict(data_aware=True, int4_correction=0.6),
    "ours-b32-r16": dict(data_aware=True, int4_correction=16),
    "ours-b64-r32": dict(data_aware=True, int4_block=64, int4_correction=32),
    "ours-b64-r32-nearest": dict(data_aware=True, int4_block=64, int4_correction=32, int4_rounding="nearest"),
    "ours-b64-r32-acc4": dict(data_aware=True, int4_block=64, int4_correction=32, int4_accuracy_level=4),
    "ours-b32-r16-float": dict(data_aware=True, int4_correction=16, int4_factors="float"),
    # one byte budget over factor pairs and int4 + branch, per layer (0.174 of fp32: ours-b64-r32's bytes)
    "ours-budget-b32": dict(data_aware=True, target_bytes=0.174),
    "ours-budget-b64": dict(data_aware=True, target_bytes=0.174, int4_block=64),
    # the same budget allocated on measured sensitivity (adaptive mode, its default sample and points)
    "ours-adaptive-b32": dict(data_aware=True, target_bytes=0.174, adaptive=True),
    "ours-adaptive-b64": dict(data_aware=True, target_bytes=0.174, int4_block=64, adaptive=True),
    # the same with every branch a product of its own (before stacked branches were the default)
    "ours-adaptive-b64-separate": dict(data_aware=True, target_bytes=0.174, int4_block=64, adaptive=True,
                                       int4_branch="separate"),
    # width reduction (fp32), and width reduction with int4 on what it leaves
    "ours-ffn0.75": dict(ffn_keep=0.75, quantize=None),
    "ours-ffn0.75-b64-r32": dict(ffn_keep=0.75, data_aware=True, int4_block=64, int4_correction=32),
    # one byte budget over factor pairs, 4-bit forms and feed-forward widths (layer-local errors)
    "ours-budget-ffn-b64": dict(data_aware=True, target_bytes=0.174, int4_block=64, ffn_keep="auto"),
    "ours-budget-ffn-b64-0.15": dict(data_aware=True, target_bytes=0.15, int4_block=64, ffn_keep="auto"),
    # the same, allocated on measured sensitivity
    "ours-adaptive-ffn-b64": dict(data_aware=True, target_bytes=0.174, int4_block=64, ffn_keep="auto", adaptive=True),
    "ours-adaptive-ffn-b64-0.15": dict(data_aware=True, target_bytes=0.15, int4_block=64, ffn_keep="auto", adaptive=True),
}


def ort_int4(model: onnx.ModelProto, block: int, accuracy_level: int | None) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the quantizer edits the model it is given
    q = MatMulNBitsQuantizer(copy, block_size=block, is_symmetric=False, accuracy_level=accuracy_level)
    q.process()
    return q.model.model


def ort_int4_gptq(model: onnx.ModelProto, block: int, calib: dict[str, np.ndarray], batch: int = 32) -> onnx.ModelProto:
    """onnxruntime's int4 with its own GPTQ (``GPTQWeightOnlyQuantConfig``, the port of Intel Neural
    Compressor's that ships with onnxruntime) on the same calibration texts, in batches."""
    from onnxruntime.quantization.calibrate import CalibrationDataReader
    from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            n = len(next(iter(calib.values())))
            self.batches = iter([{k: v[i:i + batch] for k, v in calib.items()} for i in range(0, n, batch)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    q = MatMulNBitsQuantizer(copy, block_size=block, is_symmetric=False,
                             algo_config=GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader()))
    q.process()
    return q.model.model


def onnxsim_lqer(model: onnx.ModelProto, rank: int, calib: list[dict[str, np.ndarray]]) -> onnx.ModelProto | str:
    """onnxsim 0.8.1's LQER, or why it could not run."""
    try:
        import onnxsim
        from onnx import version_converter
    except ImportError as exc:
        return f"onnxsim not installed ({exc})"
    m21 = version_converter.convert_version(model, 21)  # its int4 is opset 21's INT4 + DequantizeLinear(block_size)
    q = onnxsim.quantize_weight_only_int4(m21)
    return onnxsim.apply_lqer(m21, q, rank=rank, calibration_data=calib)


def render(doc: dict, lqer_note: str | None, env: str) -> str:
    """The markdown table of every variant in ``doc``."""
    data, batches = doc["variants"], doc["batches"]
    latency = all(f"p50_ms_b{b}" in e for e in data.values() for b in batches)
    headers = ["variant", "MatMul weights (MB)", "file (MB)", "cosine mean", "cosine min"]
    headers += [f"ms batch {b} (vs ort-int4)" for b in batches] if latency else []
    rows = []
    for label, e in data.items():
        lat = [f"{e[f'p50_ms_b{b}']:.1f} (x{e[f'vs_ort_int4_b{b}']:.2f})" for b in batches] if latency else []
        rows.append([label, f"{e['matmul_weight_bytes'] / 1e6:.2f}", f"{e['file_bytes'] / 1e6:.2f}",
                     f"{e['cosine_mean']:.4f}", f"{e['cosine_min']:.4f}", *lat])
    commands = sorted(set(doc.get("runs_of", {}).values())) or [command_line()]
    return "\n".join([
        "# int4 + whitened low-rank correction on all-MiniLM-L6-v2", "",
        *[f"`{c}`" for c in commands], "", env, "",
        f"Held-out texts: {doc['holdout']}; calibration texts: {doc['calib']}. x: ort-int4's time / the variant's, paired "
        "in the same run (below 1: slower); the ms columns are each pair's own medians.", "",
        markdown_table(headers, rows), "",
        "![bytes against quality](int4_pareto.png)", "",
        *([f"onnxsim: {lqer_note}"] if lqer_note else []),
    ])


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other beats in both: fewer bytes (lower x) and higher quality (higher y),
    ordered by x."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not out or y > out[-1][1]:
            out.append((x, y))
    return out


def plot(doc: dict, path: Path) -> None:
    """Pareto chart: MatMul weight bytes against held-out cosine (all variants; then the crowded
    corner above 0.99 enlarged), and batch-64 speed against ort-int4 against held-out cosine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = doc["variants"]
    big = doc["batches"][-1]
    size = ("matmul_weight_bytes", "MatMul weight bytes (MB)", 1e-6)
    panels = [(*size, None), (*size, 0.99)]
    if all(f"vs_ort_int4_b{big}" in e for e in data.values()):
        panels.append((f"vs_ort_int4_b{big}", f"speed vs onnxruntime int4, batch {big} (x, higher is faster)", 1.0, None))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 2.5, 5))

    def family(label: str) -> str:
        return ("ours" if label.startswith("ours") else "onnxsim" if label.startswith("onnxsim") else
                "onnxruntime" if label.startswith(("ort", "int8")) else "fp32")

    colors = {"ours": "tab:blue", "onnxsim": "tab:red", "onnxruntime": "tab:green", "fp32": "black"}
    for ax, (key, title, scale, floor) in zip(axes, panels):
        shown = {n: (label, e[key] * scale, e["cosine_mean"]) for n, (label, e) in enumerate(data.items(), 1)
                 if floor is None or e["cosine_mean"] >= floor}
        if floor is not None:  # the corner: leave out the far right (fp32, int8) so the cluster spreads
            limit = 1.5 * min(x for _, x, _ in shown.values())
            shown = {n: v for n, v in shown.items() if v[1] <= limit}
        for n, (label, x, y) in shown.items():  # numbered: the 7.3-7.5 MB variants crowd each other
            ax.scatter(x, y, color=colors[family(label)], s=25, label=f"{n}: {label}" if ax is axes[0] else None)
            ax.annotate(str(n), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if key == size[0]:  # the best quality at each size or less
            edge = frontier([(x, y) for _, x, y in shown.values()])
            ax.step([x for x, _ in edge], [y for _, y in edge], where="post", color="grey", lw=0.8, alpha=0.6,
                    label="best at this size or less" if ax is axes[0] else None)
        ax.set_xlabel(title)
        ax.set_ylabel("held-out cosine to fp32 (mean)")
        low = min(y for _, _, y in shown.values())
        ax.set_ylim(low - (0.001 if floor is not None else 0.005), 1.0005 if floor is not None else 1.002)
        if floor is not None:
            ax.set_title(f"above {floor}, enlarged", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    fig.legend(loc="center right", fontsize=7, frameon=False)
    fig.suptitle("all-MiniLM-L6-v2: size and speed against quality (blue: this tool)")
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


def branch_pair(model: onnx.ModelProto, calib: dict, feeds: dict, ref: np.ndarray, batches: tuple[int, int],
                runs: dict[int, int]) -> int:
    """The two places of a correction branch at the same ranks: its own product (``separate``)
    and stacked below the 4-bit blocks (``auto``), timed against each other."""
    got = {}
    for branch in ("separate", "auto"):
        res = compress(model, quantize="int4", energy=1.0, data_aware=True, int4_block=64, int4_correction=32, calib=calib,
                       calib_mask="attention_mask", int4_branch=branch)
        sec = res.sections["int4"]
        got[branch] = (res.model, {"matmul_weight_bytes": weight_bytes(res.model), "stacked": sec["stacked"],
                                   "ranks": sec["correction_ranks"], **embedding_quality(res.model, feeds, ref)})
    doc = {"command": command_line(), "flags": "--quantize int4 --energy 1 --data-aware --int4-block 64 --int4-correction 32",
           "separate": got["separate"][1], "stacked": got["auto"][1], "runs": runs}
    for b in batches:
        p = paired(got["separate"][0], got["auto"][0], threads=1, batch=b, runs=runs[b], warmup=1 if b > 1 else 5,
                   input_shape=SHAPES)
        doc[f"stacked_vs_separate_b{b}"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in p.items()}
    print(json.dumps(doc, indent=1))
    (DOCS / "int4_branch_pair.json").write_text(json.dumps(doc, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few texts and runs; writes benchmarks/_work/ only")
    ap.add_argument("--only", nargs="*", default=None, help="labels of the variants to run (default: all; fp32 and "
                    "ort-int4 always run); the results then go to benchmarks/_work/partial/")
    ap.add_argument("--calib", type=int, default=256, help="calibration texts (default 256)")
    ap.add_argument("--runs1", type=int, default=40, help="timed runs at batch 1 (default 40)")
    ap.add_argument("--runs64", type=int, default=4, help="timed runs at batch 64 (default 4)")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--merge", action="store_true", help="with --only: add these variants to docs/benchmarks/int4.json "
                    "(fp32 and ort-int4 are re-measured as references, not replaced) and re-render the table and chart")
    ap.add_argument("--lqer-ranks", type=int, nargs="*", default=[4, 16], help="onnxsim LQER ranks (default 4 16)")
    ap.add_argument("--branch-pair", action="store_true", help="only: block 64 with whitened rank-32 branches, stacked "
                    "(--int4-branch auto) and separate, timed against each other; writes docs/benchmarks/int4_branch_pair.json")
    args = ap.parse_args(argv)

    model = onnx.load(str(WORK / "minilm.onnx"))
    cal = np.load(WORK / "minilm_calib_128.npz")
    hold = np.load(WORK / "minilm_holdout_128.npz")
    n_cal, n_hold = (32, 32) if args.quick else (args.calib, len(hold["input_ids"]))
    calib = {k: cal[k][:n_cal] for k in INPUTS}
    feeds = {k: hold[k][:n_hold] for k in INPUTS}
    batches = (1, 8) if args.quick else (1, 64)
    runs = {batches[0]: 5 if args.quick else args.runs1, batches[1]: 2 if args.quick else args.runs64}
    ref = run_model(model, feeds, batch=32)
    if args.branch_pair:
        return branch_pair(model, calib, feeds, ref, batches, runs)

    variants: dict[str, tuple[onnx.ModelProto, dict]] = {}
    wanted = (lambda label: args.only is None or label in args.only)
    t0 = time.perf_counter()
    variants["fp32"] = (model, {})
    variants["ort-int4"] = (ort_int4(model, 32, None), {"seconds": round(time.perf_counter() - t0, 1)})
    if wanted("ort-int4-gptq"):
        t = time.perf_counter()
        variants["ort-int4-gptq"] = (ort_int4_gptq(model, 32, calib), {"seconds": round(time.perf_counter() - t, 1)})
    if wanted("ort-int4-acc4"):
        variants["ort-int4-acc4"] = (ort_int4(model, 32, 4), {})
    if wanted("int8-per-channel"):
        variants["int8-per-channel"] = (quantize_int8(model, per_channel=True), {})
    for label, kw in OURS.items():
        if not wanted(label):
            continue
        t = time.perf_counter()
        extra = dict(calib=calib, calib_mask="attention_mask") if kw.get("data_aware") or kw.get("ffn_keep") else {}
        rule = {} if "target_bytes" in kw else {"energy": 1.0}  # a budget allocates itself
        res = compress(model, **{"quantize": "int4", **rule, **kw, **extra})
        info: dict = {"seconds": round(time.perf_counter() - t, 1)}
        if "width" in res.sections:
            info["widths"] = [b["kept"] for b in res.sections["width"].get("blocks", [])]
        sec = res.sections.get("int4")
        if sec is not None:
            info.update({"correction": sec["correction"], "statistics": sec["statistics"], "ranks": sec["correction_ranks"],
                         "weights_quantized": sec["weights_quantized"], "left_float": sec["left_float"],
                         "report_bytes_after": sec["matmul_weight_bytes_after"]})
        variants[label] = (res.model, info)
        print(f"{label}: {info['seconds']} s, {info.get('correction', '-')}, ranks {info.get('ranks', '-')}", file=sys.stderr)
    lqer_note = None
    for r in args.lqer_ranks:
        label = f"onnxsim-lqer-r{r}"
        if not wanted(label):
            continue
        t = time.perf_counter()
        cb = [{k: v[i:i + 32] for k, v in calib.items()} for i in range(0, n_cal, 32)]
        got = onnxsim_lqer(model, r, cb)
        if isinstance(got, str):
            lqer_note = got
            break
        variants[label] = (got, {"seconds": round(time.perf_counter() - t, 1)})

    data = {}
    base = variants["ort-int4"][0]
    for label, (m, info) in variants.items():
        q = embedding_quality(m, feeds, ref)
        entry = {"matmul_weight_bytes": weight_bytes(m), "file_bytes": m.ByteSize(), **q, **info}
        if not args.no_latency:
            for b in batches:
                p = paired(base, m, threads=1, batch=b, runs=runs[b], warmup=1 if b > 1 else 5, input_shape=SHAPES)
                entry[f"p50_ms_b{b}"] = p["b_p50_ms"]
                entry[f"vs_ort_int4_b{b}"] = p["speedup"]
        data[label] = entry
        print(label, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items() if k != "left_float"},
              file=sys.stderr, flush=True)
    doc = {"variants": data, "calib": n_cal, "holdout": n_hold, "batches": list(batches), "runs": runs,
           "runs_of": {label: command_line() for label in data}}
    folder = WORK / "quick" if args.quick else WORK / "partial" if args.only is not None and not args.merge else DOCS
    if args.merge:  # these variants into the full run's results (each row keeps the command it came from)
        old = json.loads((DOCS / "int4.json").read_text())
        old.setdefault("runs_of", {k: "python benchmarks/int4.py" for k in old["variants"]})
        old["variants"].update({k: v for k, v in data.items() if k not in ("fp32", "ort-int4")})
        old["runs_of"].update({k: command_line() for k in data if k not in ("fp32", "ort-int4")})
        doc = old
    text = render(doc, lqer_note, environment((1,), f"batch {batches[0]}: {runs[batches[0]]} paired runs, batch {batches[1]}: "
                                                   f"{runs[batches[1]]}; {SEQ} tokens"))
    print(text)
    write("int4", text, doc, folder=folder)
    plot(doc, folder / "int4_pareto.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
