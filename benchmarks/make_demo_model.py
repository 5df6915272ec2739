"""Regenerate the demo model shipped in ``onnx_lowrank/data``.

An MLP (64-512-256-10, ReLU, L2 weight decay 0.1) trained with scikit-learn on the real 8x8 handwritten digits of
``sklearn.datasets.load_digits``, written as plain ONNX Gemm nodes, with a held-out split
(never seen in training) and its labels for the demo's accuracy check.

    python benchmarks/make_demo_model.py

Writes ``onnx_lowrank/data/digits_mlp.onnx`` and ``onnx_lowrank/data/digits_holdout.npz``.
Deterministic for a given scikit-learn version (fixed seeds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

OUT = Path(__file__).resolve().parent.parent / "onnx_lowrank" / "data"


def build_onnx(clf: MLPClassifier) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array([1.0 / 16.0], np.float32), "pixel_scale")]
    nodes = [helper.make_node("Mul", ["pixels", "pixel_scale"], ["x0"], name="scale")]
    x = "x0"
    n_layers = len(clf.coefs_)
    for i, (w, b) in enumerate(zip(clf.coefs_, clf.intercepts_)):
        wn, bn = f"fc{i + 1}.weight", f"fc{i + 1}.bias"
        # stored [out, in] with transB=1, as torch.onnx.export writes nn.Linear
        inits += [numpy_helper.from_array(w.T.astype(np.float32).copy(), wn), numpy_helper.from_array(b.astype(np.float32), bn)]
        y = "logits" if i == n_layers - 1 else f"h{i + 1}"
        nodes.append(helper.make_node("Gemm", [x, wn, bn], [y if i == n_layers - 1 else f"g{i + 1}"], name=f"fc{i + 1}", transB=1))
        if i < n_layers - 1:
            nodes.append(helper.make_node("Relu", [f"g{i + 1}"], [y], name=f"relu{i + 1}"))
        x = y
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="onnx-lowrank demo")
    model.ir_version = 8
    model.doc_string = "MLP 64-512-256-10 trained on sklearn's 8x8 digits; input: raw pixel values 0..16."
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    clf = MLPClassifier(hidden_layer_sizes=(512, 256), alpha=0.1, max_iter=300, random_state=0)
    clf.fit(x_tr / 16.0, y_tr)
    print(f"held-out accuracy (sklearn): {clf.score(x_te / 16.0, y_te):.4f} on {len(y_te)} digits")
    OUT.mkdir(parents=True, exist_ok=True)
    onnx.save(build_onnx(clf), OUT / "digits_mlp.onnx")
    np.savez_compressed(OUT / "digits_holdout.npz", pixels=x_te, labels=y_te)
    print(f"wrote {OUT / 'digits_mlp.onnx'} and {OUT / 'digits_holdout.npz'}")


if __name__ == "__main__":
    main()
