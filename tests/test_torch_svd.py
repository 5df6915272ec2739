"""SVD training for PyTorch: layers, regularizers, pruning, export, and the recipe in small."""

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import onnx_lowrank as ol  # noqa: E402
from onnx_lowrank.errors import UsageError  # noqa: E402
from onnx_lowrank.torch import (  # noqa: E402
    SVDConv2d,
    SVDLinear,
    export_onnx,
    orthogonality_loss,
    prune,
    sparsity_loss,
    svd_layers,
    svd_regularizer,
    to_svd,
)
from onnx_lowrank.torch.export import METADATA_KEY  # noqa: E402
from models import run  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent


def small_cnn(**conv_kw) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 12, 3, **conv_kw), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 10),
    )


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))


def set_spectrum(layer, values) -> None:
    """Give ``layer`` orthonormal factors of rank len(values) and singular values ``values``."""
    m, n = layer.matrix_shape
    r = len(values)
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    layer._init_factors(u, torch.tensor(values, dtype=torch.float32), v)


# --- equivalence at initialization -------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_linear_from_weights_matches_original(bias):
    torch.manual_seed(1)
    lin = nn.Linear(70, 30, bias=bias)
    svd = SVDLinear.from_linear(lin)
    x = torch.randn(4, 5, 70)  # any leading dims
    assert svd.rank == 30 and svd.U.shape == (30, 30) and svd.V.shape == (70, 30)
    torch.testing.assert_close(svd(x), lin(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(svd.dense_weight(), lin.weight, atol=1e-6, rtol=0)


CONV_CASES = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    dict(kernel_size=(5, 3), stride=(1, 3), padding=(0, 1), dilation=(2, 1), bias=False),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=(3, 4), padding="same", dilation=(1, 2)),
    dict(kernel_size=3, padding="valid"),
]


@pytest.mark.parametrize("mode", ["channel", "spatial"])
@pytest.mark.parametrize("kw", CONV_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_conv_from_weights_matches_original(mode, kw):
    torch.manual_seed(2)
    conv = nn.Conv2d(5, 7, **kw)
    svd = SVDConv2d.from_conv(conv, mode=mode)
    x = torch.randn(2, 5, 13, 11)
    torch.testing.assert_close(svd(x), conv(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(svd.dense_weight(), conv.weight, atol=1e-6, rtol=0)
    kh, kw_ = conv.kernel_size
    expected = (7, 5 * kh * kw_) if mode == "channel" else (5 * kh, 7 * kw_)
    assert svd.matrix_shape == expected


def test_to_svd_whole_model_is_equivalent_and_respects_include_exclude():
    model = small_cnn(stride=2)
    x = torch.randn(3, 3, 10, 10)
    y = model(x)
    converted = to_svd(copy.deepcopy(model), conv_mode="spatial")
    names = [n for n, _ in svd_layers(converted)]
    assert names == ["0", "2", "6", "8"]
    torch.testing.assert_close(converted(x), y, atol=1e-5, rtol=0)

    only = to_svd(copy.deepcopy(model), include=r"^[68]$", exclude="8")
    assert [n for n, _ in svd_layers(only)] == ["6"]
    assert type(only[0]) is nn.Conv2d and type(only[8]) is nn.Linear


def test_to_svd_leaves_grouped_convs_and_attention_alone():
    model = nn.ModuleDict({"dw": nn.Conv2d(4, 4, 3, groups=4), "attn": nn.MultiheadAttention(8, 2), "refl": nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")})
    to_svd(model)
    assert type(model["dw"]) is nn.Conv2d and type(model["refl"]) is nn.Conv2d
    assert type(model["attn"].out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    assert list(svd_layers(model)) == []


def test_random_init_is_orthonormal_with_default_scale():
    torch.manual_seed(0)
    model = to_svd(nn.Sequential(nn.Linear(300, 200)), init="random")
    layer = model[0]
    assert orthogonality_loss(layer).item() < 1e-10
    # PyTorch's default init has E||W||_F^2 = out/3; the random factors reproduce it exactly.
    assert math.isclose(float(layer.s.detach().pow(2).sum()), 200 / 3, rel_tol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda m: to_svd(m, conv_mode="depthwise"), "got conv_mode='depthwise'; expected one of 'channel', 'spatial'"),
    (lambda m: to_svd(m, init="zeros"), "got init='zeros'; expected one of 'weights', 'random'"),
    (lambda m: to_svd(m, include="("), "got include='(', which is not a valid regular expression"),
    (lambda m: prune(m), "got energy=None and threshold=None; pass exactly one of them"),
    (lambda m: prune(m, energy=1.5), "got energy=1.5; expected a number in (0, 1]"),
    (lambda m: svd_regularizer(m, sparsity="l2"), "got sparsity='l2'; expected one of 'l1', 'hoyer', 'hoyer_square' or None"),
])
def test_bad_arguments_say_what_was_received_and_expected(call, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        call(mlp())


# --- regularizers ------------------------------------------------------------------------------

def test_orthogonality_loss_zero_for_orthonormal_factors_and_exact_otherwise():
    layer = SVDLinear(40, 24, rank=6)
    set_spectrum(layer, [3.0, 2.0, 1.0, 1.0, 0.5, 0.1])
    assert orthogonality_loss(layer).item() < 1e-10
    with torch.no_grad():
        layer.U.mul_(2.0)  # U^T U = 4 I, so ||U^T U - I||_F^2 / r^2 = 9 r / r^2 = 9 / r
    assert math.isclose(orthogonality_loss(layer).item(), 9 / 6, rel_tol=1e-5)
    model = nn.Sequential(layer, nn.ReLU(), SVDLinear(24, 5))
    set_spectrum(model[2], [1.0, 0.5])
    assert math.isclose(svd_regularizer(model, orth=2.0, sparsity=None).item(), 2 * 9 / 6, rel_tol=1e-5)


@pytest.mark.parametrize("kind, uniform", [("hoyer", math.sqrt(8)), ("hoyer_square", 8.0)])
def test_hoyer_is_minimal_for_one_hot_s(kind, uniform):
    one_hot = torch.zeros(8)
    one_hot[3] = -2.5
    assert math.isclose(sparsity_loss(one_hot, kind).item(), 1.0, rel_tol=1e-6)
    assert math.isclose(sparsity_loss(torch.full((8,), 0.7), kind).item(), uniform, rel_tol=1e-5)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        s = torch.randn(8, generator=g)
        assert sparsity_loss(s, kind).item() > 1.0 + 1e-4
    # The gradient at a one-hot vector vanishes along the nonzero entry (scale invariance).
    s = one_hot.clone().requires_grad_(True)
    sparsity_loss(s, kind).backward()
    assert abs(s.grad[3].item()) < 1e-6


def test_l1_and_regularizer_sum_over_layers():
    model = nn.Sequential(SVDLinear(20, 10, rank=3), SVDLinear(10, 4, rank=2))
    set_spectrum(model[0], [3.0, -2.0, 1.0])
    set_spectrum(model[1], [4.0, 0.0])
    assert math.isclose(svd_regularizer(model, orth=0.0, sparsity="l1", strength=0.5).item(), 0.5 * (6 + 4), rel_tol=1e-6)
    assert math.isclose(svd_regularizer(model, orth=0.0, sparsity="hoyer", strength=1.0).item(), 6 / math.sqrt(14) + 1, rel_tol=1e-5)


# --- pruning -----------------------------------------------------------------------------------

# s^2 = 16, 9, 4, 1 (unordered, signed): cumulative energy 16/30, 25/30, 29/30, 30/30.
SPECTRUM = [1.0, -4.0, 2.0, 3.0]


@pytest.mark.parametrize("rule, rank", [
    (dict(energy=0.5), 1), (dict(energy=16 / 30), 1), (dict(energy=0.6), 2), (dict(energy=0.9), 3),
    (dict(energy=29 / 30), 3), (dict(energy=0.99), 4), (dict(energy=1.0), 4),
    (dict(threshold=2.5), 2), (dict(threshold=0.0), 4), (dict(threshold=10.0), 1),
])
def test_prune_keeps_the_right_rank_for_known_spectra(rule, rank):
    model = nn.Sequential(SVDLinear(30, 20, rank=4))
    layer = model[0]
    set_spectrum(layer, SPECTRUM)
    u, v = layer.U.detach().clone(), layer.V.detach().clone()
    (decision,) = prune(model, **rule)
    assert decision.rank_before == 4 and decision.rank_after == rank == layer.rank
    assert layer.U.shape == (20, rank) and layer.V.shape == (30, rank) and layer.s.shape == (rank,)
    # The largest |s| are kept, with their own singular vectors.
    keep = sorted(range(4), key=lambda i: -abs(SPECTRUM[i]))[:rank]
    torch.testing.assert_close(layer.s.detach(), torch.tensor([SPECTRUM[i] for i in keep]))
    torch.testing.assert_close(layer.U.detach(), u[:, keep])
    torch.testing.assert_close(layer.V.detach(), v[:, keep])
    assert math.isclose(decision.energy, sum(SPECTRUM[i] ** 2 for i in keep) / 30, rel_tol=1e-9)


def test_fine_tuning_keeps_pruned_shapes_and_checkpoints_reload():
    model = to_svd(mlp())
    for _, layer in svd_layers(model):
        set_spectrum(layer, [5.0, 1.0, 0.01, 0.001][: min(4, layer.rank)])
    prune(model, energy=0.95)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shapes["0.s"] == (1,) and shapes["0.U"] == (48, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y) + svd_regularizer(model, sparsity="hoyer", strength=1e-2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes
    fresh = to_svd(mlp())
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x))


# --- export ------------------------------------------------------------------------------------

def _pruned(model, energy=0.5):
    to_svd(model)
    prune(model, energy=energy)
    return model


def test_export_linear_round_trip_in_onnxruntime(tmp_path):
    # At energy 0.88 every rank sits exactly at break-even (largest r with r (m + n) < m n).
    model = _pruned(mlp(), energy=0.88)
    assert [(l.rank, l.break_even()) for _, l in svd_layers(model)] == [(27, 27), (19, 19), (7, 7)]
    x = torch.randn(5, 64)
    res = export_onnx(model, tmp_path / "mlp.onnx", x)
    proto = onnx.load(str(res.path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 13
    assert [(l.name, l.form, l.rank) for l in res.layers] == [("0", "factor pair", 27), ("2", "factor pair", 19), ("4", "factor pair", 7)]
    ops = [n.op_type for n in proto.graph.node]
    assert ops == ["MatMul", "MatMul", "Add", "Relu"] * 2 + ["MatMul", "MatMul", "Add"]
    init = {t.name: list(t.dims) for t in proto.graph.initializer}
    assert init["0.lowrank_A"] == [64, 27] and init["0.lowrank_B"] == [27, 48]
    # Dynamic batch: another batch size runs and matches.
    x2 = torch.randn(9, 64)
    (got,) = run(proto, {"input": x2.numpy()})
    np.testing.assert_allclose(got, model.eval()(x2).detach().numpy(), atol=1e-5, rtol=1e-4)
    assert res.max_abs_error < 1e-5
    meta = {p.key: p.value for p in proto.metadata_props}
    assert [l["rank"] for l in json.loads(meta[METADATA_KEY])["layers"]] == [27, 19, 7]
    assert res.weight_params == 27 * 112 + 19 * 80 + 7 * 42


def test_export_writes_dense_above_break_even_unless_asked(tmp_path):
    model = _pruned(mlp(), energy=0.9)
    assert all(l.rank > l.break_even() for _, l in svd_layers(model))
    x = torch.randn(4, 64)
    res = export_onnx(model, tmp_path / "dense.onnx", x)
    assert [l.form for l in res.layers] == ["dense"] * 3
    assert [n.op_type for n in onnx.load(str(res.path)).graph.node] == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    assert res.weight_params == 64 * 48 + 48 * 32 + 32 * 10
    pairs = export_onnx(model, tmp_path / "pairs.onnx", x, dense_above_break_even=False)
    assert [l.form for l in pairs.layers] == ["factor pair"] * 3
    (a,) = run(onnx.load(str(res.path)), {"input": x.numpy()})
    (b,) = run(onnx.load(str(pairs.path)), {"input": x.numpy()})
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("mode", ["channel", "spatial"])
def test_export_conv_round_trip_in_onnxruntime(tmp_path, mode):
    model = small_cnn(stride=2, padding=(1, 0), dilation=(1, 2))
    to_svd(model, conv_mode=mode)
    prune(model, energy=0.8)
    res = export_onnx(model, tmp_path / "cnn.onnx", torch.randn(2, 3, 12, 12), dense_above_break_even=False)
    proto = onnx.load(str(res.path))
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert len(convs) == 4
    x = torch.randn(3, 3, 12, 12)
    (got,) = run(proto, {"input": x.numpy()})
    np.testing.assert_allclose(got, model.eval()(x).detach().numpy(), atol=1e-5, rtol=1e-4)
    init = {t.name: list(t.dims) for t in proto.graph.initializer}
    r = model[2].rank
    if mode == "channel":
        assert init["2.lowrank_A"] == [r, 8, 3, 3] and init["2.lowrank_B"] == [12, r, 1, 1]
    else:
        assert init["2.lowrank_A"] == [r, 8, 3, 1] and init["2.lowrank_B"] == [12, r, 1, 3]


def test_export_rejects_old_opset_and_leaves_model_untouched(tmp_path):
    model = _pruned(mlp())
    model.train()
    with pytest.raises(UsageError, match="got opset=11; expected 13 or newer"):
        export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 64), opset=11)
    export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 64))
    assert model.training and isinstance(model[0], SVDLinear)


def test_onnx_pass_leaves_exported_layers_alone_and_says_why(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10))
    _pruned(model, energy=0.6)
    res = export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 256))
    pairs = [l for l in res.layers if l.form == "factor pair"]
    assert [l.name for l in pairs][:2] == ["0", "2"]

    report = ol.compress(res.path, energy=0.5, min_params=0)
    assert not report.modified and report.totals.factorized == 0
    matmuls = [d for d in report.layers if d.op_type == "MatMul"]
    assert len(matmuls) == 2 * len(pairs)
    for k, d in enumerate(matmuls):
        first, second = matmuls[2 * (k // 2)].node, matmuls[2 * (k // 2) + 1].node
        assert not d.factorized
        assert d.reason == f"already low-rank: factor pair {first} -> {second} (inner rank {pairs[k // 2].rank})"
    # The dry-run description gives the same reasons.
    described = res.describe(min_params=0)
    assert [d.reason for d in described.layers if d.op_type == "MatMul"] == [d.reason for d in matmuls]


# --- the recipe, tiny --------------------------------------------------------------------------

def test_tiny_recipe_runs_end_to_end(tmp_path):
    spec = importlib.util.spec_from_file_location("svd_training_mnist", ROOT / "benchmarks" / "svd_training_mnist.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = recipe  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(recipe)
    finally:
        del sys.modules[spec.name]
    cfg = recipe.Config(data="digits", threads=1, hidden=(64, 32), **recipe.TINY)
    report = recipe.run(cfg, tmp_path)
    rows = report["rows"]
    methods = [r["method"] for r in rows]
    assert methods[0] == "a. dense" and any(m.startswith("b. ARSVD") for m in methods)
    assert sum(m.startswith("c. SVD training, Hoyer") for m in methods) == 1
    assert sum(m.startswith("c. SVD training, L1") for m in methods) == 1
    assert [r["model"] for r in rows].count("CNN") == 3
    dense = rows[0]
    assert dense["weight_params"] == 64 * 64 + 64 * 32 + 32 * 10 == dense["macs"]
    assert report["samples"]["train"] + report["samples"]["held_out"] == 300
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0
        assert r["weight_params"] > 0 and r["macs"] >= r["weight_params"] * (r["model"] == "MLP")
    # Trained on 240 digits for two epochs, the dense MLP is far better than chance (10 %).
    assert dense["accuracy"] > 0.5
    assert len(report["summary"]) == 2
    text = recipe.render({**report, "command": "x", "machine": "m", "torch": "t", "onnxruntime": "o"})
    assert text.count("| MLP |") == len([r for r in rows if r["model"] == "MLP"])


def test_a_failed_export_check_writes_nothing_and_bad_example_inputs_say_so(tmp_path, monkeypatch):
    from onnx_lowrank.errors import VerificationFailed
    from onnx_lowrank.torch import export as export_module

    torch.manual_seed(0)
    path = tmp_path / "good.onnx"
    export_onnx(to_svd(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))), path, torch.randn(1, 20))
    good = path.read_bytes()
    other = to_svd(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2)))
    real = export_module._check

    def differs(*args, **kwargs):  # onnxruntime is within float32 rounding of torch; make the check fail for sure
        real(*args, **kwargs)
        raise VerificationFailed("exported output 0 differs; nothing was written (export with check=False to write it anyway).")

    monkeypatch.setattr(export_module, "_check", differs)
    with pytest.raises(VerificationFailed, match="nothing was written"):
        export_onnx(other, path, torch.randn(4, 20))
    monkeypatch.setattr(export_module, "_check", real)
    assert path.read_bytes() == good  # the earlier file stands
    with pytest.raises(UsageError, match="does not run on example_inputs"):
        export_onnx(other, tmp_path / "x.onnx", torch.randn(1, 7))
    assert not (tmp_path / "x.onnx").exists()


def test_misuse_of_the_torch_api_is_a_usage_error_and_nothing_silently_does_nothing(caplog):
    m = to_svd(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2)))
    with pytest.raises(UsageError, match="SVD layers already"):  # (converting again ignored the rank)
        to_svd(m, rank=2)
    with pytest.raises(UsageError, match="takes a torch nn.Module"):
        to_svd("model")
    for call, match in ((lambda: prune(m, energy="0.9"), "energy='0.9'; expected a number"),
                        (lambda: svd_regularizer(m, strength="1e-2"), "expected a number"),
                        (lambda: svd_regularizer(m, orth=None), "orth=None"),
                        (lambda: to_svd(nn.Sequential(nn.Linear(4, 4)), rank="4"), "expected an integer"),
                        (lambda: to_svd(nn.Sequential(nn.Linear(4, 4)), rank=2.7), "rank=2.7; expected an integer")):
        with pytest.raises(UsageError, match=match):
            call()
    with caplog.at_level("WARNING", logger="onnx_lowrank"):
        to_svd(nn.Sequential(nn.LSTM(4, 4)))
    assert "found no nn.Linear or nn.Conv2d layer" in caplog.text
    assert [l.rank for _, l in svd_layers(to_svd(nn.Sequential(nn.Linear(4, 4)), rank=torch.tensor(2)))] == [2]
