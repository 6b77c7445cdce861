"""QAT layers: BatchNorm folding and the integer arithmetic of the test phase, checked against a
hand-computed integer reference; and the training-phase forward (fake-quant weights, BN on
batch statistics)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qat_runner.engine import QuantConv2d, QuantLayer, QuantLinear, calibrate, turn_quantize


class ConvBNAct(nn.Module):
    def __init__(self, cin, cout, groups=1, act="relu", bias=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU() if act == "relu" else nn.ReLU6()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class LinearReLU(nn.Module):
    def __init__(self, fin, fout):
        super().__init__()
        self.fc = nn.Linear(fin, fout)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.fc(x))


def set_bn_stats(bn: nn.BatchNorm2d, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
        bn.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
        bn.weight.copy_(torch.randn(c, generator=g) * 1.5)  # negative gammas included
        bn.bias.copy_(torch.randn(c, generator=g) * 0.5 + 0.5)


def the_layer(gm) -> QuantLayer:
    layers = [m for m in gm.modules() if isinstance(m, QuantLayer)]
    assert len(layers) == 1
    return layers[0]


def quant_params(quantizer):
    """(scale, zero_point, qmin, qmax) of a FeatureQuantizer as float64 / ints."""
    return (quantizer.scale.double(), quantizer.zero_point.double(), quantizer.quant_min,
            quantizer.quant_max)


def quantize_int(x64, scale, zp, qmin, qmax):
    return torch.clamp(torch.round(x64 / scale) + zp, qmin, qmax)


def hand_folded(conv: nn.Conv2d, bn: nn.BatchNorm2d | None):
    """BN folding by the textbook formula, float64."""
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if bn is None:
        return w, b
    factor = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    w_f = w * factor.reshape((-1,) + (1,) * (w.dim() - 1))
    b_f = (b - bn.running_mean.double()) * factor + bn.bias.detach().double()
    return w_f, b_f


def hand_weight_ints(w64: torch.Tensor, bits: int):
    L = 2 ** (bits - 1) - 1
    s_w = w64.abs().flatten(1).amax(dim=1).clamp(min=1e-6) / L
    q_w = torch.clamp(torch.round(w64 / s_w.reshape((-1,) + (1,) * (w64.dim() - 1))), -L, L)
    return q_w, s_w


def compare_with_reference(out, ref, step):
    """All elements equal within float tolerance, except a tiny fraction off by one step (ties)."""
    diff = (out.double() - ref).abs()
    step = step.expand_as(diff) if step.numel() > 1 else step
    tol = 1e-3 * step + 1e-6 * ref.abs()  # float32 rounding of the dequantized value
    off = diff > tol
    assert (diff <= step * (1 + 1e-4) + tol).all(), f"max diff {diff.max().item()} > one step"
    frac = off.double().mean().item()
    assert frac < 1e-3, f"{frac:.2e} of the elements differ from the integer reference"


CASES = [
    # (cin, cout, groups, act, symmetric_features, bits)
    pytest.param(3, 6, 1, "relu", False, 8, id="conv-relu-uint8"),
    pytest.param(3, 6, 1, "relu", True, 8, id="conv-relu-int8sym"),
    pytest.param(3, 6, 1, "relu6", False, 4, id="conv-relu6-w4"),
    pytest.param(6, 6, 6, "relu", False, 8, id="depthwise-relu"),
    pytest.param(6, 6, 6, "relu6", True, 8, id="depthwise-relu6-sym"),
]


@pytest.mark.parametrize("cin,cout,groups,act,symmetric,bits", CASES)
def test_bn_folded_eval_matches_integer_reference(cin, cout, groups, act, symmetric, bits):
    torch.manual_seed(0)
    model = ConvBNAct(cin, cout, groups=groups, act=act)
    set_bn_stats(model.bn, seed=1)
    with torch.no_grad():
        model.conv.bias.copy_(torch.randn(cout) * 0.3)
    model.eval()

    gm = turn_quantize(model, bits=bits, symmetric_features=symmetric)
    layer = the_layer(gm)
    assert isinstance(layer, QuantConv2d) and layer.bn is not None and layer.activation == act

    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, cin, 9, 9, generator=g) * 2 + 0.5 for _ in range(3)]
    calibrate(gm, batches, 3)
    assert not gm.training

    x = torch.randn(4, cin, 9, 9, generator=g) * 2 + 0.5
    with torch.no_grad():
        out = gm(x)

    # --- the integer model by hand -------------------------------------------------------
    s_in, zp_in, qmin, qmax = quant_params(layer.input_quant)
    q_x = quantize_int(x.double(), s_in, zp_in, qmin, qmax)

    w_f, b_f = hand_folded(model.conv, model.bn)
    torch.testing.assert_close(  # the module folds the same way
        tuple(t.double() for t in layer.folded_weight_bias()), (w_f, b_f), rtol=1e-5, atol=1e-6)
    q_w, s_w = hand_weight_ints(w_f, bits)
    bias_scale = s_in * s_w
    q_b = torch.round(b_f / bias_scale)

    p = layer.integer_parameters()
    assert p["weight"].dtype == torch.int8 and p["bias"].dtype == torch.int32
    L = 2 ** (bits - 1) - 1
    assert p["weight"].abs().max() <= L
    mismatch_w = (p["weight"].double() != q_w).double().mean().item()
    assert mismatch_w < 1e-2 and (p["weight"].double() - q_w).abs().max() <= 1
    torch.testing.assert_close(p["weight_scale"].double(), s_w, rtol=1e-5, atol=0)
    assert (p["bias"].double() - q_b).abs().max() <= 1

    acc = F.conv2d(q_x - zp_in, q_w, None, padding=1, groups=groups)  # exact: small integers in f64
    acc = acc + q_b.reshape(1, -1, 1, 1)
    y = acc * bias_scale.reshape(1, -1, 1, 1)
    y = F.relu(y) if act == "relu" else F.relu6(y)
    s_out, zp_out, omin, omax = quant_params(layer.output_quant)
    q_y = quantize_int(y, s_out, zp_out, omin, omax)
    ref = (q_y - zp_out) * s_out

    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    compare_with_reference(out, ref, s_out)
    # The reference is not trivial: the output uses many levels.
    assert torch.unique(q_y).numel() > 10


def test_bn_folded_eval_matches_float_bn_model():
    """Folding is exact per channel: at 8 bits the integer layer stays close to the float one."""
    torch.manual_seed(3)
    model = ConvBNAct(4, 8)
    set_bn_stats(model.bn, seed=4)
    model.eval()
    gm = turn_quantize(model)
    g = torch.Generator().manual_seed(5)
    calibrate(gm, [torch.randn(8, 4, 10, 10, generator=g) for _ in range(4)], 4)
    x = torch.randn(8, 4, 10, 10, generator=g)
    with torch.no_grad():
        ref = model(x)
        out = gm(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_linear_eval_matches_integer_reference():
    torch.manual_seed(0)
    model = LinearReLU(12, 7).eval()
    gm = turn_quantize(model)
    layer = the_layer(gm)
    assert isinstance(layer, QuantLinear) and layer.bn is None and layer.activation == "relu"
    g = torch.Generator().manual_seed(1)
    calibrate(gm, [torch.randn(16, 12, generator=g) for _ in range(2)], 2)
    x = torch.randn(64, 12, generator=g)
    with torch.no_grad():
        out = gm(x)

    s_in, zp_in, qmin, qmax = quant_params(layer.input_quant)
    q_x = quantize_int(x.double(), s_in, zp_in, qmin, qmax)
    w, b = hand_folded(model.fc, None)
    q_w, s_w = hand_weight_ints(w, 8)
    q_b = torch.round(b / (s_in * s_w))
    acc = (q_x - zp_in) @ q_w.T + q_b
    y = F.relu(acc * (s_in * s_w))
    s_out, zp_out, omin, omax = quant_params(layer.output_quant)
    ref = (quantize_int(y, s_out, zp_out, omin, omax) - zp_out) * s_out
    compare_with_reference(out, ref, s_out)


def test_conv_without_bias_or_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, bias=False)).eval()
    gm = turn_quantize(model)
    layer = the_layer(gm)
    assert layer.bn is None and layer.activation is None
    w, b = layer.folded_weight_bias()
    assert torch.equal(w, model[0].weight)
    assert torch.equal(b, torch.zeros(5))
    calibrate(gm, [torch.randn(2, 3, 6, 6)], 1)
    out = gm(torch.randn(2, 3, 6, 6))
    assert out.shape == (2, 5, 4, 4) and torch.isfinite(out).all()
    assert (out < 0).any()  # no activation was invented


def test_per_channel_input_keeps_float_bias():
    torch.manual_seed(0)
    model = ConvBNAct(3, 4).eval()
    set_bn_stats(model.bn, seed=0)
    gm = turn_quantize(model, feature_scale_stat_method="PerChannel")
    layer = the_layer(gm)
    calibrate(gm, [torch.randn(2, 3, 6, 6)], 1)
    p = layer.integer_parameters()
    assert layer.input_quant.per_channel and layer.input_quant.scale.shape == (3,)
    assert p["bias"] is None and p["bias_scale"] is None
    _, b_f = hand_folded(model.conv, model.bn)
    torch.testing.assert_close(p["float_bias"].double(), b_f, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 4])
def test_training_forward_uses_fake_quant_weights_and_batch_stats(groups):
    torch.manual_seed(0)
    model = ConvBNAct(4, 4, groups=groups, act="relu6")
    set_bn_stats(model.bn, seed=2)
    gm = turn_quantize(model).train()
    layer = the_layer(gm)
    mean_before = layer.bn.running_mean.clone()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, 7, 7, generator=g) + 0.2
    out = gm(x)

    # Reference: input fake-quant (its range was just set by this batch), per-channel
    # fake-quant weights, float conv, BN on the batch's own statistics, relu6, output fake-quant.
    s_in, zp_in, qmin, qmax = quant_params(layer.input_quant)
    x_fq = (quantize_int(x.double(), s_in, zp_in, qmin, qmax) - zp_in) * s_in
    q_w, s_w = hand_weight_ints(model.conv.weight.detach().double(), 8)
    w_fq = q_w * s_w.reshape(-1, 1, 1, 1)
    y = F.conv2d(x_fq, w_fq, model.conv.bias.detach().double(), padding=1, groups=groups)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    gamma = model.bn.weight.detach().double().reshape(1, -1, 1, 1)
    beta = model.bn.bias.detach().double().reshape(1, -1, 1, 1)
    y = F.relu6((y - mean) / torch.sqrt(var + model.bn.eps) * gamma + beta)
    s_out, zp_out, omin, omax = quant_params(layer.output_quant)
    ref = (quantize_int(y, s_out, zp_out, omin, omax) - zp_out) * s_out
    compare_with_reference(out.detach(), ref, s_out)
    # BN running statistics move in training, as in a float model.
    assert not torch.equal(layer.bn.running_mean, mean_before)
