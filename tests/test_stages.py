"""Each stage of the pipeline on its own: run the stages before it, then check what it returns.

The model for most of them:

    x[4,64] --MatMul(W1[64,64], rank 4)--> h --MatMul(W2[64,32], rank 6)--> y[4,32]
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import onnx_lowrank as ol
from onnx_lowrank import passes, pipeline
from onnx_lowrank.passes.adaptive import Adapt, Adapted, CheckAdaptive, Checked
from onnx_lowrank.passes.calibrate import Calibrate, Calibration
from onnx_lowrank.passes.decide import Decide, Decided
from onnx_lowrank.passes.discover import Discover, Discovery
from onnx_lowrank.passes.fold import Fold, Folded
from onnx_lowrank.passes.latency import ModelTimed, Timed, TimeLayers, TimeModel
from onnx_lowrank.passes.load import Load, Loaded
from onnx_lowrank.passes.quantize import Quantize, Quantized
from onnx_lowrank.passes.refit import Refine, Refits
from onnx_lowrank.passes.report import Report, Reported
from onnx_lowrank.passes.rewrite import Rewrite, Rewritten
from onnx_lowrank.passes.spectra import Spectra, TakeSpectra
from onnx_lowrank.passes.statistics import CaptureStatistics, Statistics
from onnx_lowrank.passes.verify import Verified, Verify
from onnx_lowrank.passes.width import FindBlocks, FoundBlocks, Narrow, Narrowed
from onnx_lowrank.plan import SkipCode
from onnx_lowrank.verify import VerifyConfig
from models import init, lowrank, make_model, run, vi

RNG = np.random.default_rng(11)


def chain():
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), helper.make_node("MatMul", ["h", "W2"], ["y"], name="mm2")]
    return make_model(nodes, [vi("x", ["b", 64])], [vi("y", ["b", 32])], [init("W1", lowrank(64, 64, 4, 1)), init("W2", lowrank(64, 32, 6, 2))])


def feeds(n: int = 3):
    return [{"x": RNG.standard_normal((8, 64)).astype(np.float32)} for _ in range(n)]


def upto(stage, model=None, *, verify=None, probe=None, dry_run=False, calib=None, **options) -> pipeline.Context:
    """The context after every stage of the pipeline up to and including ``stage``."""
    stages = []
    for s in passes.PIPELINE:
        stages.append(s)
        if type(s) is stage:
            break
    request = pipeline.Request(source=model if model is not None else chain(), config=ol.CompressConfig(min_params=0, **options),
                               verify=verify, dry_run=dry_run, calib=calib, probe=probe)
    return pipeline.run(stages, pipeline.Context(request))


def test_every_stage_of_the_pipeline_has_a_test_here():
    tested = {Load, Fold, Discover, FindBlocks, Calibrate, CaptureStatistics, Narrow, TakeSpectra, Decide, Adapt, TimeLayers, Refine,
              Rewrite, CheckAdaptive, Quantize, TimeModel, Report, Verify}
    assert {type(s) for s in passes.PIPELINE} == tested


def test_load_copies_the_model_and_counts_its_parameters():
    m = chain()
    ctx = upto(Load, m)
    loaded = ctx.need(Loaded)
    assert loaded.model is not m and loaded.params == 64 * 64 + 64 * 32 and not loaded.external and loaded.path is None
    assert ctx.model is loaded.model


def test_fold_hands_on_the_loaded_copy_with_layout_chains_folded():
    m = chain()
    w1 = onnx.numpy_helper.to_array(m.graph.initializer[0])
    m.graph.initializer[0].CopyFrom(init("W1", w1.T.copy()))
    m.graph.node.insert(0, helper.make_node("Transpose", ["W1"], ["W1t"], perm=[1, 0]))
    m.graph.node[1].input[1] = "W1t"
    ctx = upto(Fold, m)
    folded = ctx.need(Folded)
    assert folded.model is ctx.need(Loaded).model and ctx.model is folded.model  # the working copy, changed in place
    assert [c["name"] for c in folded.chains] == ["W1"] and [n.op_type for n in ctx.model.graph.node] == ["MatMul", "MatMul"]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(ctx.model.graph.initializer[0]), w1)
    assert [n.op_type for n in m.graph.node][0] == "Transpose"  # (the caller's model is not)
    assert upto(Fold).need(Folded).chains == []


def test_discover_groups_weights_and_names_skips_by_code():
    m = chain()
    m.graph.node.append(helper.make_node("MatMul", ["y", "y2"], ["z"], name="dyn"))
    m.graph.input.append(vi("y2", [32, 32]))
    found = upto(Discover, m, include="mm").need(Discovery)
    assert [g.weight.name for g in found.candidates] == ["W1", "W2"] and [g.key for g in found.groups] == [0, 1]
    dyn = found.layers[2]
    assert dyn.skip.code is SkipCode.NO_CONSTANT_WEIGHT and dyn.skip.stage == "discover"
    assert upto(Discover, exclude="W2").need(Discovery).layers[1].skip.code is SkipCode.EXCLUDED


def test_calibrate_runs_only_when_the_options_need_data():
    assert upto(Calibrate).get(Calibration) is None
    cal = upto(Calibrate, calib=feeds(), data_aware=True, energy=0.9).need(Calibration)
    assert sum(f["x"].shape[0] for f in cal.feeds) == 24 and sum(f["x"].shape[0] for f in cal.sensitivity_feeds(8)) == 8
    with pytest.raises(ol.UsageError, match="needs calibration data"):
        upto(Calibrate, data_aware=True, energy=0.9)


def test_statistics_whitens_each_matmul_by_its_input():
    stats = upto(CaptureStatistics, calib=feeds(), data_aware=True, energy=0.9).need(Statistics)
    assert sorted(stats.capture.grams) == [0, 1] and stats.to_dict()["weights_whitened"] == 2 and stats.capture.runs == 3
    g, side = stats.capture.grams[0]
    assert side == "left" and g.shape == (64, 64)


def test_blocks_and_width_narrow_a_feed_forward_block_and_claim_its_weights():
    m = chain()
    m.graph.node.insert(1, helper.make_node("Relu", ["h"], ["a"]))
    m.graph.node[2].input[0] = "a"
    ctx = upto(Narrow, m, calib=feeds(), ffn_keep=0.5, energy=0.9)
    (block,) = ctx.need(FoundBlocks).found.blocks
    assert (block.hidden, block.activation, block.up_bias, block.down_bias) == (64, ("Relu",), None, None)
    assert sorted(ctx.need(Statistics).capture.grams) == [1]  # width alone: only the block's hidden activations
    narrowed = ctx.need(Narrowed)
    assert narrowed.plans[0].kept == 32 and sorted(narrowed.claimed) == [0, 1] and narrowed.plans[0].fit.shift is None
    assert narrowed.to_dict()["blocks"][0]["kept"] == 32
    assert upto(TakeSpectra, m, calib=feeds(), ffn_keep=0.5, energy=0.9).need(Spectra).plans == {}  # claimed: no spectra
    # a chain with no activation between its products is no block, and no near miss either
    plain = upto(Narrow, calib=feeds(), ffn_keep=0.5, energy=0.9).need(Narrowed)
    assert plain.plans == {} and plain.skipped == []


def test_spectra_keeps_only_the_vectors_a_decider_can_use():
    plans = upto(TakeSpectra, energy=0.99).need(Spectra).plans
    assert {k: p.view().spectrum.kept for k, p in plans.items()} == {0: 4, 1: 6}
    budget = upto(TakeSpectra, target_params=0.5).need(Spectra).plans
    assert budget[0].view().spectrum.kept == 31  # break-even of 64x64: (64 * 64 - 1) // 128


def test_decide_per_layer_and_under_a_budget():
    d = upto(Decide, energy=0.99).need(Decided).decisions
    assert (d[0].rank, d[1].rank) == (4, 6) and all(x.factorize for x in d.values())
    flat = upto(Decide, rank=60).need(Decided).decisions
    assert flat[0].skip.code is SkipCode.SAVES_NOTHING and flat[0].skip.stage == "decide"
    budget = upto(Decide, target_params=0.25).need(Decided).decisions
    assert sum(p.rank * (64 + (64 if k == 0 else 32)) for k, p in budget.items() if p.factorize) <= 0.25 * (64 * 64 + 64 * 32)


def test_adaptive_decides_instead_of_decide_and_its_check_measures_the_result():
    ctx = upto(CheckAdaptive, calib=feeds(2), adaptive=True, target_params=0.5)
    adapted = ctx.need(Adapted)
    assert ctx.get(Decided) is adapted and "decide" not in ctx.results
    assert all(d.sensitivity is not None for d in adapted.decisions.values() if d.factorize)
    checked = ctx.need(Checked)
    assert checked.to_dict()["final_drop"] >= 0 and checked.to_dict()["passes"] == adapted.to_dict()["passes"] + 1


class Probe:
    """Every factored layer as fast as asked; the whole model 1.2x faster."""

    def __init__(self, layer_speedup: float = 2.0, model_speedup: float = 1.2):
        self.layer, self.model = layer_speedup, model_speedup

    def layer_times(self, case):
        return 1.0, 1.0 / self.layer

    def model_speedup(self, before, after, *, threads, shapes):
        return self.model


def test_latency_keeps_only_layers_that_are_faster_factored():
    timed = upto(TimeLayers, energy=0.99, latency_aware=True, probe=Probe(0.9)).need(Timed)
    assert all(d.skip.code is SkipCode.NOT_FASTER for d in timed.decisions.values())
    assert upto(TimeLayers, energy=0.99, latency_aware=True, probe=Probe(2.0)).need(Timed).to_dict()["layers"]["W1"]["kept"]


def test_latency_model_undoes_a_slower_model():
    ctx = upto(TimeModel, energy=0.99, latency_aware=True, probe=Probe(2.0, 0.8))
    timed = ctx.need(ModelTimed)
    assert timed.undone and all(d.skip.code is SkipCode.WHOLE_MODEL_SLOWER for d in timed.decisions.values())
    assert len(ctx.model.graph.node) == 2  # the input model back


def test_refine_refits_factors_on_calibration_data():
    refits = upto(Refine, calib=feeds(), refine=True, rank=2).need(Refits)
    assert refits.to_dict()["layers_refitted"] >= 1 and refits.runs > 0
    assert all(a.shape[1] == 2 and b.shape[0] == 2 for a, b in refits.factors.values())


def test_rewrite_replaces_each_weight_by_its_factors_and_a_dry_run_skips_it():
    ctx = upto(Rewrite, energy=1.0)
    rewritten = ctx.need(Rewritten)
    assert sorted(rewritten.factors) == [0, 1] and ctx.model is rewritten.model
    x = feeds(1)[0]
    np.testing.assert_allclose(run(rewritten.model, x)[0], run(chain(), x)[0], rtol=1e-4, atol=1e-4)
    assert upto(Rewrite, energy=1.0, dry_run=True).get(Rewritten) is None


def test_quantize_turns_the_factors_into_int8():
    q = upto(Quantize, energy=1.0, quantize="int8").need(Quantized)
    assert q.to_dict() == {"mode": "int8", "factors": 4, "factors_quantized": 4, "unquantized_factors": []}


def test_report_makes_rows_and_totals_once_and_stamps_the_model():
    ctx = upto(Report, energy=1.0)
    rep = ctx.need(Reported)
    assert [r.rank for r in rep.layers] == [4, 6] and rep.totals.params_after == 4 * 128 + 6 * 96
    assert any(p.key == "onnx_lowrank" for p in ctx.model.metadata_props)
    assert not any(p.key == "onnx_lowrank" for p in upto(Report, energy=1.0, dry_run=True).model.metadata_props)


def test_verify_compares_with_the_original():
    v = upto(Verify, energy=1.0, verify=VerifyConfig(calib=feeds(), max_drop=0.01)).need(Verified)
    assert v.report.passed and v.report.samples == 24 and v.to_dict()["worst"]["metric"] == "rel_l2"


def test_the_runner_names_the_stage_that_failed():
    class Broken(pipeline.Step):
        name = "broken"

        def run(self, ctx):
            raise KeyError("boom")

    with pytest.raises(pipeline.StageError, match="stage 'broken' failed: KeyError"):
        pipeline.run([Load(), Broken()], pipeline.Context(pipeline.Request(source=chain(), config=ol.CompressConfig())))
