"""Quantization settings: the two MNN method names and a validated config dataclass.

MNN silently falls back to 8 bits on a bad bit width; we refuse bad input with a ValueError
that names the bad value and what is accepted.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from fnmatch import fnmatchcase


class FeatureScaleStatMethod(str, Enum):
    """How many scales a feature (activation) tensor gets: one, or one per channel."""

    PerTensor = "PerTensor"
    PerChannel = "PerChannel"


class ScaleUpdateMethod(str, Enum):
    """How the running feature range follows the batches (MNN's two rules)."""

    Maximum = "Maximum"
    MovingAverage = "MovingAverage"


class QuantScheme(str, Enum):
    """The numeric scheme: onnxruntime's integer kernels (`default`) or MNN's int8 runtime (`mnn`)."""

    default = "default"
    mnn = "mnn"


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


FLOAT = "float"  # quant.layers value: the layer stays unquantized


def _check_layers(layers: object) -> tuple[tuple[str, int | None], ...]:
    """quant.layers as (pattern, bits or None for float) pairs, in the mapping's order."""
    if isinstance(layers, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in layers):
        layers = dict(layers)
    if not isinstance(layers, Mapping):
        raise ValueError(f"layers={layers!r} is not accepted: use a mapping of module-name patterns to "
                         f"bits ({MIN_BITS}..{MAX_BITS}) or {FLOAT}")
    checked = []
    for pattern, bits in layers.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"layers key {pattern!r} is not accepted: use a module-name pattern such as "
                             "'features.0.*'")
        if bits is None or (isinstance(bits, str) and bits.lower() == FLOAT):
            checked.append((pattern, None))
            continue
        if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"layers.{pattern}={bits!r} is not accepted: use an integer from {MIN_BITS} "
                             f"to {MAX_BITS} or {FLOAT}")
        checked.append((pattern, bits))
    return tuple(checked)


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
    layers: per-layer weight bits, {fnmatch pattern over the float model's module names: bits
        or "float"}; the first pattern that matches a layer wins, unmatched layers get `bits`.
        Kept as a tuple of (pattern, bits or None) pairs, so the config stays hashable.
    scheme: `default` (ONNX-first: uint8 features, ties to even, running range in training,
        int32 bias) or `mnn` (MNN's numerics: signed int8 features with a zero point, roundf,
        each batch's own range in training, float bias; `engine/mnn_quant.py`).
    bn_momentum: torch's BatchNorm momentum during QAT (MNN's 0.99 is torch's 0.01): a converged
        model's running statistics move slowly instead of being replaced by 100 noisy batches
        at torch's default 0.1; None keeps the model's own.
    """

    bits: int = 8
    feature_bits: int = 8
    feature_scale_stat_method: FeatureScaleStatMethod | str = FeatureScaleStatMethod.PerTensor
    scale_update_method: ScaleUpdateMethod | str = ScaleUpdateMethod.MovingAverage
    momentum: float = 0.99
    symmetric_features: bool = False
    layers: Mapping[str, int | str | None] | tuple[tuple[str, int | None], ...] = ()
    scheme: QuantScheme | str = QuantScheme.default
    bn_momentum: float | None = 0.01

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
        set_(self, "layers", _check_layers(self.layers))
        set_(self, "scheme", _parse_enum("scheme", self.scheme, QuantScheme))
        bn = self.bn_momentum
        if bn is not None and (isinstance(bn, bool) or not isinstance(bn, (int, float)) or not 0.0 < bn <= 1.0):
            raise ValueError(f"bn_momentum={bn!r} is not accepted: use a number in (0, 1] or null")
        if self.scheme is QuantScheme.mnn:
            if self.feature_scale_stat_method is FeatureScaleStatMethod.PerChannel:
                raise ValueError("feature_scale_stat_method='PerChannel' is not accepted with scheme mnn: "
                                 "MNN has one scale per feature tensor (PerChannel is ignored since v1.2); "
                                 "use PerTensor")
            if self.symmetric_features:
                raise ValueError("symmetric_features=True is not accepted with scheme mnn: MNN's features "
                                 "are signed int8 with a zero point; use false")
        if not isinstance(self.symmetric_features, bool):
            raise ValueError(
                f"symmetric_features={self.symmetric_features!r} is not accepted: use true or false"
            )

    def bits_for(self, layer_name: str) -> int | None:
        """Weight bits of the layer named `layer_name` (None: it stays float)."""
        for pattern, bits in self.layers:
            if fnmatchcase(layer_name, pattern):
                return bits
        return self.bits
