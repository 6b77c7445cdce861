"""The artifact computes what the test phase computes, to the bit, where onnxruntime runs integer
kernels: QLinearConv/QGemm, QLinearAdd (residual adds), QLinearConcat, QLinearAveragePool,
QLinearGlobalAveragePool, uint8 max pooling. Torchvision classifiers and a small net with every
pooling kind, on the digits test split upsampled to 3x32x32."""
from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from helpers.models import torchvision_with_bn_statistics

from qat_runner.artifact import ArtifactCheck, check_artifact, runtime_op_counts, session
from qat_runner.engine import QuantLayer, calibrate, turn_quantize
from qat_runner.engine.export import export_int8_onnx
from qat_runner.engine.integer import to_integer_model
from qat_runner.engine.integer_ops import QuantAdd, QuantAvgPool2d, QuantGlobalAvgPool

SIZE = 32


class PoolNet(nn.Module):
    """Concatenated branches, average pools with and without the padding counted, a residual add
    and both spellings of a global average pool (inception / SE / classifier heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.b2 = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mix, self.branch_pool, self.conv1, self.conv2, self.proj = (nn.Conv2d(16, 16, 1) for _ in range(5))
        self.down = nn.AvgPool2d(2)
        self.se = nn.Conv2d(16, 10, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.cat([self.b1(x), self.b2(x)], 1)
        x = self.mix(y) + self.branch_pool(F.avg_pool2d(y, 3, stride=1, padding=1))
        x = self.conv2(self.down(self.conv1(x)))
        a = self.proj(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        s = self.se(F.adaptive_avg_pool2d(x, 1))
        return self.fc(torch.flatten(a.mean((2, 3), keepdim=True), 1)) + torch.flatten(s, 1)


def torchvision_model(name: str) -> nn.Module:
    return torchvision_with_bn_statistics(name)


def pool_net() -> nn.Module:
    torch.manual_seed(0)
    return PoolNet().eval()


MODELS = {  # name: (factory, integer kernels it must run besides QLinearConv/QGemm)
    "mobilenet_v2": (lambda: torchvision_model("mobilenet_v2"), {"QLinearAdd", "QLinearGlobalAveragePool"}),
    "resnet18": (lambda: torchvision_model("resnet18"), {"QLinearAdd", "NhwcMaxPool"}),
    "squeezenet1_0": (lambda: torchvision_model("squeezenet1_0"), {"QLinearConcat", "NhwcMaxPool"}),
    "poolnet": (pool_net, {"QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearAdd"}),
}
# where the test phase as it was (float ops on dequantized tensors) is known to differ on these
# inputs: there the bit-for-bit comparison demonstrably can fail
DIFFERED_BEFORE = ("mobilenet_v2", "resnet18", "squeezenet1_0")
TEST_IMAGES = 300  # agreement >= 99.9% on 300 samples means all of them


def as_images(x: torch.Tensor) -> torch.Tensor:
    """1x8x8 digits in [0, 1] -> 3x32x32, roughly zero-mean: real pixels, the input size of CIFAR."""
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return ((x - 0.3) / 0.4).repeat(1, 3, 1, 1)


@dataclass(frozen=True)
class Case:
    name: str
    model: torch.fx.GraphModule
    path: Path
    check: ArtifactCheck
    before_diff: float  # max |artifact - test phase as it was|


@pytest.fixture(scope="module", params=list(MODELS))
def case(request, digits, tmp_path_factory) -> Case:
    """Random init, calibrated on 128 training digits, exported; checked on 300 test digits."""
    factory, _ = MODELS[request.param]
    images = as_images(digits.x_test[:TEST_IMAGES])
    model = calibrate(turn_quantize(factory()), [as_images(digits.x_train[i:i + 64]) for i in (0, 64)])
    path = export_int8_onnx(model, images[:2], tmp_path_factory.mktemp(request.param) / "model.onnx")
    loader = DataLoader(TensorDataset(images, digits.y_test[:TEST_IMAGES]), batch_size=150)
    sess = session(path)
    artifact = sess.run(None, {sess.get_inputs()[0].name: images.numpy()})[0]
    with torch.no_grad():  # `to_integer_model` still computes the float ops of before
        before = to_integer_model(model)(images).numpy()
    return Case(request.param, model, path, check_artifact(path, model, loader),
                float(np.abs(before - artifact).max()))


def test_artifact_runs_the_integer_kernels_the_test_phase_computes(case):
    counts = runtime_op_counts(case.path)
    _, kernels = MODELS[case.name]
    assert all(counts[k] > 0 for k in kernels), counts
    modules = collections.Counter(type(m) for m in case.model.modules())
    assert counts["QLinearAdd"] == modules[QuantAdd]
    assert counts["QLinearAveragePool"] == modules[QuantAvgPool2d]
    assert counts["QLinearGlobalAveragePool"] == modules[QuantGlobalAvgPool]
    layers = sum(isinstance(m, QuantLayer) for m in case.model.modules())
    assert counts["QLinearConv"] + counts["QGemm"] == layers
    assert counts["AveragePool"] == counts["GlobalAveragePool"] == counts["Conv"] == counts["Gemm"] == 0, counts


def test_artifact_equals_test_phase_bit_for_bit(case):
    check = case.check
    assert check.samples == TEST_IMAGES
    assert check.agreement == 1.0, check
    assert check.max_logit_diff == 0.0, check
    if case.name in DIFFERED_BEFORE:
        assert case.before_diff > 0
