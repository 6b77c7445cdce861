"""The size-budget planner: exact size arithmetic, cheapest accuracy per byte first, clear errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qat_runner.config import ConfigError
from qat_runner.engine import QuantConfig
from qat_runner.mixed_precision import LayerSensitivity, choose_bits, layer_sensitivity

ROWS = [
    LayerSensitivity("stem", 1_000, 0.5, 0.40, 1.0),     # very sensitive, small
    LayerSensitivity("big", 100_000, 0.89, 0.01, 0.1),   # cheap per byte
    LayerSensitivity("mid", 20_001, 0.88, 0.02, 0.2),
    LayerSensitivity("free", 5_000, 0.9, 0.0, 0.05),
]


def test_cheapest_layers_move_first_until_the_budget_fits():
    uniform = 130_000
    # float 1 MB, budget 8%: 80 kB; "free" saves 2,500 B, "big" 50,000 B -> 77,500 B fits
    bits = choose_bits(ROWS, uniform, 1_000_000, 0.08, high=8, low=4)
    assert bits == {"stem": 8, "big": 4, "mid": 8, "free": 4}


def test_saving_is_exact_for_odd_sizes():
    bits = choose_bits(ROWS, 130_000, 1_000_000, 0.068, high=8, low=4)
    saved = sum(r.params - math.ceil(r.params / 2) for r in ROWS if bits[r.name] == 4)
    assert 130_000 - saved <= 68_000 and bits["mid"] == 4 and bits["stem"] == 8


def test_unreachable_budget_names_the_smallest_possible():
    with pytest.raises(ConfigError) as info:
        choose_bits(ROWS, 130_000, 1_000_000, 0.01, high=8, low=4)
    assert "quant.size_budget=0.01 cannot be met" in str(info.value) and "0.067" in str(info.value)


def test_budget_needs_int4_packing():
    with pytest.raises(ConfigError, match="sensitivity_bits <= 4"):
        choose_bits(ROWS, 130_000, 1_000_000, 0.2, high=8, low=6)


def test_sensitivity_ranks_every_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()
    calibration = [torch.randn(8, 1, 4, 4) for _ in range(2)]
    test = [(torch.randn(16, 1, 4, 4), torch.randint(0, 3, (16,)))]
    rows = layer_sensitivity(model, QuantConfig(), calibration, test, bits=2)
    assert sorted(r.name for r in rows) == ["0", "3"]
    assert [r.drop for r in rows] == sorted((r.drop for r in rows), reverse=True)
    assert {r.params for r in rows} == {36, 192} and all(r.logit_mse > 0 for r in rows)
