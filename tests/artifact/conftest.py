"""Fixtures shared by the artifact tests: the scikit-learn digits split, a LeNet-sized net,
its float pre-training and a short QAT run (the realistic workflow the artifact ships from)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from qat_runner.engine import calibrate, turn_quantize

BATCH_SIZE = 64


@dataclass(frozen=True)
class DigitsSplit:
    """Digits as N x 1 x 8 x 8 float images in [0, 1]; stratified 80/20 split, random_state=0."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def train_loader(self, seed: int = 0) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(self.x_train, self.y_train), batch_size=BATCH_SIZE,
                          shuffle=True, generator=generator)

    def test_loader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=128)


class ArtifactLeNet(nn.Module):
    """Conv2d->BN->ReLU, Conv2d->BN->ReLU6, MaxPool, Flatten, Linear->ReLU, Linear (1x8x8 input)."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU6()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2 * width * 4 * 4, 32)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.flatten(self.pool(x))
        return self.fc2(self.relu3(self.fc1(x)))


@pytest.fixture(scope="session")
def digits_split() -> DigitsSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]  # pixels are 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        images, data.target, test_size=0.2, random_state=0, stratify=data.target)
    return DigitsSplit(torch.from_numpy(x_train), torch.from_numpy(y_train).long(),
                       torch.from_numpy(x_test), torch.from_numpy(y_test).long())


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


@pytest.fixture(scope="module")
def float_lenet(digits_split: DigitsSplit) -> ArtifactLeNet:
    """The float LeNet after a few epochs of Adam (lr 1e-2) on the train split; fixed seed."""
    torch.manual_seed(0)
    model = ArtifactLeNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(5):
        model.train()
        for inputs, targets in digits_split.train_loader(seed=epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    model.eval()
    assert accuracy(model, digits_split.x_test, digits_split.y_test) > 0.9, "float pre-training failed"
    return model


def make_qat_lenet(float_model: nn.Module, digits: DigitsSplit, *, qat_epochs: int = 1,
                   seed: int = 0, **quant_kwargs) -> torch.fx.GraphModule:
    """turn_quantize -> calibrate on 4 batches -> short QAT (SGD lr 1e-3, momentum 0.9) -> eval."""
    torch.manual_seed(seed)
    qat = turn_quantize(float_model, **quant_kwargs)
    calibrate(qat, digits.train_loader(seed=seed), 4)
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-3, momentum=0.9)
    for epoch in range(qat_epochs):
        qat.train()
        for inputs, targets in digits.train_loader(seed=seed + 1 + epoch):
            optimizer.zero_grad()
            F.cross_entropy(qat(inputs), targets).backward()
            optimizer.step()
    return qat.eval()


@pytest.fixture(scope="session")
def qat_lenet_factory():
    """make(float_model, digits, bits=..., feature_scale_stat_method=..., ...) -> eval-mode QAT model."""
    return make_qat_lenet
