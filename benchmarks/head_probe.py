"""Probe, not a form of the tool: fewer attention heads in all-MiniLM-L6-v2, the output projection refitted.

    python benchmarks/head_probe.py --heads 11 [--ffn-keep 0.75] [--calib 1965] [--runs64 8]

Each layer keeps ``--heads`` of its 12 heads: the query, key and value projections lose the
dropped heads' 32 columns (weights and biases), and the attention output projection ``W_o`` (with
its bias) is refitted by ridge least squares on the calibration activations of the kept heads,
``[Z_S 1] W' ~ [Z 1] [W_o; b_o]`` (``Z``: the projection's input, the heads' outputs side by side;
padded tokens left out; ridge ``--damping`` times the mean diagonal).  Heads leave one at a time,
the one whose output the refit of the others recovers best.  The export reshapes with ``-1`` for
the head count, so no shape constant changes.  With ``--ffn-keep`` the tool's width reduction then
runs on the result (``--energy 1``, ``--damping 0.001``).

Quality: mean (minimum) cosine of the sentence embedding to fp32's on the 256 held-out texts;
speed: paired with fp32 at 1 thread, batch 64, sequence 128 (median of per-pair speed-ups).
The node names are those of ``benchmarks/_work/minilm.onnx`` (``python benchmarks/real_models.py
--only minilm``); results are printed, and recorded by hand in docs/width.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MINILM_INPUTS, MINILM_SHAPES, WORK, embedding_quality, paired, run_model  # noqa: E402

import onnx_lowrank as ol  # noqa: E402
from onnx_lowrank.runtime import session  # noqa: E402

HEADS, DIM, LAYERS = 12, 32, 6


def _prefix(i: int) -> str:
    return f"/encoder/encoder/layer.{i}/attention/"


def head_grams(model: onnx.ModelProto, calib: dict[str, np.ndarray], batch: int = 64) -> list[np.ndarray]:
    """Per layer, the Gram of ``[Z 1]`` (Z: the output projection's input) over unpadded tokens."""
    outs = [f"{_prefix(i)}self/Reshape_4_output_0" for i in range(LAYERS)]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in outs)
    sess = session(probe, threads=2)
    grams = [np.zeros((HEADS * DIM + 1,) * 2) for _ in range(LAYERS)]
    n = len(calib["input_ids"])
    for a in range(0, n, batch):
        feed = {k: v[a:a + batch] for k, v in calib.items()}
        keep = feed["attention_mask"].reshape(-1).astype(bool)
        for g, z in zip(grams, sess.run(outs, feed)):
            z = np.hstack([z.reshape(-1, HEADS * DIM)[keep].astype(np.float64), np.ones((int(keep.sum()), 1))])
            g += z.T @ z
    return grams


def choose_heads(gram: np.ndarray, w: np.ndarray, keep: int, damping: float) -> tuple[list[int], np.ndarray, float]:
    """Greedy backward elimination of heads; the kept heads, the refitted ``[W; b]`` rows, and the
    relative output error of the refit."""
    ridge = gram + damping * np.mean(np.diag(gram)[:-1]) * np.diag(np.r_[np.ones(len(gram) - 1), 0.0])
    total = float(np.trace(w.T @ gram @ w))

    def fit(heads: list[int]) -> tuple[float, np.ndarray]:
        cols = [c for h in heads for c in range(h * DIM, (h + 1) * DIM)] + [len(gram) - 1]
        rhs = gram[cols] @ w
        x = np.linalg.solve(ridge[np.ix_(cols, cols)], rhs)
        err = total - 2 * float(np.trace(x.T @ rhs)) + float(np.trace(x.T @ gram[np.ix_(cols, cols)] @ x))
        return err, x

    heads = list(range(HEADS))
    while len(heads) > keep:
        heads.remove(min(heads, key=lambda h: fit([k for k in heads if k != h])[0]))
    err, x = fit(heads)
    return heads, x, err / total


def prune_heads(model: onnx.ModelProto, grams: list[np.ndarray], keep: int, damping: float) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    producer = {o: n for n in out.graph.node for o in n.output}

    def weight(i: int, part: str) -> onnx.TensorProto:
        return inits[producer[f"{_prefix(i)}{part}/MatMul_output_0"].input[1]]

    def bias(i: int, part: str) -> onnx.TensorProto:
        return next(inits[x] for x in producer[f"{_prefix(i)}{part}/Add_output_0"].input if x in inits)

    def put(t: onnx.TensorProto, array: np.ndarray) -> None:
        t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), t.name))

    for i in range(LAYERS):
        wo, bo = weight(i, "output/dense"), bias(i, "output/dense")
        w = np.vstack([numpy_helper.to_array(wo), numpy_helper.to_array(bo)]).astype(np.float64)
        heads, x, err = choose_heads(grams[i], w, keep, damping)
        print(f"layer {i}: heads kept {heads}, relative output error {err:.4f}", file=sys.stderr)
        cols = [c for h in heads for c in range(h * DIM, (h + 1) * DIM)]
        for part in ("self/query", "self/key", "self/value"):
            put(weight(i, part), numpy_helper.to_array(weight(i, part))[:, cols])
            put(bias(i, part), numpy_helper.to_array(bias(i, part))[cols])
        put(wo, x[:-1])
        put(bo, x[-1])
    onnx.checker.check_model(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, required=True, help="heads kept in every layer (of 12)")
    ap.add_argument("--ffn-keep", type=float, default=None, help="then the tool's width reduction at this fraction")
    ap.add_argument("--calib", type=int, default=None, help="calibration texts (default: all 1,965)")
    ap.add_argument("--damping", type=float, default=0.001)
    ap.add_argument("--runs64", type=int, default=8, help="timed pairs at batch 64")
    args = ap.parse_args(argv)
    model = onnx.load(str(WORK / "minilm.onnx"))
    cal, hold = np.load(WORK / "minilm_calib_128.npz"), np.load(WORK / "minilm_holdout_128.npz")
    calib = {k: cal[k][:args.calib] for k in MINILM_INPUTS}
    feeds = {k: hold[k] for k in MINILM_INPUTS}
    small = prune_heads(model, head_grams(model, calib), args.heads, args.damping)
    if args.ffn_keep is not None:
        small = ol.compress(small, calib=calib, calib_mask="attention_mask", ffn_keep=args.ffn_keep, energy=1, damping=0.001).model
    quality = embedding_quality(small, feeds, run_model(model, feeds, batch=32))
    p = paired(model, small, threads=1, batch=64, runs=args.runs64, warmup=1, input_shape=MINILM_SHAPES)
    print(f"heads {args.heads}, ffn-keep {args.ffn_keep}: held-out cosine {quality['cosine_mean']:.4f} "
          f"({quality['cosine_min']:.3f}); vs fp32 at batch 64: x{p['speedup']:.2f} "
          f"(p10-p90 x{p['speedup_p10']:.2f}-x{p['speedup_p90']:.2f}, {args.runs64} pairs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
