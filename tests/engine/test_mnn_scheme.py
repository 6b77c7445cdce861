"""quant=mnn: MNN's numerics (signed int8 features with a zero point, roundf, batch ranges in
training, MNN's range rules, float bias) and the BatchNorm knobs shared by both schemes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qat_runner.engine import (MnnFeatureQuantizer, QuantConfig, QuantLayer, calibrate, freeze_bn_stats,
                               turn_quantize)
from qat_runner.engine.mnn_quant import mnn_weight_integers, round_half_away

MNN = QuantConfig(scheme="mnn")


def test_roundf_goes_away_from_zero():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49])
    assert round_half_away(x).tolist() == [-3, -2, -1, 1, 2, 3, 0]


def test_scale_and_zero_point_are_mnns():
    q = MnnFeatureQuantizer(MNN)
    q.train()(torch.tensor([-1.0, 0.0, 3.0]))
    scale = 4.0 / 254
    assert torch.allclose(q.scale, torch.tensor([scale]))
    # zp = roundf(-min/s - 127) = roundf(63.5 - 127) = roundf(-63.5) = -64 (half away from zero)
    assert q.zero_point.item() == -64 and (q.quant_min, q.quant_max) == (-127, 127)
    assert q.dtype is torch.int8


def test_training_uses_the_batch_range_and_test_the_running_one():
    q = MnnFeatureQuantizer(MNN).train()
    q(torch.linspace(-1, 1, 101))
    big = torch.tensor([-10.0, 0.0, 10.0])
    assert torch.allclose(q(big), big, atol=10 / 127)  # the batch's own range: nothing clipped
    assert q.running_max.item() == pytest.approx(0.99 * 1 + 0.01 * 10)  # MNN's moving average, no widening
    out = q.eval()(big)
    assert out.max().item() == pytest.approx(q.running_max.item(), rel=0.02)  # clipped at the running range


def test_maximum_takes_the_max_of_the_minima_too():
    q = MnnFeatureQuantizer(QuantConfig(scheme="mnn", scale_update_method="Maximum")).train()
    q(torch.tensor([-2.0, 1.0]))
    q(torch.tensor([-1.0, 3.0]))
    assert (q.running_min.item(), q.running_max.item()) == (-1.0, 3.0)


def test_weights_round_half_away_from_zero():
    weight = torch.tensor([[127.0, 0.5, -0.5, 1.5]])  # scale 1: ties at 0.5, -0.5 and 1.5
    q, scale = mnn_weight_integers(weight, 8)
    assert scale.item() == 1.0 and q.tolist() == [[127, 1, -1, 2]]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 36, 3))


def test_test_phase_keeps_a_float_bias_and_ships_signed_grids():
    qat = turn_quantize(_net(), MNN)
    calibrate(qat, [torch.randn(8, 1, 6, 6) for _ in range(2)])
    layers = [m for m in qat.modules() if isinstance(m, QuantLayer)]
    assert layers and all(isinstance(m.output_quant, MnnFeatureQuantizer) for m in layers)
    p = layers[0].integer_parameters()
    assert p["bias"] is None and p["float_bias"] is not None and p["weight"].dtype is torch.int8
    assert not any(type(m).__name__.startswith("QuantAdd") for m in qat.modules())


@pytest.mark.parametrize("settings, message", [
    ({"feature_scale_stat_method": "PerChannel"}, "PerChannel"),
    ({"symmetric_features": True}, "symmetric_features"),
])
def test_mnn_refuses_what_mnn_does_not_have(settings, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(scheme="mnn", **settings)


@pytest.mark.parametrize("scheme", ["default", "mnn"])
def test_bn_momentum_is_set_for_qat(scheme):
    model = _net()
    assert model[1].momentum == 0.1
    assert turn_quantize(model, scheme=scheme).get_submodule("0").bn.momentum == 0.01
    assert turn_quantize(model, scheme=scheme, bn_momentum=None).get_submodule("0").bn.momentum == 0.1
    assert model[1].momentum == 0.1  # the float model is left alone


def test_frozen_batch_norm_keeps_its_statistics():
    qat = turn_quantize(_net()).train()
    bn = qat.get_submodule("0").bn
    x = torch.randn(8, 1, 6, 6) * 3 + 1
    qat(x)
    moved = bn.running_mean.clone()
    assert freeze_bn_stats(qat) == 1
    qat(x).sum().backward()
    assert torch.equal(bn.running_mean, moved)
    assert qat.get_submodule("0").layer.weight.grad is not None


def test_depthwise_bias_is_the_rounded_sum_mnn_truncates():
    """MNN folds the float bias and the output zero point into one int32 bias by truncating each
    part; ours rounds the exact sum (a folded weight scale of 2 makes a unit 1.6 codes wide)."""
    from qat_runner.engine.mnn_quant import mnn_depthwise_bias, mnn_requant_scale

    weight_scale, s_in, s_out = torch.tensor([2.0, 0.01]), torch.tensor(0.019), torch.tensor(0.024)
    bias, zero_point = torch.tensor([0.9, -0.013]), -127
    scale = mnn_requant_scale(weight_scale, s_in, s_out)
    assert torch.allclose(scale, weight_scale * 0.019 / 0.024)
    got = mnn_depthwise_bias(bias, weight_scale, s_in, scale, zero_point)
    exact = bias.double() / (0.019 * weight_scale.double()) + zero_point / scale.double()
    assert torch.equal(got.double(), round_half_away(exact))
    truncated = torch.trunc(bias / (s_in * weight_scale)) + torch.trunc(zero_point / scale)
    assert not torch.equal(got, truncated)  # this case is one where MNN's own rounding loses


@pytest.mark.parametrize("groups", [1, 4])
def test_test_phase_is_mnns_integer_convolution(groups):
    """Eval mode computes MNN's int8 kernel (`QuantLayer._mnn_integer_output`): the int32
    accumulator of centred input codes, then a depthwise kernel's `(acc + B) * scale` or a GEMM's
    `acc * scale + b / s_out + zp`, roundf: within a code of the float computation, on the grid."""
    from qat_runner.engine.modules import apply_activation

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, groups=groups),
                        nn.BatchNorm2d(4), nn.ReLU6())
    qat = turn_quantize(net.eval(), MNN)
    batches = [(torch.randn(8, 4, 6, 6), torch.zeros(8, dtype=torch.long))] * 3
    calibrate(qat, batches, 3)
    qat.eval()
    layer = [m for m in qat.modules() if isinstance(m, QuantLayer)][1]
    seen = {}
    layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        qat(batches[0][0])
        p = layer.integer_parameters()
        weight = p["weight"].float() * p["weight_scale"].view(-1, 1, 1, 1)
        reference = layer.output_quant.fake_quantize(
            apply_activation(layer.layer._conv_forward(seen["x"], weight, p["float_bias"]), layer.activation))
    q = layer.output_quant
    codes = seen["y"] / q.scale
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the output grid
    assert (seen["y"] - reference).abs().max() <= q.scale * 1.001  # at most one code from the float path
