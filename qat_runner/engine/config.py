"""Quantization settings: the two MNN method names and a validated config dataclass.

MNN silently falls back to 8 bits on a bad bit width; we refuse bad input with a ValueError
that names the bad value and what is accepted.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class FeatureScaleStatMethod(str, Enum):
    """How many scales a feature (activation) tensor gets: one, or one per channel."""

    PerTensor = "PerTensor"
    PerChannel = "PerChannel"


class ScaleUpdateMethod(str, Enum):
    """How the running feature range follows the batches (MNN's two rules)."""

    Maximum = "Maximum"
    MovingAverage = "MovingAverage"


MIN_BITS, MAX_BITS = 2, 8


def _check_bits(name: str, value: object) -> int:
    # bool is an int subclass; True would silently mean 1 bit.
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(
            f"{name}={value!r} is not accepted: use an integer from {MIN_BITS} to {MAX_BITS}"
        )
    return value


def _parse_enum(name: str, value: object, enum: type[Enum]) -> Enum:
    if isinstance(value, enum):
        return value
    accepted = [m.value for m in enum]
    if isinstance(value, str):
        for member in enum:
            if member.value.lower() == value.lower():
                return member
    raise ValueError(f"{name}={value!r} is not accepted: use one of {', '.join(accepted)}")


@dataclass(frozen=True)
class QuantConfig:
    """Everything `turn_quantize` needs to know; validated on construction.

    bits: weight bit width (symmetric, per output channel, integers in [-L, L],
        L = 2**(bits-1) - 1).
    feature_bits: activation bit width.
    feature_scale_stat_method: one feature scale per tensor or per channel.
    scale_update_method: running feature range by moving average or maximum.
    momentum: moving-average weight of the old value, s = m*s + (1-m)*s_new.
    symmetric_features: symmetric int8 features (zero point 0) instead of asymmetric uint8
        with a zero point (MNN v2's default, and the one onnxruntime fuses best after ReLU).
    """

    bits: int = 8
    feature_bits: int = 8
    feature_scale_stat_method: FeatureScaleStatMethod | str = FeatureScaleStatMethod.PerTensor
    scale_update_method: ScaleUpdateMethod | str = ScaleUpdateMethod.MovingAverage
    momentum: float = 0.99
    symmetric_features: bool = False

    def __post_init__(self) -> None:
        _check_bits("bits", self.bits)
        _check_bits("feature_bits", self.feature_bits)
        set_ = object.__setattr__  # frozen dataclass: normalise strings to enums once
        set_(self, "feature_scale_stat_method", _parse_enum(
            "feature_scale_stat_method", self.feature_scale_stat_method, FeatureScaleStatMethod))
        set_(self, "scale_update_method", _parse_enum(
            "scale_update_method", self.scale_update_method, ScaleUpdateMethod))
        m = self.momentum
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 < m < 1.0:
            raise ValueError(
                f"momentum={m!r} is not accepted: use a number strictly between 0 and 1"
            )
        if not isinstance(self.symmetric_features, bool):
            raise ValueError(
                f"symmetric_features={self.symmetric_features!r} is not accepted: use true or false"
            )
