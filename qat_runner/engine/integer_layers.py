"""Quantized Conv2d/Linear in the test phase where the artifact runs QLinearConv or QGemm.

Those kernels accumulate exact integer products plus the int32 bias and requantize once
(`ort_kernels.requantize`). A float convolution of the dequantized tensors rounds differently, so
near a rounding tie its output lands one step away, and where that happens depends on the float
kernel torch picks (thread count, ATEN_CPU_CAPABILITY). Here the accumulation is exact on the
integers (`integer_conv2d`), whatever the summation order.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .integer_ops import dequantize, kernel_features, qparams, stored_integers
from .ort_kernels import requantize

INT4_WEIGHT_BITS = 4  # weights of this width or less ship as INT4: onnxruntime runs a float conv


def activation_is_implied(layer: nn.Module) -> bool:
    """True when the output quantizer's clamp already does the ReLU/ReLU6, bit for bit.

    ReLU is implied when the range starts at 0 (zero point = quant_min). ReLU6 also needs the
    integer of 6.0 to be at or beyond quant_max. Dropping it lets onnxruntime fuse Conv -> Q.
    """
    q = layer.output_quant
    if layer.activation is None or q.symmetric:
        return layer.activation is None
    starts_at_zero = bool((q.zero_point == q.quant_min).all())
    if layer.activation == "relu":
        return starts_at_zero
    six = torch.round(6.0 / q.scale) + q.zero_point
    return starts_at_zero and bool((six >= q.quant_max).all())


def runs_integer_kernel(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether onnxruntime fuses this layer of the artifact into QLinearConv / QGemm.

    Not for features other than uint8 per tensor (`kernel_features`), INT4 weights, an activation
    the output clamp does not imply (Conv -> Relu -> Q does not fuse), or a Linear on more than
    2-D input (exported as MatMul, which runs MatMulIntegerToFloat and a separate QuantizeLinear).
    """
    in_q, out_q = layer.input_quant, layer.output_quant
    if layer.training or in_q is None or layer.bits <= INT4_WEIGHT_BITS:
        return False
    if not (kernel_features(in_q) and kernel_features(out_q)):
        return False
    if isinstance(layer.layer, nn.Linear) and x.dim() != 2:
        return False
    return activation_is_implied(layer)


def integer_conv2d(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`conv` on integer-valued tensors, exactly: the int32 accumulators, as float64.

    Depthwise convolutions are summed tap by tap in float32 (products of 8-bit integers, fewer
    than 500 taps: every partial sum is an integer below 2^24, so exact), which is several
    times faster than a float64 depthwise convolution. Others run in float64, with cuDNN off
    (its FFT/Winograd algorithms are not exact on integers).
    """
    taps = weight.shape[-2] * weight.shape[-1]
    depthwise = (conv.groups == conv.in_channels == conv.out_channels and conv.padding_mode == "zeros"
                 and not isinstance(conv.padding, str) and taps < 500)
    if depthwise:
        return _depthwise_taps(x.float(), weight.float(), conv.stride, conv.padding, conv.dilation).double() \
            + bias.double().reshape(1, -1, 1, 1)
    with torch.backends.cudnn.flags(enabled=False):
        return conv._conv_forward(x.double(), weight.double(), bias.double())


def _depthwise_taps(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """Depthwise convolution as a sum of shifted, strided slices times one weight per channel."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = weight.shape[-2:]
    padded = F.pad(x, (pw, pw, ph, ph))
    out_h = (x.shape[-2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    acc = torch.zeros(*x.shape[:-2], out_h, out_w, dtype=x.dtype, device=x.device)
    for i in range(kh):
        for j in range(kw):
            window = padded[..., i * dh:i * dh + sh * (out_h - 1) + 1:sh, j * dw:j * dw + sw * (out_w - 1) + 1:sw]
            acc = acc + window * weight[:, 0, i, j].reshape(1, -1, 1, 1)
    return acc


def integer_kernel_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's test-phase output as QLinearConv / QGemm computes it, or None where the
    artifact runs something else (the caller then computes it in float)."""
    if not runs_integer_kernel(layer, x):
        return None
    p = layer.integer_parameters()
    in_q, out_q = layer.input_quant, layer.output_quant
    centered = _straight_through(stored_integers(x, in_q) - in_q.zero_point, x / in_q.scale)
    if isinstance(layer.layer, nn.Conv2d):
        acc = integer_conv2d(layer.layer, centered, p["weight"], p["bias"])
    else:
        acc = F.linear(centered.double(), p["weight"].double(), p["bias"].double())
    # onnxruntime's output scale: x_scale * w_scale[c] / y_scale, in float32, left to right
    scale = in_q.scale * p["weight_scale"] / out_q.scale
    shape = [1] * acc.dim()
    shape[layer.channel_axis % acc.dim()] = -1
    value = acc.float() * scale.reshape(shape)
    q = requantize(acc, scale.reshape(shape), qparams(out_q))
    return _straight_through(dequantize(q, out_q, x), value * out_q.scale)


def _straight_through(exact: torch.Tensor, differentiable: torch.Tensor) -> torch.Tensor:
    """`exact` forward, the gradient of `differentiable` (the float computation it rounds)."""
    if not differentiable.requires_grad:
        return exact
    return differentiable + (exact - differentiable).detach()
