"""Adds, average pools and quantized layers that the test phase computes as integer kernels:
where `turn_quantize` puts them, that training and calibration compute exactly what they computed
before, and when the test phase uses the kernel arithmetic."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qat_runner.engine import QuantLayer, calibrate, turn_quantize
from qat_runner.engine.config import QuantConfig
from qat_runner.engine.fake_quant import FeatureQuantizer
from qat_runner.engine.integer_layers import integer_kernel_output
from qat_runner.engine.integer_ops import (
    IntegerOp,
    QuantAdd,
    QuantAvgPool2d,
    QuantGlobalAvgPool,
    qparams,
    stored_integers,
)
from qat_runner.engine.ort_kernels import qlinear_add


class Block(nn.Module):
    """Residual adds (one before a ReLU), average pools of several kinds, a concat, global pools."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.c, self.c2, self.d, self.e, self.f = (nn.Conv2d(i, 8, 1) for i in (16, 16, 8, 8, 8))
        self.se = nn.Conv2d(8, 10, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.relu(self.a(x) + x)                                  # add -> ReLU -> quantizer
        y = torch.cat([x, self.b(x)], 1)                              # quantized (c reads it)
        pooled = F.avg_pool2d(y, 3, stride=1, padding=1, count_include_pad=False)
        y = self.d(self.pool(self.c(y))) + self.c2(pooled)[:, :, ::2, ::2]  # a slice: float add
        z = self.e(F.avg_pool2d(x, 2, ceil_mode=True))                # ceil mode: float pool
        z = self.se(F.adaptive_avg_pool2d(z, 1))
        logits = self.fc(torch.flatten(self.f(y).mean((2, 3), keepdim=True), 1))
        return logits + torch.flatten(z, 1)                           # not quantized after: float


def integer_ops(model: nn.Module) -> dict[str, IntegerOp]:
    return {name: m for name, m in model.named_modules() if isinstance(m, IntegerOp)}


def float_twin(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy whose integer ops are their plain float ops: the QAT model as it was before them."""
    twin = copy.deepcopy(model)
    for name, op in integer_ops(twin).items():
        twin.add_submodule(name, op.plain())
    return twin


@pytest.fixture
def block_qat() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return turn_quantize(Block())


def test_integer_ops_are_placed_where_inputs_and_output_are_quantized(block_qat):
    kinds = sorted(type(m).__name__ for m in integer_ops(block_qat).values())
    assert kinds == ["QuantAdd", "QuantAvgPool2d", "QuantAvgPool2d", "QuantGlobalAvgPool", "QuantGlobalAvgPool"]
    assert sorted(m.how for m in integer_ops(block_qat).values() if isinstance(m, QuantGlobalAvgPool)) == [
        "adaptive", "mean"]
    adds = [m for m in integer_ops(block_qat).values() if isinstance(m, QuantAdd)]
    assert [a.relu_between for a in adds] == [True]
    pools = sorted((m.kernel_size, m.count_include_pad) for m in integer_ops(block_qat).values()
                   if isinstance(m, QuantAvgPool2d))
    assert pools == [((2, 2), True), ((3, 3), False)]
    # what stayed a float op: the add of a sliced tensor, the ceil-mode pool, the last add
    code = block_qat.code
    assert code.count("avg_pool2d(") == 1 and "ceil_mode = True" in code
    assert code.count(" + ") == 2


def test_torchvision_residual_adds_and_global_pool():
    from torchvision.models import mobilenet_v2, resnet18

    mobilenet = turn_quantize(mobilenet_v2(num_classes=10))
    kinds = [type(m).__name__ for m in integer_ops(mobilenet).values()]
    assert kinds.count("QuantAdd") == 10 and kinds.count("QuantGlobalAvgPool") == 1
    resnet = turn_quantize(resnet18(num_classes=10))
    adds = [m for m in integer_ops(resnet).values() if isinstance(m, QuantAdd)]
    # 8 residual adds; the last one feeds a float ReLU and pool, so it stays float
    assert len(adds) == 7 and all(a.relu_between for a in adds)
    assert not [m for m in integer_ops(resnet).values() if isinstance(m, QuantGlobalAvgPool)]


@pytest.mark.parametrize("scale_update_method", ["MovingAverage", "Maximum"])
def test_training_and_calibration_compute_what_they_computed_before(scale_update_method):
    torch.manual_seed(0)
    model = turn_quantize(Block(), scale_update_method=scale_update_method)
    twin = float_twin(model)
    assert integer_ops(model) and not integer_ops(twin)
    batches = [torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for m in (model, twin):
        calibrate(m, batches, 2)
    for (k, a), (k2, b) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    model.train()
    twin.train()
    out, twin_out = model(batches[2]), twin(batches[2])
    assert torch.equal(out, twin_out)
    out.square().sum().backward()
    twin_out.square().sum().backward()
    for (k, a), (_, b) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), k


def quantizer(scale: float, zero_point: int) -> FeatureQuantizer:
    q = FeatureQuantizer(QuantConfig(8, 8, "PerTensor", "MovingAverage", 0.99, False)).eval()
    q.scale.fill_(scale)
    q.zero_point.fill_(zero_point)
    return q


def test_eval_add_is_qlinear_add_on_the_output_grid():
    qa, qb, out_q = quantizer(0.05, 120), quantizer(0.025, 3), quantizer(0.05, 100)  # ratios 1, 1/2: ties
    add = QuantAdd(qa, qb, out_q).eval()
    gen = torch.Generator().manual_seed(0)
    a, b = qa(torch.randn(4, 8, 12, 12, generator=gen) * 3), qb(torch.rand(4, 8, 12, 12, generator=gen) * 6)
    with torch.no_grad():
        out = add(a, b)
    expected = qlinear_add(stored_integers(a, qa), stored_integers(b, qb), qparams(qa), qparams(qb), qparams(out_q))
    assert torch.equal(stored_integers(out, out_q), expected)
    assert torch.equal(out_q(out), out)  # on the grid: the quantizer after it keeps it as it is
    assert not torch.equal(out, out_q(a + b)), "no rounding case: the check proves nothing"
    add.train()
    assert torch.equal(add(a, b), a + b)
    add.eval()
    assert add.kernel_applies(a, b) and not add.kernel_applies(a, b[:, :1])  # broadcasting: float


def test_symmetric_int8_features_keep_the_float_test_phase():
    """onnxruntime leaves some int8-feature adds and convolutions in float: no kernel emulated."""
    torch.manual_seed(0)
    model = calibrate(turn_quantize(Block(), symmetric_features=True), [torch.randn(8, 3, 12, 12)])
    a = torch.randn(2, 8, 4, 4)
    assert integer_ops(model) and not any(op.kernel_applies() for op in integer_ops(model).values())
    assert not next(op for op in integer_ops(model).values() if isinstance(op, QuantAdd)).kernel_applies(a, a)
    stem = model.get_submodule("stem.0")
    assert integer_kernel_output(stem, torch.randn(2, 3, 12, 12)) is None


def test_no_kernel_while_observing_or_per_channel():
    torch.manual_seed(0)
    per_channel = turn_quantize(Block(), feature_scale_stat_method="PerChannel").eval()
    x = torch.randn(2, 8, 4, 4)
    assert all(not m.kernel_applies() for m in integer_ops(per_channel).values())
    layers = [m for m in per_channel.modules() if isinstance(m, QuantLayer)]
    assert layers and all(integer_kernel_output(m, x) is None for m in layers)
    model = turn_quantize(Block()).eval()
    ops = list(integer_ops(model).values())
    assert all(op.kernel_applies() for op in ops if not isinstance(op, QuantAdd)) and ops[0].kernel_applies(x, x)
    for q in model.modules():
        if isinstance(q, FeatureQuantizer):
            q.observing = True
    assert not any(op.kernel_applies() for op in ops)


def test_quantized_layer_uses_the_integer_kernel_only_where_the_artifact_has_one():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 12, 12)
    for bits, expect_kernel in ((8, True), (6, True), (4, False)):  # 4 bits: INT4 weights, float conv
        model = calibrate(turn_quantize(Block(), bits=bits), [x])
        stem = model.get_submodule("stem.0")
        assert (integer_kernel_output(stem, stem.input_quant(x)) is not None) == expect_kernel, bits
    model = calibrate(turn_quantize(nn.Sequential(nn.Linear(6, 4))), [torch.randn(5, 3, 6)])
    (linear,) = [m for m in model.modules() if isinstance(m, QuantLayer)]
    assert integer_kernel_output(linear, linear.input_quant(torch.randn(5, 6))) is not None
    assert integer_kernel_output(linear, linear.input_quant(torch.randn(5, 3, 6))) is None  # MatMul


def test_integer_layer_output_does_not_depend_on_float_summation_order():
    """The kernel path sums integers exactly: the same output for one sample or a batch, and
    the float path's rounding near ties does not appear."""
    torch.manual_seed(0)
    model = calibrate(turn_quantize(Block()), [torch.randn(16, 3, 12, 12)])
    x = torch.randn(9, 3, 12, 12)
    with torch.no_grad():
        batch = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(batch, single)


def test_eval_gradients_pass_straight_through_the_integer_kernels():
    """Input gradients in the test phase (saliency, attacks) as the float ops give them."""
    torch.manual_seed(0)
    model = calibrate(turn_quantize(Block()), [torch.randn(16, 3, 12, 12)])
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
    x.requires_grad_(True)
    out = model(x)
    assert torch.equal(out.detach(), expected)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
