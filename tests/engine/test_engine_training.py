"""QAT trains: straight-through gradients reach the weights, a small LeNet learns scikit-learn
digits through the fake quantizers, and PTQ calibration observes ranges without touching weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qat_runner.engine import FeatureQuantizer, QuantLayer, calibrate, turn_quantize


def quant_layers(gm):
    return {n: m for n, m in gm.named_modules() if isinstance(m, QuantLayer)}


def quantizers(gm):
    return [m for m in gm.modules() if isinstance(m, FeatureQuantizer)]


# ---------------------------------------------------------------------------------------- STE


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_gradients_reach_all_weights(bits, make_lenet, digits):
    gm = turn_quantize(make_lenet(), bits=bits, feature_bits=max(bits, 4)).train()
    x = digits.x_train[:64].clone().requires_grad_(True)
    loss = F.cross_entropy(gm(x), digits.y_train[:64])
    loss.backward()
    layers = quant_layers(gm)
    assert len(layers) == 4
    for name, m in layers.items():
        grad = m.layer.weight.grad
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
        if m.layer.bias is not None:
            assert torch.isfinite(m.layer.bias.grad).all() and m.layer.bias.grad.abs().sum() > 0, name
        if m.bn is not None:
            assert m.bn.weight.grad is not None and m.bn.weight.grad.abs().sum() > 0, name
    # The gradient also passes the input quantizer back to the image.
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_weight_gradient_is_the_gradient_wrt_the_fake_quantized_weight():
    """Straight-through: dL/dW equals dL/dW_q of the same layer computed on the quantized weight."""
    torch.manual_seed(0)
    gm = turn_quantize(nn.Sequential(nn.Linear(6, 3))).train()
    layer = gm.get_submodule("0")
    lin = layer.layer  # the QAT copy's own Linear
    x = torch.randn(5, 6)
    gm(x).square().sum().backward()

    # Same computation by hand with W_q as a leaf: input fake-quant (range now set from x),
    # linear, output fake-quant (straight-through inside the range, which holds the whole batch).
    iq = layer.input_quant
    x_q = torch.fake_quantize_per_tensor_affine(x, iq.scale, iq.zero_point, iq.quant_min, iq.quant_max)
    L = 127
    s_w = lin.weight.detach().abs().amax(dim=1) / L
    w_q = (torch.round(lin.weight.detach() / s_w[:, None]).clamp(-L, L) * s_w[:, None]).requires_grad_(True)
    y = F.linear(x_q, w_q, lin.bias.detach())
    oq = layer.output_quant
    y_q = y + (torch.fake_quantize_per_tensor_affine(y.detach(), oq.scale, oq.zero_point, oq.quant_min, oq.quant_max) - y.detach())
    y_q.square().sum().backward()
    torch.testing.assert_close(lin.weight.grad, w_q.grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- QAT training


TRAIN_SETTINGS = [
    # The defaults: momentum 0.99 makes the running ranges (the logits' one included) follow the
    # growing activations slowly, so 60 steps learn less; still far better than chance.
    pytest.param({}, 0.8, 0.5, id="defaults"),
    # A faster moving average follows the ranges: close to float training.
    pytest.param({"momentum": 0.9}, 0.5, 0.8, id="momentum0.9"),
    pytest.param({"bits": 4, "feature_bits": 4, "feature_scale_stat_method": "PerChannel",
                  "scale_update_method": "Maximum"}, 0.5, 0.8, id="4bit-perchannel-maximum"),
    pytest.param({"symmetric_features": True, "momentum": 0.9}, 0.5, 0.8, id="symmetric"),
]


@pytest.mark.parametrize("settings,max_loss_ratio,min_acc", TRAIN_SETTINGS)
def test_qat_lenet_learns_digits(settings, max_loss_ratio, min_acc, make_lenet, digits):
    steps = 60
    # From scratch: BatchNorm statistics must follow the weights at torch's 0.1, not at the 0.01
    # (MNN's 0.99) that keeps a converged model's statistics.
    gm = turn_quantize(make_lenet(seed=0), bn_momentum=0.1, **settings).train()
    opt = torch.optim.Adam(gm.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    n = len(digits.y_train)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, n, (64,), generator=g)
        loss = F.cross_entropy(gm(digits.x_train[idx]), digits.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < max_loss_ratio * first, (first, last)

    gm.eval()
    with torch.no_grad():
        pred = gm(digits.x_test).argmax(dim=1)
    acc = (pred == digits.y_test).float().mean().item()
    assert acc > min_acc, acc  # chance is 0.1

    # Training updated every quantizer's range once per step.
    assert all(int(q.num_updates) == steps for q in quantizers(gm))


# -------------------------------------------------------------------------------- calibrate


def param_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("as_pairs", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_calibrate_observes_n_batches_and_leaves_weights(make_lenet, digits, n, as_pairs):
    gm = turn_quantize(make_lenet()).train()
    params = param_state(gm)
    bn_stats = {k: v.clone() for k, v in gm.state_dict().items() if "running_mean" in k or "running_var" in k}
    batches = [digits.x_train[i * 50:(i + 1) * 50] for i in range(5)]
    if as_pairs:
        batches = [(b, digits.y_train[:len(b)]) for b in batches]
    out = calibrate(gm, iter(batches), n)
    assert out is gm
    assert not gm.training
    assert not any(m.training for m in gm.modules())
    qs = quantizers(gm)
    assert len(qs) == 5
    for q in qs:
        assert int(q.num_updates) == n
        assert not q.observing
        assert (q.running_max > q.running_min).all()
    after = param_state(gm)
    assert after.keys() == params.keys()
    for k in params:
        assert torch.equal(after[k], params[k]), k
    for k, v in gm.state_dict().items():  # BN statistics are not touched either (eval mode)
        if k in bn_stats:
            assert torch.equal(v, bn_stats[k]), k


@pytest.mark.parametrize("update", ["MovingAverage", "Maximum"])
def test_calibrate_ranges_match_the_data(make_lenet, digits, update):
    """The input quantizer's range after calibration is the data range: with MovingAverage the
    mean of the batches' ranges (each weighted equally, whatever the training momentum, which
    is restored), with Maximum the widest."""
    gm = turn_quantize(make_lenet(), momentum=0.9, scale_update_method=update)
    xs = [digits.x_train[:100], digits.x_train[100:200] * 0.5, digits.x_train[200:300] * 0.25]
    calibrate(gm, xs)
    iq = gm.get_submodule("conv1").input_quant
    maxes = torch.stack([x.max() for x in xs])
    hi = maxes.mean() if update == "MovingAverage" else maxes.max()
    lo = torch.tensor(0.0)  # images are >= 0, the range always holds 0
    torch.testing.assert_close(iq.running_max, hi.reshape(1))
    torch.testing.assert_close(iq.running_min, lo.reshape(1))
    torch.testing.assert_close(iq.scale, (hi / 255).reshape(1))
    assert all(q.momentum == 0.9 for q in quantizers(gm))


def test_calibrate_uses_all_batches_when_num_batches_is_none(make_lenet, digits):
    gm = turn_quantize(make_lenet())
    calibrate(gm, (digits.x_train[i:i + 10] for i in range(0, 40, 10)), None)
    assert all(int(q.num_updates) == 4 for q in quantizers(gm))


def test_calibrate_then_eval_is_deterministic(make_lenet, digits):
    gm = turn_quantize(make_lenet())
    calibrate(gm, [digits.x_train[:100]], 1)
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    with torch.no_grad():
        a = gm(digits.x_test)
        b = gm(digits.x_test)
    assert torch.equal(a, b)
    for k, v in gm.state_dict().items():
        assert torch.equal(v, state[k]), k
