"""Bad settings are refused with a ValueError that names the bad value and what is accepted,
both in QuantConfig and in turn_quantize; enum members and their names are both accepted."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qat_runner.engine import (
    FeatureQuantizer,
    FeatureScaleStatMethod,
    QuantConfig,
    ScaleUpdateMethod,
    calibrate,
    turn_quantize,
)

BAD_BITS = [0, 1, 9, 3.5, "eight", True, -1]


def tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def build(where: str, **kwargs):
    return QuantConfig(**kwargs) if where == "config" else turn_quantize(tiny(), **kwargs)


WHERE = ["config", "turn_quantize"]


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("field", ["bits", "feature_bits"])
@pytest.mark.parametrize("value", BAD_BITS, ids=repr)
def test_bad_bits_are_refused(where, field, value):
    with pytest.raises(ValueError) as info:
        build(where, **{field: value})
    msg = str(info.value)
    assert field in msg
    assert repr(value) in msg
    assert "2" in msg and "8" in msg


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_every_bit_width_from_2_to_8_is_accepted(where, bits):
    out = build(where, bits=bits, feature_bits=bits)
    cfg = out if where == "config" else out.quant_config
    assert cfg.bits == bits and cfg.feature_bits == bits


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("field,accepted", [
    ("feature_scale_stat_method", ("PerTensor", "PerChannel")),
    ("scale_update_method", ("Maximum", "MovingAverage")),
])
@pytest.mark.parametrize("value", ["PerLayer", "", "Moving Average", 3, None], ids=repr)
def test_unknown_method_names_are_refused(where, field, accepted, value):
    with pytest.raises(ValueError) as info:
        build(where, **{field: value})
    msg = str(info.value)
    assert field in msg
    assert repr(value) in msg
    for name in accepted:
        assert name in msg


def test_method_enum_of_the_wrong_kind_is_refused():
    with pytest.raises(ValueError, match="scale_update_method"):
        QuantConfig(scale_update_method=FeatureScaleStatMethod.PerChannel)
    with pytest.raises(ValueError, match="feature_scale_stat_method"):
        QuantConfig(feature_scale_stat_method=ScaleUpdateMethod.Maximum)


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, 0.0, 1.0, float("nan"), "0.9", True], ids=repr)
def test_bad_momentum_is_refused(where, value):
    with pytest.raises(ValueError) as info:
        build(where, momentum=value)
    msg = str(info.value)
    assert "momentum" in msg
    assert repr(value) in msg


@pytest.mark.parametrize("value", [0.5, 0.9, 0.999, 1e-3])
def test_good_momentum_is_accepted(value):
    assert QuantConfig(momentum=value).momentum == value
    q = FeatureQuantizer(QuantConfig(momentum=value))
    assert q.momentum == value


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("value", [1, 0, "yes", None], ids=repr)
def test_bad_symmetric_features_is_refused(where, value):
    with pytest.raises(ValueError) as info:
        build(where, symmetric_features=value)
    assert "symmetric_features" in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("stat", [FeatureScaleStatMethod.PerChannel, "PerChannel"])
@pytest.mark.parametrize("update", [ScaleUpdateMethod.Maximum, "Maximum"])
def test_enum_members_and_names_are_both_accepted(stat, update):
    cfg = QuantConfig(feature_scale_stat_method=stat, scale_update_method=update)
    assert cfg.feature_scale_stat_method is FeatureScaleStatMethod.PerChannel
    assert cfg.scale_update_method is ScaleUpdateMethod.Maximum

    gm = turn_quantize(tiny(), feature_scale_stat_method=stat, scale_update_method=update)
    assert gm.quant_config == cfg
    quantizers = [m for m in gm.modules() if isinstance(m, FeatureQuantizer)]
    assert quantizers
    assert all(q.per_channel and q.update_method is ScaleUpdateMethod.Maximum for q in quantizers)


def test_defaults():
    cfg = QuantConfig()
    assert (cfg.bits, cfg.feature_bits, cfg.momentum, cfg.symmetric_features) == (8, 8, 0.99, False)
    assert cfg.feature_scale_stat_method is FeatureScaleStatMethod.PerTensor
    assert cfg.scale_update_method is ScaleUpdateMethod.MovingAverage
    assert turn_quantize(tiny()).quant_config == cfg


def test_validation_happens_before_any_work():
    """A bad setting is refused even for a model torch.fx could not trace."""

    class Untraceable(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(ValueError, match="bits"):
        turn_quantize(Untraceable(), bits=1)
    with pytest.raises(TypeError, match="Untraceable"):
        turn_quantize(Untraceable())


@pytest.mark.parametrize("num_batches", [0, -1])
def test_calibrate_refuses_non_positive_num_batches(num_batches):
    gm = turn_quantize(tiny())
    with pytest.raises(ValueError) as info:
        calibrate(gm, [torch.randn(2, 1, 6, 6)], num_batches)
    assert "num_batches" in str(info.value) and repr(num_batches) in str(info.value)
    # Nothing was observed.
    assert all(int(q.num_updates) == 0 for q in gm.modules() if isinstance(q, FeatureQuantizer))


# --------------------------------------------------------------------------------------------
# One front door: turn_quantize(model, QuantConfig), keyword settings as a convenience


def test_config_and_keywords_build_the_same_model(make_lenet):
    import qat_runner.engine as engine

    model = make_lenet()
    by_config = engine.turn_quantize(model, engine.QuantConfig(bits=4, scale_update_method="Maximum"))
    by_keywords = engine.turn_quantize(model, bits=4, scale_update_method="Maximum")
    assert by_config.quant_config == by_keywords.quant_config
    assert str(by_config.graph) == str(by_keywords.graph)
    with pytest.raises(ValueError, match="not both"):
        engine.turn_quantize(model, engine.QuantConfig(), bits=4)
    with pytest.raises(TypeError, match="bitz"):
        engine.turn_quantize(model, bitz=4)
    assert {"export_int8_onnx", "export_float_onnx", "to_integer_model"} <= set(engine.__all__)


def test_runner_schema_takes_the_engine_defaults():
    from qat_runner.config import QuantSchema
    from qat_runner.engine import QuantConfig

    schema, engine_defaults = QuantSchema(), QuantConfig()
    for name in ("bits", "feature_bits", "feature_scale_stat_method", "scale_update_method", "momentum",
                 "symmetric_features"):
        assert getattr(schema, name) == getattr(engine_defaults, name), name


class _Gate(nn.Module):
    """Data-dependent control flow, which torch.fx cannot trace."""

    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_trace_error_names_the_layer_and_the_line():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sequential(nn.ReLU(), _Gate()))
    with pytest.raises(TypeError) as info:
        turn_quantize(model)
    message = str(info.value)
    assert "\n" not in message
    assert "layer '1.1'" in message and "_Gate.forward" in message, message
    assert "`if x.sum() > 0:`" in message and "control flow" in message, message
