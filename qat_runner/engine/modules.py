"""QAT layers: Conv2d (optionally fused with BatchNorm2d and ReLU/ReLU6) and Linear.

Training: fake-quantized weights (recomputed every step), BatchNorm on batch statistics, then
the activation and the output feature quantizer, in place on the layer's output where they can
be (`activation_quant.py`). Test phase: BatchNorm folded into weight and
bias, weights as integers times per-channel scales, bias as int32 on the input*weight scale,
output quantized with the frozen running range -- what the integer kernels compute.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

# apply_activation is imported from here by integer.py and mnn_export.py
from .activation_quant import ACTIVATIONS, apply_activation, quantize_layer_output
from .config import QuantConfig, QuantScheme
from .fake_quant import (
    FeatureQuantizer,
    _channel_view,
    fake_quantize_weight,
    quantize_bias,
    quantize_weight,
)
from .integer_layers import integer_kernel_output
from .mnn_quant import (
    feature_quantizer,
    is_mnn_depthwise,
    mnn_depthwise_bias,
    mnn_fake_quantize_weight,
    mnn_requant_scale,
    mnn_weight_integers,
    round_half_away,
)


def apply_weights(layer: nn.Conv2d | nn.Linear, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """Run `layer`'s operation with the given weight and bias (keeps stride, groups, padding mode)."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, bias)
    return F.linear(x, weight, bias)


def dequantized_bias(p: dict[str, torch.Tensor | None], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float bias the test phase adds, from `QuantLayer.integer_parameters()`: the dequantized
    int32 bias (quant=default) or the float one (quant=mnn, and inputs without a per-tensor scale)."""
    return p["bias"].to(dtype) * p["bias_scale"] if p["bias"] is not None else p["float_bias"]


class QuantLayer(nn.Module):
    """Shared logic of the quantized Conv2d and Linear; subclasses say how to apply weights."""

    def __init__(
        self,
        layer: nn.Conv2d | nn.Linear,
        config: QuantConfig,
        bn: nn.BatchNorm2d | None = None,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        if activation not in (None, *ACTIVATIONS):
            raise ValueError(f"activation={activation!r} is not accepted: use one of {ACTIVATIONS} or None")
        self.layer = layer
        self.bn = bn
        self.activation = activation
        self.bits = config.bits
        self.mnn = config.scheme is QuantScheme.mnn  # MNN's rounding and float bias (mnn_quant.py)
        self.bn_frozen = False  # freeze_bn_stats: BatchNorm on running statistics in training too
        self.output_quant = feature_quantizer(config, self.out_channels, self.channel_axis)
        # The quantizer of this layer's input lives elsewhere in the graph (it may be shared, or
        # be the previous layer's output quantizer); a list keeps it out of this module's children.
        self._input_quant: list[FeatureQuantizer] = []
        # Training: the graph's first layer fake-quantizes every layer's weight back to back before
        # its own forward (`set_weights_ahead`, from turn_quantize). Between the convolutions these
        # small ops took about twice as long (cold caches): some 2.5 ms of a 32-pixel MobileNetV2
        # step (tests/engine/test_fast_fake_quant.py checks the values are the same).
        self._layers_ahead: list[QuantLayer] = []
        self._weight_ahead: tuple[torch.Tensor, int, torch.Tensor] | None = None  # weight, its version, fq

    channel_axis = 1  # where a feature's channels are: 1 for NCHW, -1 for Linear features

    @property
    def out_channels(self) -> int:
        return self.layer.weight.shape[0]

    @property
    def input_quant(self) -> FeatureQuantizer | None:
        return self._input_quant[0] if self._input_quant else None

    def set_input_quant(self, quantizer: FeatureQuantizer) -> None:
        self._input_quant[:] = [quantizer]

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias with BatchNorm's running statistics folded in (exact per channel)."""
        weight = self.layer.weight
        bias = self.layer.bias if self.layer.bias is not None else torch.zeros(
            self.out_channels, device=weight.device, dtype=weight.dtype)
        if self.bn is None:
            return weight, bias
        bn = self.bn
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(inv_std)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(inv_std)
        factor = gamma * inv_std
        return weight * _channel_view(factor, weight.dim()), (bias - bn.running_mean) * factor + beta

    def bias_scale(self, weight_scale: torch.Tensor) -> torch.Tensor | None:
        """input_scale * weight_scale, or None where the bias cannot be an int32 (per-channel input)."""
        quant = self.input_quant
        if quant is None or quant.per_channel:
            return None
        return quant.scale * weight_scale

    def integer_parameters(self) -> dict[str, torch.Tensor | None]:
        """What the integer model stores for this layer: int weight, scales, int32 bias."""
        weight, bias = self.folded_weight_bias()
        if self.mnn:  # MNN's test phase: roundf weights, float bias
            q_weight, w_scale = mnn_weight_integers(weight, self.bits)
            return {"weight": q_weight.to(torch.int8), "weight_scale": w_scale, "bias": None,
                    "bias_scale": None, "float_bias": bias.detach()}
        q_weight, w_scale = quantize_weight(weight, self.bits)
        b_scale = self.bias_scale(w_scale)
        q_bias = quantize_bias(bias, b_scale) if b_scale is not None else None
        return {"weight": q_weight, "weight_scale": w_scale, "bias": q_bias,
                "bias_scale": b_scale, "float_bias": bias.detach() if q_bias is None else None}

    def set_weights_ahead(self, layers: list[QuantLayer]) -> None:
        """This layer's training forward starts by fake-quantizing the weights of `layers`."""
        self._layers_ahead[:] = layers

    def _fake_quantize_weight(self) -> torch.Tensor:
        fake_quantize = mnn_fake_quantize_weight if self.mnn else fake_quantize_weight
        return fake_quantize(self.layer.weight, self.bits)

    def _quantize_weight_ahead(self) -> None:
        weight = self.layer.weight
        self._weight_ahead = (weight, weight._version, self._fake_quantize_weight())

    def _fake_quantized_weight(self) -> torch.Tensor:
        """This step's fake-quantized weight: the one computed ahead, if the weight is the same
        tensor and unchanged since (its version counter), else computed now."""
        ahead, self._weight_ahead = self._weight_ahead, None
        if ahead is not None and ahead[0] is self.layer.weight and ahead[1] == self.layer.weight._version:
            return ahead[2]
        return self._fake_quantize_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            for layer in self._layers_ahead:
                layer._quantize_weight_ahead()
            y = apply_weights(self.layer, x, self._fake_quantized_weight(), self.layer.bias)
            if self.bn is not None:
                y = self._batch_norm(y)
            # y is this layer's own fresh output: BatchNorm and the conv do not keep it for backward
            return quantize_layer_output(self.output_quant, y, self.activation)
        if not self.mnn and (y := integer_kernel_output(self, x)) is not None:  # QLinearConv / QGemm, exactly
            return self.output_quant(y)
        if self.mnn and self._mnn_integer_path():
            return self._mnn_integer_output(x)
        p = self.integer_parameters()
        weight = p["weight"].to(x.dtype) * _channel_view(p["weight_scale"], p["weight"].dim())
        y = apply_weights(self.layer, x, weight, dequantized_bias(p, x.dtype))
        return self.output_quant(apply_activation(y, self.activation))

    def _mnn_integer_path(self) -> bool:
        """The test phase of quant=mnn runs MNN's int8 convolution where both features are frozen
        (not calibrating) and quantized, as they are in the .mnn."""
        quants = (self.input_quant, self.output_quant)
        return all(q is not None and not (q.training or q.observing) for q in quants)

    def _mnn_integer_output(self, x: torch.Tensor) -> torch.Tensor:
        """MNN 3.6.1's int8 convolution on x86, exactly: the int32 accumulator of integer weights
        and centred input codes (x is on the input grid), then to output codes with MNN's float32
        scale (`mnn_requant_scale`) -- a depthwise kernel adds its int32 bias first
        (`mnn_depthwise_bias`), the others add `b / s_out + zp` in float -- roundf, clamped to
        the output codes (from the zero point after a ReLU; ReLU6's upper end is the range's,
        which never exceeds 6); returned dequantized."""
        q_in, q_out = self.input_quant, self.output_quant
        p = self.integer_parameters()
        centred = torch.round(x * (1.0 / q_in.scale))  # q - zp of the input, exact integers
        acc = torch.round(apply_weights(self.layer, centred, p["weight"].to(x.dtype), None))
        shape = [1] * acc.dim()
        shape[self.channel_axis] = -1
        zero_point = int(q_out.zero_point)
        scale = mnn_requant_scale(p["weight_scale"], q_in.scale, q_out.scale)
        if is_mnn_depthwise(self.layer):
            bias = mnn_depthwise_bias(p["float_bias"], p["weight_scale"], q_in.scale, scale, zero_point)
            codes = (acc + bias.view(shape)) * scale.view(shape)
        else:
            offset = p["float_bias"].float() / q_out.scale.float() + zero_point
            codes = acc * scale.view(shape) + offset.view(shape)
        codes = round_half_away(codes)
        low = zero_point if self.activation is not None else q_out.quant_min
        codes = codes.clamp_(low, q_out.quant_max)
        return (codes - zero_point) * q_out.scale.to(x.dtype)

    def _batch_norm(self, y: torch.Tensor) -> torch.Tensor:
        """Training BatchNorm: batch statistics, or the frozen running ones (`freeze_bn_stats`)."""
        bn = self.bn
        if not self.bn_frozen:
            return bn(y)
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    def extra_repr(self) -> str:
        fused = "+bn" if self.bn is not None else ""
        act = f"+{self.activation}" if self.activation else ""
        return f"bits={self.bits}, fused={type(self.layer).__name__}{fused}{act}"


class QuantConv2d(QuantLayer):
    """Conv2d of any groups (depthwise included), optionally fused with BN and ReLU/ReLU6."""


class QuantLinear(QuantLayer):
    """Linear with an optional ReLU; features are channel-last."""

    channel_axis = -1


def freeze_bn_stats(model: nn.Module) -> int:
    """From now on, QAT layers normalise with BatchNorm's running statistics and stop updating
    them (torchvision's QAT recipe does this after a few epochs). Returns the layers frozen."""
    layers = [m for m in model.modules() if isinstance(m, QuantLayer) and m.bn is not None]
    for layer in layers:
        layer.bn_frozen = True
    return len(layers)
