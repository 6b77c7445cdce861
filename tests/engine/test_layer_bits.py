"""quant.layers: per-layer weight bits by module-name pattern, or a layer left float."""
from __future__ import annotations

import pytest
import torch
import torchvision

from qat_runner.engine import QuantConfig, turn_quantize
from qat_runner.engine.modules import QuantLayer
from qat_runner.engine.report import quantization_report


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(num_classes=10)


def _bits(model) -> dict[str, int | None]:
    return {row.name: row.weight_bits for row in quantization_report(model)}


def test_patterns_set_bits_and_float_layers(mobilenet):
    qat = turn_quantize(mobilenet, bits=4, layers={"features.0.*": 8, "classifier.*": 8,
                                                    "features.1.conv.0.0": "float"})
    bits = _bits(qat)
    assert bits["features.0.0"] == 8 and bits["classifier.1"] == 8
    assert bits["features.1.conv.0.0"] is None
    assert not isinstance(qat.get_submodule("features.1.conv.0.0"), QuantLayer)
    rest = {name: b for name, b in bits.items() if name not in ("features.0.0", "classifier.1", "features.1.conv.0.0")}
    assert len(rest) == 50 and set(rest.values()) == {4}
    # the model still trains and runs its test phase with a float layer in the middle
    qat.train()(torch.randn(4, 3, 32, 32)).sum().backward()
    assert torch.isfinite(qat.eval()(torch.randn(2, 3, 32, 32))).all()


def test_first_matching_pattern_wins(mobilenet):
    bits = _bits(turn_quantize(mobilenet, bits=6, layers={"features.0.0": 3, "features.*": 5}))
    assert bits["features.0.0"] == 3 and bits["features.18.0"] == 5 and bits["classifier.1"] == 6


def test_config_normalises_and_stays_hashable():
    config = QuantConfig(layers={"a.*": 8, "b": "float", "c": None})
    assert config.layers == (("a.*", 8), ("b", None), ("c", None))
    assert hash(config) == hash(QuantConfig(layers=config.layers))
    assert config.bits_for("a.1") == 8 and config.bits_for("b") is None and config.bits_for("z") == 8


@pytest.mark.parametrize("layers, message", [
    ({"a": 9}, "layers.a=9 is not accepted: use an integer from 2 to 8 or float"),
    ({"a": "half"}, "layers.a='half' is not accepted"),
    ({"a": True}, "layers.a=True is not accepted"),
    ([("a", 8), 1], "is not accepted: use a mapping of module-name patterns"),
])
def test_bad_layer_bits_are_refused(layers, message):
    with pytest.raises(ValueError) as info:
        QuantConfig(layers=layers)
    assert message in str(info.value)


def test_pattern_matching_no_layer_is_refused_naming_it(mobilenet):
    with pytest.raises(ValueError) as info:
        turn_quantize(mobilenet, layers={"feature.0.*": 8})
    assert "'feature.0.*' matches no quantizable layer" in str(info.value)
    assert "features.0.0" in str(info.value)
