"""`quant=mnn`: MNN's own numerics (DESIGN.md §2, read from MNN's `tools/train/source/nn/NN.cpp`).

What differs from the ONNX-first scheme (`fake_quant.FeatureQuantizer`):
- features are signed int8 in [-127, 127] (254 steps) with a zero point:
  `s = (max - min) / 254`, `zp = roundf(-min / s - 127)`, `q = clamp(roundf(x / s + zp), -127, 127)`;
- rounding is `roundf`, half away from zero, for features and weights (torch rounds half to even);
- training quantizes each batch with the batch's own range; the running range is only for the
  test phase (and the artifacts);
- `MovingAverage` is MNN's (first batch as is, then `m*old + (1-m)*new` on both ends), without
  our guard that widens at once a range a batch outgrows; `Maximum` takes the max of the maxima
  **and of the minima** (the minimum moves toward 0), as MNN does;
- the test phase keeps a float bias (`QuantLayer` asks `float_bias` of this scheme).

One difference from MNN stays, on purpose: the range always holds 0 (as for `quant=default`),
so that zero padding and ReLU's zeros are exact and the zero point fits int8 in the artifacts;
MNN lets a range that never saw 0 exclude it (rare: a batch of conv outputs spans 0).
"""
from __future__ import annotations

import torch

from .config import QuantConfig, QuantScheme, ScaleUpdateMethod
from .fake_quant import FEATURE_SCALE_FLOOR, FeatureQuantizer, _channel_view, _StraightThrough, weight_limit, weight_scale


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves go away from zero (torch.round goes to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def mnn_alpha(weight_scale: torch.Tensor) -> torch.Tensor:
    """A weight scale as MNN's int8 convolution uses it: float32, |alpha| < 1e-6 becomes 1e-6
    (`CPUConvolution::updateInputOutputScale`)."""
    return weight_scale.float().abs().clamp(min=1e-6)


def mnn_requant_scale(weight_scale: torch.Tensor, input_scale: torch.Tensor,
                      output_scale: torch.Tensor) -> torch.Tensor:
    """MNN's per-channel float32 factor from int32 accumulator to output codes, `alpha_c * (s_in / s_out)`."""
    return mnn_alpha(weight_scale) * (input_scale.float() / output_scale.float()).reshape(())


def mnn_depthwise_bias(float_bias: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
                       scale: torch.Tensor, output_zero_point: int) -> torch.Tensor:
    """The int32 bias of MNN's int8 depthwise convolution, which carries the float bias and the
    output zero point: output code = `roundf((acc + B_c) * scale_c)`, no zero point added after.

    MNN computes `B_c = trunc(b_c / (s_in * alpha_c)) + trunc(zp_out / scale_c)`: its truncations
    shift a channel by up to 2 * scale_c codes (more than a code where a folded weight scale is
    large). We take B_c rounded from the exact sum instead, and the MNN export writes a float bias
    that MNN's truncation turns into exactly this B_c (`mnn_export.mnn_float_bias`). MNN's other
    int8 convolutions (its GEMM kernels) add the float bias as it is: `acc * scale + b / s_out + zp`.
    """
    alpha = mnn_alpha(weight_scale).double()
    exact = float_bias.double() / (input_scale.double() * alpha) + float(output_zero_point) / scale.double()
    return round_half_away(exact).float()


def is_mnn_depthwise(layer: torch.nn.Module) -> bool:
    """MNN's converter makes a ConvolutionDepthwise of a Conv with groups == channels in == out."""
    return (isinstance(layer, torch.nn.Conv2d) and layer.groups > 1
            and layer.groups == layer.in_channels == layer.out_channels)


def mnn_weight_integers(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel symmetric integers (roundf of w * (1/s)) and the scales s = max|W_c| / L."""
    limit = weight_limit(bits)
    scale = weight_scale(weight, bits)
    inv = _channel_view(1.0 / scale, weight.dim())
    return round_half_away(weight.detach() * inv).clamp_(-limit, limit), scale


def mnn_fake_quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """MNN's weight fake quantization, with a straight-through gradient."""
    def grid(w: torch.Tensor) -> torch.Tensor:
        q, scale = mnn_weight_integers(w, bits)
        return q * _channel_view(scale, w.dim())

    return _StraightThrough.apply(weight, grid)


class MnnFeatureQuantizer(FeatureQuantizer):
    """MNN's feature quantizer: signed [-L, L] codes with a zero point, batch ranges in training."""

    def __init__(self, config: QuantConfig, channels: int = 1, channel_axis: int = 1) -> None:
        super().__init__(config, 1, channel_axis)  # MNN: one scale per tensor (PerChannel refused)
        self.quant_min, self.quant_max = -weight_limit(self.bits), weight_limit(self.bits)
        self.zero_point.zero_()

    @property
    def dtype(self) -> torch.dtype:
        return torch.int8

    def _scale_zero_point(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = ((hi - lo) / (self.quant_max - self.quant_min)).clamp(min=FEATURE_SCALE_FLOOR)
        zero_point = round_half_away(self.quant_min - lo / scale).clamp(self.quant_min, self.quant_max)
        return scale, zero_point

    @staticmethod
    def _batch_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = torch.aminmax(x.detach())
        return lo.reshape(1), hi.reshape(1)

    def update(self, x: torch.Tensor) -> None:
        """MNN's running range: MovingAverage (first batch as is) or Maximum of both ends."""
        self._fold_batch_range(*self._batch_range(x))

    @torch.no_grad()
    def _fold_batch_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if not (torch.isfinite(lo) & torch.isfinite(hi)).all():
            return  # the training loop reports the non-finite loss; the range stays as it was
        if int(self.num_updates) > 0:
            if self.update_method is ScaleUpdateMethod.MovingAverage:
                m = self.momentum
                lo = m * self.running_min + (1.0 - m) * lo
                hi = m * self.running_max + (1.0 - m) * hi
            else:
                lo, hi = torch.maximum(self.running_min, lo), torch.maximum(self.running_max, hi)
        self.running_min.copy_(lo)
        self.running_max.copy_(hi)
        scale, zero_point = self._scale_zero_point(lo, hi)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point.to(torch.int32))
        self.num_updates += 1

    def _grid(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        q = round_half_away(x * (1.0 / scale) + zero_point).clamp_(self.quant_min, self.quant_max)
        return (q - zero_point) * scale

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The running range's grid (test phase, calibration)."""
        return _StraightThrough.apply(x, lambda v: self._grid(v, self.scale, self.zero_point.to(v.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.observing):
            return self.fake_quantize(x)
        lo, hi = self._batch_range(x)
        self._fold_batch_range(lo, hi)
        if self.observing:
            return self.fake_quantize(x)
        scale, zero_point = self._scale_zero_point(lo, hi)  # MNN trains on each batch's own range
        return _StraightThrough.apply(x, lambda v: self._grid(v, scale, zero_point))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, MNN int8 [-127, 127] with zero point, {self.update_method.value}, " \
               f"momentum={self.momentum}"


def feature_quantizer(config: QuantConfig, channels: int = 1, channel_axis: int = 1) -> FeatureQuantizer:
    """The feature quantizer of `config`'s scheme."""
    cls = MnnFeatureQuantizer if config.scheme is QuantScheme.mnn else FeatureQuantizer
    return cls(config, channels, channel_axis)
