"""Shared fixtures for the engine tests: a tiny data set (scikit-learn digits) and a LeNet-like net."""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from torch import nn

# The test models are tiny: with several intra-op threads, OpenMP's synchronisation costs far more
# than the work (up to 10x slower on a 2-core machine). Use one thread unless the caller chose.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@dataclass(frozen=True)
class Digits:
    """scikit-learn digits as float images N x 1 x 8 x 8 in [0, 1], with a fixed split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@pytest.fixture(scope="session")
def digits() -> Digits:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    y = torch.as_tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_train = 1400
    return Digits(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


class TinyLeNet(nn.Module):
    """Conv->BN->ReLU, Conv->BN->ReLU6, MaxPool, flatten, Linear->ReLU, Linear (8x8 input).

    Not qat_runner.models.LeNet: the engine tests check what this one has and LeNet lacks: a
    biased conv beside an unbiased one, four layers named conv1/conv2/fc1/fc2 (fusion kinds and
    shared quantizers by name) and a `width` knob.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8, image_size: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU6()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2 * width * (image_size // 2) ** 2, 32)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.flatten(self.pool(x))
        x = self.relu3(self.fc1(x))
        return self.fc2(x)


@pytest.fixture
def make_lenet():
    """Factory: make_lenet(seed=0, **kwargs) -> a freshly initialised TinyLeNet."""

    def make(seed: int = 0, **kwargs) -> TinyLeNet:
        torch.manual_seed(seed)
        return TinyLeNet(**kwargs)

    return make
