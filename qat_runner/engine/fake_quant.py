"""Fake quantization of weights and features, in training and in the test phase.

Weights: symmetric, one scale per output channel, recomputed on every forward (no state):
``scale = max(max|W_c|, 1e-6) / L`` and integers ``clamp(round(W / scale), -L, L)``.

Features: a `FeatureQuantizer` keeps a running range (per tensor or per channel), updated in
training by MNN's `MovingAverage` or `Maximum` rule. Unlike MNN, training and test quantize with
the same running range, so the model that trains is the model that is tested and shipped.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import FeatureScaleStatMethod, QuantConfig, ScaleUpdateMethod

WEIGHT_SCALE_FLOOR = 1e-6  # MNN's floor on max|W_c|, so an all-zero channel does not divide by 0
FEATURE_SCALE_FLOOR = 1e-8  # same idea for a feature that was all zeros so far
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# MovingAverage: a batch range over this many times the running range widens it at once. A
# converged model's batch ranges stay well under 2x of the running range.
OUTGROWN_FACTOR = 2.0


def weight_limit(bits: int) -> int:
    """L = 2^(bits-1) - 1: weights live in [-L, L] (127 for 8 bits)."""
    return 2 ** (bits - 1) - 1


def weight_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """One symmetric scale per output channel (dim 0)."""
    max_abs = weight.detach().abs().flatten(1).amax(dim=1)
    return max_abs.clamp(min=WEIGHT_SCALE_FLOOR) / weight_limit(bits)


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((-1,) + (1,) * (ndim - 1))


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The integers and per-channel scales of a weight: what the int8 artifact stores.

    Rounds `w * (1/scale)` as torch's fake-quantize kernels do, so the integers here are the
    ones the training forward used.
    """
    scale = weight_scale(weight, bits)
    limit = weight_limit(bits)
    inv = _channel_view(1.0 / scale, weight.dim())
    q = torch.round(weight.detach() * inv).clamp(-limit, limit).to(torch.int8)
    return q, scale


def fake_quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-channel symmetric fake quantization with a straight-through gradient (fused op)."""
    scale = weight_scale(weight, bits)
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=weight.device)
    limit = weight_limit(bits)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -limit, limit)


def quantize_bias(bias: torch.Tensor, bias_scale: torch.Tensor) -> torch.Tensor:
    """Bias as int32 with scale input_scale * weight_scale, as integer conv kernels expect."""
    return torch.round(bias.detach() / bias_scale).clamp(INT32_MIN, INT32_MAX).to(torch.int32)


class FeatureQuantizer(nn.Module):
    """Running-range fake quantizer for one feature tensor.

    Training (or `observing`, used by PTQ calibration) updates the range from the batch, then
    quantizes with the updated running range; eval quantizes with the frozen one. Gradients pass
    straight through, inside the range and outside it (see `_straight_through`).

    Symmetric mode tracks the scale itself (`s = m*s + (1-m)*s_new`); asymmetric mode tracks
    the range ends and derives scale and zero point, with `Maximum` widening both ends.
    """

    def __init__(self, config: QuantConfig, channels: int = 1, channel_axis: int = 1) -> None:
        super().__init__()
        self.bits = config.feature_bits
        self.per_channel = config.feature_scale_stat_method is FeatureScaleStatMethod.PerChannel
        self.update_method = config.scale_update_method
        self.momentum = float(config.momentum)
        self.symmetric = config.symmetric_features
        self.channel_axis = channel_axis  # 1 for conv features (NCHW), -1 for linear ones
        if self.symmetric:
            self.quant_min, self.quant_max = -weight_limit(self.bits), weight_limit(self.bits)
        else:
            self.quant_min, self.quant_max = 0, 2**self.bits - 1
        size = channels if self.per_channel else 1
        self.register_buffer("scale", torch.ones(size))
        self.register_buffer("zero_point", torch.full((size,), self.quant_min if not self.symmetric else 0, dtype=torch.int32))
        self.register_buffer("running_min", torch.zeros(size))
        self.register_buffer("running_max", torch.zeros(size))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.observing = False

    @property
    def dtype(self) -> torch.dtype:
        """Integer type of the quantized feature in the artifact."""
        return torch.int8 if self.symmetric else torch.uint8

    def _axis(self, x: torch.Tensor) -> int:
        return self.channel_axis % x.dim()

    def _batch_min_max(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach()
        if not self.per_channel:
            lo, hi = torch.aminmax(x)
            return lo.reshape(1), hi.reshape(1)
        flat = x.transpose(0, self._axis(x)).reshape(x.shape[self._axis(x)], -1)
        return torch.aminmax(flat, dim=1)

    def _combine(self, old: torch.Tensor, new: torch.Tensor, widen: str) -> torch.Tensor:
        if self.update_method is ScaleUpdateMethod.MovingAverage:
            return self.momentum * old + (1.0 - self.momentum) * new
        return torch.maximum(old, new) if widen == "max" else torch.minimum(old, new)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold one batch into the running range (first batch taken as is).

        Guards, so that QAT from an untrained or barely trained model cannot blow up:
        - a non-finite batch range leaves the running range as it was (the training loop reports
          the non-finite loss or gradient);
        - with `MovingAverage`, a batch whose range is over `OUTGROWN_FACTOR` times the running
          range widens it at once (the `Maximum` rule for that step) instead of by 1% a step.
          Otherwise features that outgrow their range (early training, or ranges observed with
          untrained BatchNorm statistics) stay saturated for hundreds of steps, and the
          straight-through gradients through those constants grow until they overflow to NaN.
        """
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
            # Zero must be representable exactly (padding, ReLU): the range always holds 0.
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

    def _outgrown(self, running_width: torch.Tensor, batch_width: torch.Tensor) -> torch.Tensor:
        """Where the batch's range is over OUTGROWN_FACTOR times the running one (MovingAverage)."""
        if self.update_method is not ScaleUpdateMethod.MovingAverage:
            return torch.zeros_like(batch_width, dtype=torch.bool)
        return batch_width > OUTGROWN_FACTOR * running_width

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize and dequantize with the current running range.

        Training uses torch's fused ops, which round `x * (1/scale)`. The test phase rounds
        `x / scale` as ONNX QuantizeLinear (and onnxruntime) does: the two differ by one step
        at exact ties, which discrete inputs such as pixels hit often (3.5% of digits pixels).
        """
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.observing):
            return self.fake_quantize(x)
        self.update(x)
        return self._straight_through(x, self.fake_quantize(x.detach()))

    @staticmethod
    def _straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        """`quantized` forward, identity gradient, not clipped outside the range.

        The range is a running statistic of the unclipped values, so they must stay free to grow
        past it: with a clipped gradient, values stuck at the top of a moving-average range get
        no gradient, the batch maximum stops growing and training stalls.
        """
        if not x.requires_grad:
            return quantized
        return x + (quantized - x).detach()

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        sym = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {kind}, {sym}, {self.update_method.value}, momentum={self.momentum}"
