"""The fast training path computes what the old one did, bit for bit.

`fake_quant.py` used to quantize features with torch's fused fake-quantize kernels, build the
straight-through gradient as `x + (q - x).detach()`, update the range with a host sync, and
`modules.py` ran the activation out of place. The reference classes below are verbatim copies of
that code (git history: `FeatureQuantizer` before the fast path). Models trained a few steps from
one seed with each implementation must end with equal parameters, buffers, input gradients and
test-phase logits (`torch.equal`, not a tolerance), for every feature option. Two changes are
deliberate: training's output is the grid value itself (`_OnGrid`), not `x + (q - x)`, and a
layer's ReLU/ReLU6 takes its gradient at the quantized output (`_ActivationAtOutput`).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qat_runner.engine import FeatureQuantizer, QuantConfig, calibrate, turn_quantize
from qat_runner.engine import activation_quant, fake_quant
from qat_runner.engine.config import ScaleUpdateMethod
from qat_runner.engine.fake_quant import (
    FEATURE_SCALE_FLOOR,
    OUTGROWN_FACTOR,
    fake_quantize_weight,
    weight_limit,
)
from qat_runner.engine.modules import QuantConv2d, QuantLinear, apply_activation, apply_weights

# ------------------------------------------------------------- the old implementation, verbatim


def reference_weight_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    max_abs = weight.detach().abs().flatten(1).amax(dim=1)
    return max_abs.clamp(min=1e-6) / weight_limit(bits)


def reference_fake_quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    scale = reference_weight_scale(weight, bits)
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=weight.device)
    limit = weight_limit(bits)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -limit, limit)


class ReferenceFeatureQuantizer(FeatureQuantizer):
    """The old update / fake_quantize / forward, on the same buffers."""

    def _batch_min_max(self, x):
        x = x.detach()
        if not self.per_channel:
            lo, hi = torch.aminmax(x)
            return lo.reshape(1), hi.reshape(1)
        flat = x.transpose(0, self._axis(x)).reshape(x.shape[self._axis(x)], -1)
        return torch.aminmax(flat, dim=1)

    def _combine(self, old, new, widen):
        if self.update_method is ScaleUpdateMethod.MovingAverage:
            return self.momentum * old + (1.0 - self.momentum) * new
        return torch.maximum(old, new) if widen == "max" else torch.minimum(old, new)

    @torch.no_grad()
    def update(self, x):
        lo, hi = self._batch_min_max(x)
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        first = int(self.num_updates) == 0
        if self.symmetric:
            new_scale = torch.maximum(lo.abs(), hi.abs()) / self.quant_max
            if not first:
                widen = torch.maximum(self.scale, new_scale)
                new_scale = torch.where(self._outgrown(self.scale, new_scale), widen,
                                        self._combine(self.scale, new_scale, "max"))
            scale = torch.where(finite, new_scale, self.scale)
            self.scale.copy_(scale.clamp(min=FEATURE_SCALE_FLOOR))
            self.running_max.copy_(self.scale * self.quant_max)
            self.running_min.copy_(-self.running_max)
        else:
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
            if not first:
                outgrown = self._outgrown(self.running_max - self.running_min, hi - lo)
                lo = torch.where(outgrown, torch.minimum(self.running_min, lo), self._combine(self.running_min, lo, "min"))
                hi = torch.where(outgrown, torch.maximum(self.running_max, hi), self._combine(self.running_max, hi, "max"))
            lo = torch.where(finite, lo, self.running_min)
            hi = torch.where(finite, hi, self.running_max)
            self.running_min.copy_(lo)
            self.running_max.copy_(hi)
            scale = ((hi - lo) / (self.quant_max - self.quant_min)).clamp(min=FEATURE_SCALE_FLOOR)
            zero_point = (self.quant_min - torch.round(lo / scale)).clamp(self.quant_min, self.quant_max)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point.to(torch.int32))
        self.num_updates += 1

    def _outgrown(self, running_width, batch_width):
        if self.update_method is not ScaleUpdateMethod.MovingAverage:
            return torch.zeros_like(batch_width, dtype=torch.bool)
        return batch_width > OUTGROWN_FACTOR * running_width

    def fake_quantize(self, x):
        if not self.training:
            shape = [1] * x.dim()
            if self.per_channel:
                shape[self._axis(x)] = -1
            scale, zero = self.scale.reshape(shape), self.zero_point.reshape(shape)
            q = torch.clamp(torch.round(x / scale) + zero, self.quant_min, self.quant_max)
            return self._straight_through(x, (q - zero) * scale)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self._axis(x), self.quant_min, self.quant_max)
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale, self.zero_point, self.quant_min, self.quant_max)

    def forward(self, x):
        if not (self.training or self.observing):
            return self.fake_quantize(x)
        self.update(x)
        return _OnGrid.apply(x, self.fake_quantize(x.detach()))  # was self._straight_through(x, ...)


class _OnGrid(torch.autograd.Function):
    """The one deliberate change from the old code (issue 11): training outputs the fused
    kernels' values `q` themselves, with the identity gradient. The old `x + (q - x).detach()`
    left values beyond twice the range up to half a float step of x off the grid, and turned
    infinite ones into NaN; now training gives the int8 model's value for every input."""

    @staticmethod
    def forward(ctx, x, q):
        return q.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _reference_layer_forward(self, x):
    if self.training:
        y = apply_weights(self.layer, x, reference_fake_quantize_weight(self.layer.weight, self.bits), self.layer.bias)
        if self.bn is not None:
            y = self.bn(y)
        # was: return self.output_quant(apply_activation(y, self.activation))
        quantized = self.output_quant(apply_activation(y.detach(), self.activation))
        return _ActivationAtOutput.apply(y, quantized, self.activation)
    return super(type(self), self).forward(x)


class _ActivationAtOutput(torch.autograd.Function):
    """The second deliberate change (issue 11): ReLU/ReLU6's gradient is read at the layer's
    quantized output instead of the float one (torch's own backward formulas, at `q`)."""

    @staticmethod
    def forward(ctx, y, q, activation):
        ctx.activation = activation
        ctx.save_for_backward(q)
        return q.clone()

    @staticmethod
    def backward(ctx, grad):
        (q,) = ctx.saved_tensors
        if ctx.activation == "relu":
            return grad.masked_fill(q <= 0, 0.0), None, None
        if ctx.activation == "relu6":
            return grad.masked_fill((q <= 0) | (q >= 6), 0.0), None, None
        return grad, None, None


class ReferenceQuantConv2d(QuantConv2d):
    forward = _reference_layer_forward


class ReferenceQuantLinear(QuantLinear):
    forward = _reference_layer_forward


REFERENCE_CLASS = {FeatureQuantizer: ReferenceFeatureQuantizer, QuantConv2d: ReferenceQuantConv2d,
                   QuantLinear: ReferenceQuantLinear}


def as_reference(model: nn.Module) -> nn.Module:
    for m in model.modules():
        m.__class__ = REFERENCE_CLASS.get(type(m), type(m))
    return model


# ------------------------------------------------------------------------------ the test models


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand 1x1 + ReLU6, depthwise 3x3 + ReLU6, project 1x1, residual add."""

    def __init__(self, channels: int, expand: int = 4):
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.project(self.depthwise(self.expand(x)))


class SmallNet(nn.Module):
    """Conv+BN+ReLU (biased), Conv+BN+ReLU6, an inverted residual block, pool, Linear+ReLU, Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.block = InvertedResidual(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu6(self.bn2(self.conv2(x)))
        x = self.block(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


CONFIGS = {
    "default": QuantConfig(),
    "per_channel": QuantConfig(feature_scale_stat_method="PerChannel"),
    "maximum": QuantConfig(scale_update_method="Maximum"),
    "symmetric": QuantConfig(symmetric_features=True),
    "4bit-per_channel-symmetric-m0.9": QuantConfig(bits=4, feature_bits=4, momentum=0.9,
                                                   feature_scale_stat_method="PerChannel",
                                                   symmetric_features=True),
}


def batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded batches; the third is 5x wider (an outgrown range), the fourth shifted negative."""
    g = torch.Generator().manual_seed(1)
    out = []
    for step in range(steps):
        x = torch.randn(4, 3, 10, 10, generator=g)
        x = x * 5.0 if step == 2 else x - 1.5 if step == 3 else x
        out.append((x, torch.randint(0, 5, (4,), generator=g)))
    return out


def train(model: nn.Module, data) -> list[torch.Tensor]:
    """SGD steps (momentum, weight decay); returns the input gradients of the odd steps (the
    even ones take images without a gradient, as training does)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    grads = []
    for step, (x, y) in enumerate(data):
        x = x.clone().requires_grad_(step % 2 == 1)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if x.requires_grad:
            grads.append(x.grad)
    return grads


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


def assert_at_the_range_ends(quantizer: FeatureQuantizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """Training saturates +-inf at the range's ends, as the int8 model does; NaN stays NaN."""
    shape = quantizer._grid_shape(x)
    scale, zero = quantizer.scale.reshape(shape), quantizer.zero_point.reshape(shape)
    for end, code in ((math.inf, quantizer.quant_max), (-math.inf, quantizer.quant_min)):
        expected = ((code - zero) * scale).expand_as(x)
        assert torch.equal(y.detach()[x == end], expected[x == end])
    assert torch.equal(y.isnan(), x.isnan())


def assert_same_values(a: torch.Tensor, b: torch.Tensor) -> None:
    """torch.equal, with NaN equal to NaN."""
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(nan=0.0), b.nan_to_num(nan=0.0))


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_and_test_phase_match_the_old_implementation_bit_for_bit(name):
    check_training_and_test_phase(name)


@pytest.mark.parametrize("name", ["default", "symmetric"])
def test_blockwise_fake_quant_of_large_features_matches_too(name, monkeypatch):
    """Large per-tensor features are fake-quantized block by block: blocks of 37 elements here
    (features of 400 to 3200 elements; the last block of each is shorter)."""
    monkeypatch.setattr(fake_quant, "BLOCK", 37)
    check_training_and_test_phase(name)


def check_training_and_test_phase(name: str) -> None:
    torch.manual_seed(0)
    float_model = SmallNet()
    new, old = turn_quantize(float_model, CONFIGS[name]), as_reference(turn_quantize(float_model, CONFIGS[name]))
    assert isinstance(old.get_submodule("conv1"), ReferenceQuantConv2d)
    data = batches(5)
    new_grads, old_grads = train(new, data), train(old, data)
    assert len(new_grads) == len(old_grads) == 2
    for step, (g_new, g_old) in enumerate(zip(new_grads, old_grads)):
        assert torch.equal(g_new, g_old), f"input gradient of step {step}"
    assert_same_tensors(new.state_dict(), old.state_dict())
    x = torch.randn(6, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(new.eval()(x), old.eval()(x))


@pytest.mark.parametrize("name", ["default", "maximum", "symmetric"])
def test_in_place_layer_outputs_equal_the_quantizer_modules(name, monkeypatch):
    """A layer's activation and output quantizer in place on its output (CPU, per tensor) give
    the values, ranges and gradients of the quantizer module path (GPU, per channel, MNN)."""
    torch.manual_seed(0)
    float_model = SmallNet()
    in_place, modules = turn_quantize(float_model, CONFIGS[name]), turn_quantize(float_model, CONFIGS[name])
    data = batches(5)
    in_place_grads = train(in_place, data)
    monkeypatch.setattr(activation_quant, "_in_place_applies", lambda quantizer, y: False)
    module_grads = train(modules, data)
    for step, (g_in_place, g_modules) in enumerate(zip(in_place_grads, module_grads)):
        assert torch.equal(g_in_place, g_modules), f"input gradient of step {step}"
    assert_same_tensors(in_place.state_dict(), modules.state_dict())


@pytest.mark.parametrize("block", [None, 7], ids=["whole", "blocks"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_quantizer_guards_match_the_old_implementation(name, block, monkeypatch):
    """First batch, outgrown and shrinking ranges, non-finite and all-zero batches, values far
    outside the range (where the old `x + (q - x)` was not `q` in float), linear and conv
    features; whole tensors, or blocks of 7 elements."""
    if block is not None:
        monkeypatch.setattr(fake_quant, "BLOCK", block)
    g = torch.Generator().manual_seed(3)
    new, old = FeatureQuantizer(CONFIGS[name], 4), ReferenceFeatureQuantizer(CONFIGS[name], 4)
    new.train(), old.train()
    sequence = [
        torch.randn(2, 4, 3, 3, generator=g),
        torch.randn(2, 4, 3, 3, generator=g) * 10.0,  # outgrown
        torch.randn(2, 4, 3, 3, generator=g) * 0.1,  # shrinking
        torch.full((2, 4, 3, 3), float("nan")),
        torch.randn(2, 4, 3, 3, generator=g).index_fill_(1, torch.tensor([2]), float("inf")),
        torch.zeros(2, 4, 3, 3),
        torch.randn(2, 4, 3, 3, generator=g) * 1e4 + 3.0,  # far outside the running range
        torch.randn(2, 4, 3, 3, generator=g).abs(),  # ReLU-like
    ]
    for step, x in enumerate(sequence):
        x_new, x_old = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_new, y_old = new(x_new), old(x_old)
        assert_same_values(y_new, y_old.where(x.isfinite(), y_new))  # the fused kernels' cast of inf is undefined
        assert_at_the_range_ends(new, x, y_new)
        seed = torch.randn(x.shape, generator=g)
        y_new.backward(seed), y_old.backward(seed)
        assert torch.equal(x_new.grad, x_old.grad), step
        assert_same_tensors(new.state_dict(), old.state_dict())
        if x.isfinite().all():  # without a gradient (the fused kernels' int64 cast of NaN/inf is undefined)
            assert torch.equal(new(x * 0.5), old(x * 0.5)), step
    linear = torch.randn(5, 4, generator=g) * 3.0  # channel-last features of a Linear
    new.channel_axis = old.channel_axis = -1
    assert torch.equal(new(linear), old(linear))
    assert_same_tensors(new.state_dict(), old.state_dict())


@pytest.mark.parametrize("name", ["default", "per_channel", "symmetric"])
def test_calibration_matches_the_old_implementation(name):
    """PTQ calibration (eval, observing) updates the ranges with the same code."""
    torch.manual_seed(0)
    float_model = SmallNet()
    new, old = turn_quantize(float_model, CONFIGS[name]), as_reference(turn_quantize(float_model, CONFIGS[name]))
    data = [x for x, _ in batches(3)]
    calibrate(new, data), calibrate(old, data)
    assert_same_tensors(new.state_dict(), old.state_dict())
    with torch.no_grad():
        assert torch.equal(new(data[0]), old(data[0]))


def test_fake_quantize_values_equal_torchs_fused_kernels_at_ties_and_bounds():
    """Exact ties `(k + 1/2) * scale`, values one float step off them, the range ends, far
    outside, zero points at 0, inside and at 255: the vectorized path rounds exactly as torch's
    fused kernels do, per channel and per tensor, asymmetric and symmetric."""
    q = FeatureQuantizer(QuantConfig(feature_scale_stat_method="PerChannel"), 3).train()
    q.update(torch.tensor([[-0.37, 0.0], [-0.5, 1.1], [0.0, 9.1]]).T.reshape(2, 3, 1, 1))
    assert q.zero_point.tolist() == [255, 80, 0]
    k = torch.arange(-300, 300, dtype=torch.float32) + 0.5
    ties = (k[None, :] * q.scale[:, None]).reshape(1, 3, 1, -1)
    inf = torch.tensor(float("inf"))
    far = torch.randn(1, 3, 1, 600, generator=torch.Generator().manual_seed(5)) * 1e3
    x = torch.cat([ties, ties.nextafter(inf), ties.nextafter(-inf), far], dim=0)
    fused = torch.fake_quantize_per_channel_affine(x, q.scale, q.zero_point, 1, q.quant_min, q.quant_max)
    assert torch.equal(q.fake_quantize(x), fused)
    for c in range(3):
        for symmetric in (False, True):
            per_tensor = FeatureQuantizer(QuantConfig(symmetric_features=symmetric)).train()
            per_tensor.scale.copy_(q.scale[c:c + 1])
            if not symmetric:
                per_tensor.zero_point.copy_(q.zero_point[c:c + 1])
            fused = torch.fake_quantize_per_tensor_affine(x, per_tensor.scale, per_tensor.zero_point,
                                                          per_tensor.quant_min, per_tensor.quant_max)
            assert torch.equal(per_tensor.fake_quantize(x), fused), (c, symmetric)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_weight_fake_quant_values_and_gradient_match_the_fused_kernel(bits):
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(6, 3, 3, 3, generator=g) * torch.logspace(-8, 1, 6).reshape(6, 1, 1, 1)
    weight[2] = 0.0  # an all-zero channel: the scale floor
    w_new, w_old = weight.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    y_new, y_old = fake_quantize_weight(w_new, bits), reference_fake_quantize_weight(w_old, bits)
    assert torch.equal(y_new, y_old)
    seed = torch.randn(weight.shape, generator=g)
    y_new.backward(seed), y_old.backward(seed)
    assert torch.equal(w_new.grad, w_old.grad)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", ["MovingAverage", "Maximum"])
def test_host_range_update_equals_the_tensor_one(symmetric, method):
    """`_update_on_host` (per tensor, CPU: float32 scalars) ends with the buffers of
    `_update_with_tensors`, bit for bit, through a non-finite first batch, outgrown batches,
    all-positive and all-negative ones, zeros and ordinary ones."""
    config = QuantConfig(symmetric_features=symmetric, scale_update_method=method, momentum=0.9)
    host, tensors = FeatureQuantizer(config), FeatureQuantizer(config)
    torch.manual_seed(0)
    batches = [torch.tensor([float("nan"), 1.0]), torch.tensor([-math.inf, 2.0]), torch.randn(64),
               torch.randn(64) * 10, torch.rand(64) + 0.5, -torch.rand(64) - 3.0, torch.zeros(8),
               torch.tensor([-3e38, 3e38]), torch.tensor([-1.0, 2.0])]  # a width past float32's range
    batches += [torch.randn(256) * s for s in torch.rand(20).tolist()]
    for x in batches:
        host._update_on_host(x)
        tensors._update_with_tensors(x)
        for name, buffer in host.named_buffers():
            assert torch.equal(buffer, tensors.get_buffer(name)), (name, buffer, tensors.get_buffer(name))


def test_weights_quantized_ahead_are_used_only_while_unchanged():
    """The graph's first layer fake-quantizes every layer's weight before the forward; a layer
    uses that tensor only if its weight is still the same tensor, unchanged since (an optimizer
    step or a loaded state in between means quantizing again)."""
    torch.manual_seed(0)
    model = turn_quantize(SmallNet()).train()
    first, fc2 = model.get_submodule("conv1"), model.get_submodule("fc2")
    assert first._layers_ahead == [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    model(torch.randn(2, 3, 10, 10))
    assert all(layer._weight_ahead is None for layer in first._layers_ahead)  # each used its own
    fc2._quantize_weight_ahead()
    ahead = fc2._weight_ahead[2]
    assert fc2._fake_quantized_weight() is ahead
    fc2._quantize_weight_ahead()
    with torch.no_grad():
        fc2.layer.weight.mul_(3.0)
    fresh = fc2._fake_quantized_weight()
    assert torch.equal(fresh, fake_quantize_weight(fc2.layer.weight, fc2.bits))
    assert not torch.equal(fresh, ahead)
