"""Options: one declaration per option, read by the API, the recipes and the command line alike."""

from __future__ import annotations

import dataclasses

import pytest

import onnx_lowrank as ol
from onnx_lowrank import config
from onnx_lowrank.cli import _compress_parser
from onnx_lowrank.options import flag_of
from onnx_lowrank.verify import VerifyConfig


def _flags() -> set[str]:
    return {s for a in _compress_parser()._actions for s in a.option_strings}


def test_every_option_is_a_flag_a_recipe_key_and_a_keyword_of_one_name():
    flags = _flags()
    for f in (*ol.CompressConfig.fields(), *dataclasses.fields(VerifyConfig)):
        assert flag_of(f) in flags, f.name
        if f.name in {g.name for g in ol.CompressConfig.fields()} and f.name not in ("max_drop", "metric"):
            assert flag_of(f) == "--" + f.name.replace("_", "-") or f.name == "attention_aware"
    for f in ol.CompressConfig.fields():
        # a recipe key is the field's name
        assert ol.CompressConfig.from_mapping({f.name: f.default}).values()[f.name] == f.default


@pytest.mark.parametrize("section,values,match", [
    (config.RankRule, dict(energy=2), "energy must be a number in \\(0, 1\\]"),
    (config.RankRule, dict(energy=0.9, rank=4), "got both energy and rank"),
    (config.Budget, dict(target_params=0), "target_params must be a fraction"),
    (config.DataAware, dict(attention_aware=False), "attention_aware=False changes the statistics of data_aware"),
    (config.Width, dict(ffn_keep=1.5), "ffn_keep must be a fraction"),
    (config.Adaptive, dict(max_drop=0.01), "max_drop needs adaptive"),
    (config.Selection, dict(op_types="MatMul,Foo"), "op_types got Foo"),
    (config.Latency, dict(threads=(0,)), "threads must be positive integers"),
])
def test_each_section_validates_itself(section, values, match):
    with pytest.raises(ol.UsageError, match=match):
        section(**values)


def test_rules_between_sections_live_in_the_config():
    with pytest.raises(ol.UsageError, match="damping shapes the activation statistics of data_aware or ffn_keep"):
        ol.CompressConfig(damping=0.1)
    assert ol.CompressConfig(damping=0.1, ffn_keep=0.5).damping == 0.1
    with pytest.raises(ol.UsageError, match="allocates ranks itself; drop energy"):
        ol.CompressConfig(target_params=0.5, energy=0.9)
    with pytest.raises(ol.UsageError, match="adaptive needs a goal"):
        ol.CompressConfig(adaptive=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'energi'"):
        ol.CompressConfig(energi=0.9)


def test_config_is_immutable_comparable_and_picklable():
    import pickle

    c = ol.CompressConfig(energy=0.9, op_types="MatMul,Gemm")
    assert c.op_types == ("MatMul", "Gemm") and c.section(config.RankRule).energy == 0.9
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.energy = 0.5
    assert pickle.loads(pickle.dumps(c)) == c and hash(c) == hash(ol.CompressConfig(energy=0.9, op_types=("MatMul", "Gemm")))
    assert c.replace(rank=8).energy is None and c.replace(rank=8).rank == 8


def test_which_options_ask_for_a_check_is_decided_behind_the_api():
    from onnx_lowrank.api import keywords

    assert "verify" not in keywords({"threads": (1, 2), "energy": 0.9})  # a run setting asks for nothing
    kw = keywords({"calib": "c.npz", "threads": (2, 4)})
    assert kw["verify"].calib == "c.npz" and kw["verify"].threads == 2 and kw["calib"] == "c.npz"
    assert "verify" not in keywords({"calib": "c.npz", "data_aware": True}, dry_run=True)  # feeds rank selection only
    assert "verify" not in keywords({"input_shape": ["x:1x4"], "latency_aware": True})
    kw = keywords({"adaptive": True, "max_drop": 0.01, "metric": "cosine", "calib": "c.npz"})
    assert kw["max_drop"] == 0.01 and kw["metric"] == "cosine" and kw["verify"].max_drop == 0.01
    assert keywords({}, verify=True)["verify"] == VerifyConfig()


def test_messages_that_name_the_limit_and_refuse_an_ambiguous_value():
    with pytest.raises(ol.UsageError, match=r"int4_correction 1.0 is ambiguous.*int4_correction=0.99.*int4_correction=1\)"):
        ol.CompressConfig(quantize="int4", energy=1.0, int4_correction=1.0)
    assert ol.CompressConfig(quantize="int4", energy=1.0, int4_correction=1).int4_correction == 1
    assert ol.CompressConfig(quantize="int4", energy=1.0, int4_correction="2.0").int4_correction == 2
    with pytest.raises(ol.UsageError, match=r"damping must be a non-negative number up to 1e\+06, got 1000000000.0"):
        ol.CompressConfig(data_aware=True, damping=1e9)
    with pytest.raises(ol.UsageError, match=r"got -1;"):
        ol.CompressConfig(quantize="int4", energy=1.0, int4_correction=-1.0)


def test_choices_read_in_any_case_and_limits_are_named():
    # every choice in any letter case, as --ffn-keep AUTO was already read; unknown values are refused
    assert ol.CompressConfig(quantize="INT4", energy=1.0).quantize == "int4"
    assert ol.CompressConfig(ffn_keep=0.5, ffn_select="Energy").ffn_select == "energy"
    args = _compress_parser().parse_args(["m.onnx", "-o", "o.onnx", "--quantize", "Int8-Per-Channel", "--svd", "EXACT"])
    assert (args.quantize, args.svd) == ("int8-per-channel", "exact")
    with pytest.raises(ol.UsageError, match="expected one of int8, int8-per-channel, int4"):
        ol.CompressConfig(quantize="int5")
    # the block sizes are listed whatever the wrong value
    for bad in (0, 24, True):
        with pytest.raises(ol.UsageError, match="int4_block got .*; expected one of 16, 32, 64, 128, 256"):
            ol.CompressConfig(quantize="int4", energy=1.0, int4_block=bad)
    assert _compress_parser().parse_args(["m.onnx", "-o", "o.onnx", "--int4-block", "64"]).int4_block == 64
    # at most the grid's ranks can be measured: more is refused, not taken as the grid
    from onnx_lowrank.passes.adaptive import GRID

    assert len(GRID) == config.SENSITIVITY_GRID
    assert ol.CompressConfig(adaptive=True, target_params=0.5, sensitivity_points=10).sensitivity_points == 10
    with pytest.raises(ol.UsageError, match="sensitivity_points must be a positive integer up to 10, got 11"):
        ol.CompressConfig(adaptive=True, target_params=0.5, sensitivity_points=11)


def test_numpy_scalars_are_numbers_and_none_is_no_setting_where_an_option_has_a_value():
    import numpy as np

    cfg = ol.CompressConfig(energy=np.float32(0.9), min_params=np.int32(0), rank_multiple=np.int64(8))
    assert (cfg.energy, cfg.min_params, cfg.rank_multiple) == (pytest.approx(0.9), 0, 8)
    assert type(cfg.min_params) is int and type(cfg.energy) is float
    assert ol.CompressConfig(rank=np.int64(4)).rank == 4
    for name in ("min_params", "rank_multiple", "op_types", "damping", "workers"):
        with pytest.raises(ol.UsageError, match=f"{name} cannot be None; leave it out for its default"):
            ol.CompressConfig(**{name: None})
    assert ol.CompressConfig(energy=None, rank=4).energy is None  # (where None means something, it stays allowed)
    with pytest.raises(ol.UsageError, match="base_dir= takes the folder"):
        ol.compress("model.onnx", base_dir=3)
