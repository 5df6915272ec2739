"""The integrations: onnx-graphsurgeon graphs, the onnx-ir pass, the Olive pass, and their absence."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs  # gs and onnx_ir come with the dev extra: these tests never skip
import onnx_ir as ir
import pytest
from onnx import helper

import onnx_lowrank as ol
from models import init, lowrank, make_model, run, vi

ROOT = Path(__file__).resolve().parents[1]
X = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)


#   x[b,64] --MatMul(W1[64,48])--> h --Relu--> r --Gemm(r, W2[48,32], C[32])--> y[b,32]
#   W2: an initializer, or the output of a Constant node (const_weight=True)
#   x --Neg--> unused: a dangling node (dangling=True)
def mlp(const_weight: bool = False, dangling: bool = False, opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    w2 = init("W2", lowrank(48, 32, 5, seed=2))
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2", "C"], ["y"], name="gemm")]
    inits = [init("W1", lowrank(64, 48, 6, seed=1)), init("C", np.linspace(-1, 1, 32, dtype=np.float32))]
    if const_weight:
        nodes.insert(0, helper.make_node("Constant", [], ["W2"], name="w2_const", value=w2))
    else:
        inits.append(w2)
    if dangling:
        nodes.append(helper.make_node("Neg", ["x"], ["unused"], name="neg"))
    return make_model(nodes, [vi("x", ["b", 64])], [vi("y", ["b", 32])], inits, opset=opset, ir_version=ir_version)


def save_external(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".weights", size_threshold=0)
    return path


def exact(**more):
    """Options under which the exactly low-rank weights above factorize without error."""
    return {"energy": 0.9999, "min_params": 0, **more}


# --------------------------------------------------------------------------------------------
# onnx-graphsurgeon
# --------------------------------------------------------------------------------------------


def test_graphsurgeon_graph_in_compressed_graph_out():
    model = mlp(opset=15, ir_version=7)
    graph = gs.import_onnx(model)
    before = gs.export_onnx(graph).SerializeToString()

    res = ol.compress(graph, **exact())

    assert isinstance(res, ol.CompressResult) and isinstance(res.model, gs.Graph)
    assert res.model is not graph and res.modified and res.totals.factorized == 2
    assert gs.export_onnx(graph).SerializeToString() == before, "the input graph must not change"
    out = gs.export_onnx(res.model)
    assert out.ir_version == 7 and [(o.domain, o.version) for o in out.opset_import] == [("", 15)]
    assert [o.name for o in out.graph.output] == ["y"] and [i.name for i in out.graph.input] == ["x"]
    assert [n.name for n in out.graph.node] == ["mm__lowrank_1", "mm__lowrank_2", "relu", "gemm__lowrank_1", "gemm__lowrank_2"]
    np.testing.assert_allclose(run(out, {"x": X})[0], run(model, {"x": X})[0], rtol=1e-4, atol=1e-4)
    # the same report as for a ModelProto
    assert [(l.node, l.rank) for l in res.layers] == [("mm", 6), ("gemm", 5)]
    assert json.loads(res.to_json())["totals"]["factorized"] == 2


#   x[b,64] --MatMul(W[64,48])--> y[b,48], built with graphsurgeon: W holds a NumPy array
def test_graphsurgeon_graph_built_in_graphsurgeon():
    w = lowrank(64, 48, 4, seed=3)
    x, y = gs.Variable("x", np.float32, ["b", 64]), gs.Variable("y", np.float32, ["b", 48])
    graph = gs.Graph(nodes=[gs.Node("MatMul", "mm", inputs=[x, gs.Constant("W", w)], outputs=[y])],
                     inputs=[x], outputs=[y], opset=17)

    res = ol.compress(graph, **exact())

    assert [(l.node, l.rank) for l in res.layers] == [("mm", 4)]
    np.testing.assert_allclose(run(gs.export_onnx(res.model), {"x": X})[0], X @ w, rtol=1e-4, atol=1e-4)


def test_graphsurgeon_save_and_report(tmp_path):
    model = mlp()
    res = ol.compress(gs.import_onnx(model), **exact())
    written = res.save(tmp_path / "small.onnx", report=tmp_path / "report.json")
    assert written == [tmp_path / "small.onnx"]
    saved = onnx.load(str(tmp_path / "small.onnx"))
    onnx.checker.check_model(saved, full_check=True)
    np.testing.assert_allclose(run(saved, {"x": X})[0], run(model, {"x": X})[0], rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "report.json").read_text())["totals"]["params_after"] == res.totals.params_after
    assert any(p.key == "onnx_lowrank" for p in saved.metadata_props)


def test_graphsurgeon_lazy_external_data(tmp_path):
    """Weights in external data are read from base_dir only when factorized; the rest stay references."""
    model = mlp()
    save_external(mlp(), tmp_path / "m.onnx")
    graph = gs.import_onnx(onnx.load(str(tmp_path / "m.onnx"), load_external_data=False))

    with pytest.raises(ol.UsageError, match="base_dir="):
        ol.compress(graph, **exact())
    res = ol.compress(graph, base_dir=tmp_path, **exact(exclude="gemm"))

    assert [l.factorized for l in res.layers] == [True, False]
    consts = {name: t for name, t in res.model.tensors().items() if isinstance(t, gs.Constant)}
    w2 = consts["W2"]
    assert w2.data_location == onnx.TensorProto.EXTERNAL, "a weight left alone keeps its external reference"
    factors = [t for name, t in consts.items() if name not in ("W2", "C")]
    assert len(factors) == 2 and all(t.data_location != onnx.TensorProto.EXTERNAL for t in factors)
    assert all(np.isfinite(t.values).all() for t in factors), "factors are in memory, readable without the pass"
    # the graph, exported and saved beside the input (its references are relative), runs
    onnx.save(gs.export_onnx(res.model), str(tmp_path / "edited.onnx"))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "edited.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": X})[0], run(model, {"x": X})[0], rtol=1e-4, atol=1e-4)
    # and save() writes a self-contained copy anywhere
    (tmp_path / "out").mkdir()
    written = res.save(tmp_path / "out" / "small.onnx")
    assert len(written) == 2
    sess = ort.InferenceSession(str(written[0]), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": X})[0], run(model, {"x": X})[0], rtol=1e-4, atol=1e-4)


def test_graphsurgeon_refused_result_is_a_graph_too():
    with pytest.raises(ol.VerificationFailed) as info:
        ol.compress(gs.import_onnx(mlp()), rank=1, min_params=0, verify={"max_drop": 0.0, "metric": "rel_l2"})
    assert isinstance(info.value.result.model, gs.Graph)


# --------------------------------------------------------------------------------------------
# onnx-ir
# --------------------------------------------------------------------------------------------


def test_ir_pass_in_a_pass_manager():
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass

    from onnx_lowrank.integrations.ir import LowRankPass

    model = mlp(const_weight=True, dangling=True)
    given = ir.from_proto(model)
    lowrank = LowRankPass(**exact())
    manager = ir.passes.PassManager([LiftConstantsToInitializersPass(size_limit=0), lowrank, RemoveUnusedNodesPass()])

    result = manager(given)

    assert isinstance(result, ir.passes.PassResult) and result.modified
    # the lift works in place on the model given; LowRankPass is functional and left that model alone
    assert result.model is not given and [n.op_type for n in given.graph] == ["MatMul", "Relu", "Gemm", "Neg"]
    ops = [n.op_type for n in result.model.graph]
    assert ops == ["MatMul", "MatMul", "Relu", "Gemm", "Gemm"], "Constant lifted, weights factorized, Neg removed"
    assert lowrank.result is not None and lowrank.result.totals.factorized == 2
    assert [l.node for l in lowrank.result.layers] == ["mm", "gemm"]
    out = ir.to_proto(result.model)
    np.testing.assert_allclose(run(out, {"x": X})[0], run(model, {"x": X})[0], rtol=1e-4, atol=1e-4)


def test_ir_pass_factorizes_once_under_repeated_steps():
    from onnx_lowrank.integrations.ir import LowRankPass

    lowrank = LowRankPass(**exact())
    result = ir.passes.PassManager([lowrank], steps=3)(ir.from_proto(mlp()))
    assert result.modified and [n.op_type for n in result.model.graph].count("MatMul") == 2
    # the later steps found the stamp and left the model alone; the report of the run that factorized it stands
    assert lowrank.result is not None and lowrank.result.totals.factorized == 2
    again = lowrank(result.model)
    assert not again.modified and again.model is not result.model and lowrank.result.totals.factorized == 2


def test_ir_pass_checks_its_run_settings_when_made_and_its_input_when_run():
    from onnx_lowrank.integrations.ir import LowRankPass

    for kw, match in ((dict(verify=3), "as verify"), (dict(calib=5, data_aware=True), "calib= takes calibration data"),
                      (dict(progress=3), "progress= takes a callable"),
                      (dict(calib="no/such.npz", data_aware=True), "calib= 'no/such.npz': no such file or directory")):
        with pytest.raises(ol.UsageError, match=match):
            LowRankPass(**kw)
    with pytest.raises(ol.UsageError, match="runs on an onnx_ir.Model, got a ModelProto"):
        LowRankPass(**exact())(mlp())


def test_ir_pass_reports_unmodified_models():
    from onnx_lowrank.integrations.ir import LowRankPass

    lowrank = LowRankPass(energy=0.9)  # min_params 4096 leaves these weights alone
    result = lowrank(ir.from_proto(mlp()))
    assert not result.modified and lowrank.result.totals.factorized == 0
    assert {l.skip_code for l in lowrank.result.layers} == {"too_small"}


def test_ir_pass_with_external_data(tmp_path):
    from onnx_lowrank.integrations.ir import LowRankPass

    model = mlp()
    loaded = ir.load(str(save_external(mlp(), tmp_path / "m.onnx")))
    result = LowRankPass(**exact(exclude="gemm"))(loaded)
    assert result.modified
    ir.save(result.model, str(tmp_path / "out.onnx"), external_data="out.onnx.data")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": X})[0], run(model, {"x": X})[0], rtol=1e-4, atol=1e-4)


def test_ir_pass_checks_options_when_made():
    from onnx_lowrank.integrations.ir import LowRankPass

    with pytest.raises(ol.UsageError, match="energy"):
        LowRankPass(energy=2.0)
    with pytest.raises(ol.UsageError, match="did you mean energy="):
        LowRankPass(enrgy=0.9)


# --------------------------------------------------------------------------------------------
# Olive
# --------------------------------------------------------------------------------------------

@pytest.fixture
def olive_quiet(monkeypatch):
    """Olive sends telemetry unless told not to; tests send nothing anywhere."""
    monkeypatch.setenv("OLIVE_DISABLE_TELEMETRY", "1")


@pytest.mark.usefixtures("olive_quiet")
def test_olive_example_workflow(tmp_path):
    """examples/olive: the demo MLP, this pass, onnxruntime quantization, then evaluation."""
    spec = importlib.util.spec_from_file_location("olive_example", ROOT / "examples" / "olive" / "run.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    result = example.main(["--output", str(tmp_path / "out"), "--energy", "0.93"])

    before = result.get_input_model_metrics()
    (output,) = result.get_output_models()
    after = output.metrics_value
    assert after["size-bytes"]["value"] < before["size-bytes"]["value"] / 10
    assert after["accuracy-accuracy_score"]["value"] >= before["accuracy-accuracy_score"]["value"] - 0.02
    report = json.loads((tmp_path / "out" / "lowrank_report.json").read_text())  # carried along by Olive
    assert report["config"]["energy"] == 0.93 and report["totals"]["factorized"] == 2  # fc3 is under min_params
    ops = [n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx")).graph.node]
    assert ops.count("MatMulInteger") == 5, "two layers factorized into two products each, fc3 alone; all quantized"


@pytest.mark.usefixtures("olive_quiet")
def test_olive_pass_takes_compress_options(tmp_path):
    from olive.model import ONNXModelHandler
    from olive.passes.olive_pass import create_pass_from_dict

    from onnx_lowrank.demo import DEMO_MODEL
    from onnx_lowrank.integrations.olive import LowRankFactorization

    lowrank = create_pass_from_dict(LowRankFactorization, {"rank": 8, "exclude": "fc2", "report": False},
                                    disable_search=True)
    out = lowrank.run(ONNXModelHandler(model_path=str(DEMO_MODEL)), str(tmp_path / "lowrank"))
    model = onnx.load(out.model_path)
    assert not (Path(out.model_path).parent / "lowrank_report.json").exists()
    stamp = json.loads(next(p.value for p in model.metadata_props if p.key == "onnx_lowrank"))
    assert stamp["config"]["rank"] == 8 and stamp["config"]["exclude"] == "fc2" and stamp["factorized"] == 1
    assert sorted(tuple(t.dims) for t in model.graph.initializer if 8 in t.dims) == [(8, 64), (512, 8)]  # fc1 (Gemm, transB)

    bad = create_pass_from_dict(LowRankFactorization, {"energy": 2.0}, disable_search=True)
    with pytest.raises(ol.UsageError, match="energy must be"):
        bad.run(ONNXModelHandler(model_path=str(DEMO_MODEL)), str(tmp_path / "bad"))


# --------------------------------------------------------------------------------------------
# Optional packages stay optional
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module, package, extra", [
    ("onnx_lowrank.integrations.ir", "onnx_ir", "ir"),
    ("onnx_lowrank.integrations.olive", "olive", "olive"),
])
def test_missing_package_says_what_to_install(monkeypatch, module, package, extra):
    monkeypatch.setitem(sys.modules, package, None)  # import of it fails as if not installed
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ol.UsageError, match=rf'pip install "onnx-lowrank\[{extra}\]"'):
        importlib.import_module(module)


def test_missing_graphsurgeon_says_what_to_install(monkeypatch):
    from onnx_lowrank.integrations import graphsurgeon

    graph = gs.import_onnx(mlp())
    monkeypatch.setitem(sys.modules, "onnx_graphsurgeon", None)
    with pytest.raises(ol.UsageError, match=r'pip install "onnx-lowrank\[gs\]"'):
        graphsurgeon.compress_graph(graph)


def test_compress_imports_no_integration_package(tmp_path):
    onnx.save(mlp(), str(tmp_path / "m.onnx"))
    code = (f"import sys, onnx_lowrank as ol; ol.compress({str(tmp_path / 'm.onnx')!r}, energy=0.9, min_params=0); "
            "bad = {'onnx_graphsurgeon', 'onnx_ir', 'olive'} & set(sys.modules); assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_model_of_another_type_is_refused_naming_every_accepted_one():
    from onnx_lowrank.errors import UsageError

    with pytest.raises(UsageError, match="a path, an onnx.ModelProto or an onnx_graphsurgeon.Graph"):
        ol.compress(42)
