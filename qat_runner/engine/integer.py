"""The frozen integer model: what the test phase computes, with integer tensors as buffers.

`to_integer_model` turns an eval-mode QAT model into modules whose forward is written with
`torch.ops.quantized_decomposed` quantize/dequantize ops on int8/int32 buffers. torch's ONNX
exporter maps those ops to QuantizeLinear/DequantizeLinear with integer initializers, which is
the QDQ form onnxruntime fuses into integer kernels (QLinearConv, QGemm, QLinearAdd, ...).
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.ao.quantization.fx._decomposed import quantized_decomposed_lib  # noqa: F401  registers the ops

from .fake_quant import INT32_MAX, INT32_MIN, FeatureQuantizer, weight_limit
from .integer_layers import activation_is_implied
from .integer_ops import IntegerOp
from .modules import QuantLayer, apply_activation, apply_weights

qd = torch.ops.quantized_decomposed


class QuantDequant(nn.Module):
    """Quantize then dequantize with frozen parameters: one Q/DQ pair in the ONNX graph."""

    def __init__(self, quantizer: FeatureQuantizer) -> None:
        super().__init__()
        self.per_channel = quantizer.per_channel
        self.channel_axis = quantizer.channel_axis
        self.quant_min, self.quant_max, self.dtype = quantizer.quant_min, quantizer.quant_max, quantizer.dtype
        shift = 0
        if self.dtype is torch.int8 and not quantizer.symmetric:
            # Signed codes with a zero point (quant=mnn) ship as the same grid shifted into uint8:
            # onnxruntime's x86 QDQ transformer does that shift itself and leaves an int8
            # output_dtype on a uint8 zero point, which it then refuses to load.
            shift, self.dtype = 128, torch.uint8
            self.quant_min, self.quant_max = self.quant_min + shift, self.quant_max + shift
        if self.per_channel:
            self.register_buffer("scale", quantizer.scale.detach().clone())
            self.register_buffer("zero_point", quantizer.zero_point.detach().to(torch.int64) + shift)
        else:  # python numbers become scalar initializers, as onnxruntime's fusions expect
            self.scale_value = float(quantizer.scale)
            self.zero_point_value = int(quantizer.zero_point) + shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = (self.quant_min, self.quant_max, self.dtype)
        if self.per_channel:
            # Written out instead of quantize/dequantize_per_channel: onnxruntime (1.2x-1.3x)
            # fuses a per-axis Q/DQ around Conv into QLinearConv, whose kernel then fails at run
            # time ("result zero point must be a scalar"). No integer kernel takes per-channel
            # activation scales, so these layers run in float on the dequantized integers.
            shape = [1] * x.dim()
            shape[self.channel_axis % x.dim()] = -1
            scale, zero = self.scale.reshape(shape), self.zero_point.reshape(shape)
            q = torch.clamp(torch.round(x / scale) + zero, self.quant_min, self.quant_max).to(self.dtype)
            return (q.to(x.dtype) - zero) * scale
        q = qd.quantize_per_tensor(x, self.scale_value, self.zero_point_value, *args)
        return qd.dequantize_per_tensor(q, self.scale_value, self.zero_point_value, *args)


class IntegerLayer(nn.Module):
    """A frozen Conv2d/Linear: int weight, per-channel scales, int32 bias, output Q/DQ."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        p = layer.integer_parameters()
        # Keep the layer for its hyper-parameters (stride, groups, ...) but drop its float
        # tensors: no float copy of a quantized weight may reach the artifact.
        self.layer = copy.deepcopy(layer.layer)
        self.layer.weight = None
        self.layer.bias = None
        self.limit = weight_limit(layer.bits)
        self.register_buffer("weight_int", p["weight"])
        self.register_buffer("weight_scale", p["weight_scale"].detach().clone())
        self.register_buffer("weight_zero_point", torch.zeros_like(p["weight_scale"], dtype=torch.int64))
        if p["bias"] is not None:
            self.register_buffer("bias_int", p["bias"])
            self.register_buffer("bias_scale", p["bias_scale"].detach().clone())
            self.bias_float = None
        else:
            self.bias_int = None
            self.register_buffer("bias_float", p["float_bias"].clone())
        self.activation = None if activation_is_implied(layer) else layer.activation
        self.output = QuantDequant(layer.output_quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = qd.dequantize_per_channel(self.weight_int, self.weight_scale, self.weight_zero_point, 0,
                                      -self.limit, self.limit, torch.int8)
        if self.bias_int is not None:
            b = qd.dequantize_per_channel(self.bias_int, self.bias_scale, self.weight_zero_point, 0,
                                          INT32_MIN, INT32_MAX, torch.int32)
        else:
            b = self.bias_float
        return self.output(apply_activation(apply_weights(self.layer, x, w, b), self.activation))


def to_integer_model(qat_model: fx.GraphModule) -> fx.GraphModule:
    """A frozen integer copy of a QAT model (from `turn_quantize`), in eval mode.

    Its outputs equal the QAT model's eval outputs up to float rounding; the QAT model is
    not modified.
    """
    model = copy.deepcopy(qat_model).eval()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLayer):
            model.add_submodule(name, IntegerLayer(mod))
        elif isinstance(mod, IntegerOp):  # DQ -> op -> Q: onnxruntime's integer kernel
            model.add_submodule(name, mod.plain())
    for name, mod in list(model.named_modules()):
        if isinstance(mod, FeatureQuantizer):
            model.add_submodule(name, QuantDequant(mod))
    model.recompile()
    return model.eval()
