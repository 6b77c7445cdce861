"""A QAT layer's activation and output fake quantization, in place on the layer's own output.

The graph conv -> BatchNorm -> ReLU6 -> quantizer kept two feature-sized tensors per layer alive
until the backward: ReLU6's output (its backward reads it) and the quantizer's new output (the
next convolution's backward reads it), where the float model keeps one; each new tensor is also
memory that the step has to touch first. Here the layer's output is one tensor: on the CPU, for
a per-tensor range, the activation and the quantization run in place on the BatchNorm output
(block by block in the L2 cache), and the activation's backward reads that quantized output.

That is the one deliberate difference from the two-step graph: ReLU/ReLU6's gradient is taken at
the quantized output `q` (zero where `q <= 0` or `q >= 6`) instead of at the float one, on every
device and feature option alike. They differ only where rounding moves a value across an end of
the activation's range: `0 < y < scale/2` (an output the int8 model computes as 0) and within
half a step of 6. Values are unchanged: ReLU/ReLU6 clamp to `[0, top]` and rounding is monotone,
so `round(clamp(y, 0, top) * inv) == clamp(round(y * inv), 0, round(top * inv))` -- the
activation becomes two more integer bounds of the quantizer's clamp -- and the range of
`relu6(y)` is `[clamp(min y, 0, 6), clamp(max y, 0, 6)]`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn import functional as F

from .fake_quant import FeatureQuantizer, _blocks, _f32, _grid_values

ACTIVATIONS = ("relu", "relu6")
ACTIVATION_TOPS = {None: None, "relu": math.inf, "relu6": 6.0}  # upper end of the output


def apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """ReLU / ReLU6 / nothing (training fuses them into the output quantizer instead)."""
    if activation == "relu":
        return F.relu(y)
    if activation == "relu6":
        return F.relu6(y)
    return y


def activation_backward(grad: torch.Tensor, output: torch.Tensor, activation: str | None) -> torch.Tensor:
    """ReLU's / ReLU6's backward read at `output`, as torch's own in-place ReLU/ReLU6 do."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, output, 0.0)
    if activation == "relu6":
        return torch.ops.aten.hardtanh_backward(grad, output, 0.0, 6.0)
    return grad


class _QuantizedActivation(torch.autograd.Function):
    """`quantize(y)` forward (possibly in y's own storage); backward: the activation's gradient
    at that quantized output, and straight through the quantizer (not clipped)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor],
                activation: str | None) -> torch.Tensor:
        out = quantize(y)
        if out is y:
            ctx.mark_dirty(y)
        ctx.activation = activation
        ctx.save_for_backward(out if activation is not None else None)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (out,) = ctx.saved_tensors
        return activation_backward(grad, out, ctx.activation), None, None


def _quantize_in_place(y: torch.Tensor, scale: float, low: int, high: int) -> torch.Tensor:
    """`y`'s grid values written over it, block by block."""
    for block, out_block in _blocks(y, y):
        _grid_values(block, scale, low, high, out=out_block)
    return y


def _in_place_applies(quantizer: FeatureQuantizer, y: torch.Tensor) -> bool:
    """Training on the CPU, a per-tensor range, a contiguous float32 feature, the base quantizer."""
    return (quantizer.training and quantizer.on_host(y) and type(quantizer).forward is FeatureQuantizer.forward
            and y.dtype == torch.float32 and y.is_contiguous())


def _in_place_quantizer(quantizer: FeatureQuantizer, y: torch.Tensor,
                        activation: str | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Update the range from `activation(y)` and return the in-place quantization of
    `activation(y)`; None (nothing updated) where it does not apply or `y` is not finite."""
    if not _in_place_applies(quantizer, y):
        return None
    lo, hi = (t.item() for t in torch.aminmax(y.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None  # the quantizer module guards the range as it always did
    top = ACTIVATION_TOPS[activation]
    if top is not None:
        lo, hi = min(max(lo, 0.0), top), min(max(hi, 0.0), top)
    quantizer.fold_on_host(lo, hi)
    scale, low, high = quantizer._grid_parameters(y)
    if top is not None:  # the activation's clamp as integer bounds (see the module docstring)
        low = max(low, 0)
        if top != math.inf:
            high = min(high, round(_f32(top * _f32(1.0 / scale))))
    return lambda t: _quantize_in_place(t, scale, low, high)


def quantize_layer_output(quantizer: FeatureQuantizer, y: torch.Tensor, activation: str | None) -> torch.Tensor:
    """`quantizer(activation(y))` in training, for `y` a layer's fresh output that nothing else
    reads (its BatchNorm's or convolution's result): in place on `y` where `_in_place_applies`,
    else through the quantizer module; the activation's gradient at the quantized output."""
    quantize = _in_place_quantizer(quantizer, y, activation)
    if quantize is None:
        def quantize(t: torch.Tensor) -> torch.Tensor:
            return quantizer(apply_activation(t.detach(), activation))
    if not (y.requires_grad and torch.is_grad_enabled()):
        return quantize(y)
    return _QuantizedActivation.apply(y, quantize, activation)
