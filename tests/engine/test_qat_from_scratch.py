"""QAT from an untrained or barely trained model: the quantizers never produce NaN.

Ranges calibrated in eval mode with untrained BatchNorm statistics describe features that training
never produces (a random-init MobileNetV2's eval outputs shrink to ~1e-6); blended into training
they saturated every feature and the straight-through gradients overflowed to NaN.
"""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch.nn import functional as F

from qat_runner.engine import FeatureQuantizer, QuantConfig, calibrate, turn_quantize
from qat_runner.engine.calibrate import untrained_batch_norms

pytestmark = pytest.mark.slow

MODELS = ("mobilenet_v2", "shufflenet_v2_x0_5", "efficientnet_b0", "resnet18")


def _batches(count: int, batch: int = 4, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(count)]


def _train(model: torch.nn.Module, batches, lr: float) -> list[float]:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert math.isfinite(float(torch.nn.utils.get_total_norm(grads))), f"gradient at step {len(losses) + 1}"
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("name", "float_steps"), [(name, 0) for name in MODELS] + [("mobilenet_v2", 2)],
                         ids=[f"{name}-untrained" for name in MODELS] + ["mobilenet_v2-barely-trained"])
def test_twenty_qat_steps_from_random_init_stay_finite(name, float_steps):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    if float_steps:
        _train(model, _batches(float_steps, seed=1), lr=0.01)
    qat = calibrate(turn_quantize(model), [x for x, _ in _batches(2, seed=2)])
    losses = _train(qat, _batches(20, seed=3), lr=1e-3)
    assert all(math.isfinite(v) for v in losses), losses
    assert all(torch.isfinite(p).all() for p in qat.parameters())
    for quantizer in qat.modules():
        if isinstance(quantizer, FeatureQuantizer):
            assert torch.isfinite(quantizer.scale).all() and (quantizer.scale > 0).all()
    with torch.no_grad():
        assert torch.isfinite(qat.eval()(_batches(1, seed=4)[0][0])).all(), "the test phase too"


def test_calibration_uses_batch_statistics_only_where_bn_is_untrained_and_restores_them():
    torch.manual_seed(0)
    model = torchvision.models.get_model("mobilenet_v2", weights=None, num_classes=10)
    qat = turn_quantize(model)
    assert len(untrained_batch_norms(qat)) == 52
    before = {k: v.clone() for k, v in qat.state_dict().items() if "bn." in k or "running" in k}
    calibrate(qat, [x for x, _ in _batches(2)])
    after = qat.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items() if "quant" not in k), \
        "calibration must leave BatchNorm statistics as they were"
    assert not qat.training and not any(m.training for m in qat.modules())
    # the widest feature range reflects batch-normalised features, not the collapsed eval ones
    widths = [float((q.running_max - q.running_min).max()) for q in qat.modules() if isinstance(q, FeatureQuantizer)]
    assert min(widths) > 1e-2, min(widths)

    for bn in untrained_batch_norms(qat):  # statistics that moved over many batches are trusted
        bn.running_var.fill_(2.0)
        bn.num_batches_tracked.fill_(100)
    assert untrained_batch_norms(qat) == []


def test_checkpoint_without_batch_count_is_trusted_when_its_statistics_moved():
    bn = torch.nn.BatchNorm2d(4)
    assert untrained_batch_norms(bn) == [bn]
    bn.running_mean.fill_(0.5)  # loaded from an old checkpoint: num_batches_tracked stays 0
    assert untrained_batch_norms(bn) == []
    bn.num_batches_tracked.fill_(3)  # three batches at momentum 0.1: 73% of the initial values left
    assert untrained_batch_norms(bn) == [bn]


@pytest.mark.parametrize("symmetric", [False, True])
def test_outgrown_range_widens_at_once_and_non_finite_batches_are_ignored(symmetric):
    q = FeatureQuantizer(QuantConfig(symmetric_features=symmetric))
    q.train()
    q(torch.full((4, 3), 1e-6))  # a range from features training no longer produces
    q(torch.linspace(-2.0, 3.0, 20))
    assert float(q.running_max) == pytest.approx(3.0, rel=1e-5), "widened at once, not by 1% a step"

    scale = q.scale.clone()
    q(torch.tensor([1.0, float("nan"), 2.0]))
    q(torch.tensor([1.0, float("inf")]))
    assert torch.equal(q.scale, scale), "a non-finite batch leaves the running range as it was"

    q(torch.linspace(-2.0, 4.0, 20))  # an ordinary batch still blends in (moving average 0.99)
    assert float(q.running_max) == pytest.approx(0.99 * 3.0 + 0.01 * 4.0, rel=1e-5)


def test_maximum_keeps_its_own_rule_for_outgrown_batches():
    q = FeatureQuantizer(QuantConfig(scale_update_method="Maximum"))
    q.train()
    q(torch.tensor([-1.0, 1.0]))
    q(torch.tensor([-0.1, 5.0]))  # over twice as wide: Maximum still only widens, end by end
    assert (float(q.running_min), float(q.running_max)) == pytest.approx((-1.0, 5.0))
