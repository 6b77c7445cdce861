"""Adds and average pools between quantized tensors: float in training, integer kernels in test.

onnxruntime runs DequantizeLinear -> Add / AveragePool / GlobalAveragePool -> QuantizeLinear as
one integer kernel (QLinearAdd, QLinearAveragePool, QLinearGlobalAveragePool) whose roundings
differ from "the op in float, then quantize". These modules stand where `turn_quantize` found
such an op with quantized inputs and a quantized output: in training (and calibration) they
compute the op exactly as the model did, in the test phase they recover the stored integers of
their inputs (exact: the inputs lie on their quantization grids) and compute the kernel
(`ort_kernels`). Their output lies on the output quantizer's grid, so that quantizer then leaves
it as it is.

The quantizers are referenced, not owned (plain lists keep them out of `children()`): they stay
where they are in the graph and in the state dict.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .fake_quant import FeatureQuantizer
from .ort_kernels import QParams, qlinear_add, qlinear_avg_pool2d, qlinear_global_avg_pool


def kernel_features(quantizer: FeatureQuantizer) -> bool:
    """Whether the artifact's integer kernels see this feature as the test phase should emulate:
    frozen (not training or observing), per tensor (onnxruntime fuses nothing per channel) and
    uint8. With symmetric int8 features onnxruntime 1.32 leaves some adds and convolutions in
    float by rules not characterised here, so the test phase keeps its float ops there."""
    return not (quantizer.training or quantizer.observing or quantizer.per_channel or quantizer.symmetric)


def qparams(quantizer: FeatureQuantizer) -> QParams:
    """A per-tensor quantizer's parameters, with the range of its integer type in the artifact."""
    info = torch.iinfo(quantizer.dtype)
    return QParams(float(quantizer.scale), int(quantizer.zero_point), info.min, info.max)


def stored_integers(x: torch.Tensor, quantizer: FeatureQuantizer) -> torch.Tensor:
    """The integers of a tensor on `quantizer`'s grid: `round(x / scale) + zero_point`, exact."""
    return torch.round(x.float() / quantizer.scale) + quantizer.zero_point


def dequantize(q: torch.Tensor, quantizer: FeatureQuantizer, like: torch.Tensor) -> torch.Tensor:
    """`(q - zero_point) * scale` as the feature quantizer writes it, so it maps back to `q`."""
    return ((q - quantizer.zero_point) * quantizer.scale).to(like.dtype)


class IntegerOp(nn.Module):
    """Base: the input and output quantizers of one op and when its kernel applies."""

    def __init__(self, inputs: list[FeatureQuantizer], output: FeatureQuantizer) -> None:
        super().__init__()
        self._inputs = list(inputs)
        self._output = [output]

    @property
    def output_quant(self) -> FeatureQuantizer:
        return self._output[0]

    def kernel_applies(self) -> bool:
        """Test phase, with uint8 per-tensor features (see `kernel_features`)."""
        return not self.training and all(kernel_features(q) for q in (*self._inputs, self.output_quant))

    def plain(self) -> nn.Module:
        """The float op alone: what the artifact holds between DequantizeLinear and QuantizeLinear."""
        raise NotImplementedError

    @staticmethod
    def _straight_through(reference: torch.Tensor, computed: torch.Tensor) -> torch.Tensor:
        return FeatureQuantizer._straight_through(reference, computed)


class Add(nn.Module):
    """`a + b` as a module (the artifact's Add node)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class MeanHW(nn.Module):
    """`x.mean(dims, keepdim=True)` as a module (the artifact's ReduceMean node)."""

    def __init__(self, dims: tuple[int, int]) -> None:
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.dims, keepdim=True)


class QuantAdd(IntegerOp):
    """`a + b` of two quantized tensors whose sum is quantized (directly or after a ReLU).

    With a ReLU in between, onnxruntime fuses only where it can drop the ReLU (output zero point
    at the type's minimum); otherwise the add stays in float in both places.
    """

    def __init__(self, a: FeatureQuantizer, b: FeatureQuantizer, output: FeatureQuantizer,
                 relu_between: bool = False) -> None:
        super().__init__([a, b], output)
        self.relu_between = relu_between

    def kernel_applies(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> bool:
        if not super().kernel_applies():
            return False
        if a is not None and b is not None and a.shape != b.shape:
            return False  # broadcasting runs other MLAS code paths: not emulated
        out = self.output_quant
        return not self.relu_between or int(out.zero_point) == torch.iinfo(out.dtype).min

    def plain(self) -> nn.Module:
        return Add()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = a + b
        if not self.kernel_applies(a, b):
            return total
        qa_, qb_ = self._inputs
        q = qlinear_add(stored_integers(a, qa_), stored_integers(b, qb_),
                        qparams(qa_), qparams(qb_), qparams(self.output_quant))
        return self._straight_through(total, dequantize(q, self.output_quant, total))

    def extra_repr(self) -> str:
        return "QLinearAdd in the test phase" + (", ReLU between" if self.relu_between else "")


class QuantAvgPool2d(IntegerOp):
    """`avg_pool2d` (floor mode, no divisor override) of a quantized tensor, quantized after."""

    def __init__(self, x: FeatureQuantizer, output: FeatureQuantizer, kernel_size, stride=None,
                 padding=0, count_include_pad: bool = True) -> None:
        super().__init__([x], output)
        self.kernel_size = nn.modules.utils._pair(kernel_size)
        self.stride = nn.modules.utils._pair(stride if stride else kernel_size)
        self.padding = nn.modules.utils._pair(padding)
        self.count_include_pad = count_include_pad

    def float_pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding,
                            count_include_pad=self.count_include_pad)

    def plain(self) -> nn.Module:
        return nn.AvgPool2d(self.kernel_size, self.stride, self.padding, count_include_pad=self.count_include_pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.float_pool(x)
        if x.dim() != 4 or not self.kernel_applies():
            return pooled
        (xq,) = self._inputs
        q = qlinear_avg_pool2d(stored_integers(x, xq), qparams(xq), qparams(self.output_quant),
                               self.kernel_size, self.stride, self.padding, self.count_include_pad)
        return self._straight_through(pooled, dequantize(q, self.output_quant, pooled))

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"count_include_pad={self.count_include_pad}, QLinearAveragePool in the test phase")


class QuantGlobalAvgPool(IntegerOp):
    """Mean over H and W keeping them (adaptive average pool to 1x1) of a quantized 4-D tensor.

    `how` and `dims` say which float op it replaces (`adaptive_avg_pool2d(x, 1)` or
    `x.mean(dims, keepdim=True)`), so that training computes what it computed before. The
    artifact writes it as GlobalAveragePool (see `export`).
    """

    def __init__(self, x: FeatureQuantizer, output: FeatureQuantizer, how: str = "adaptive",
                 dims: tuple[int, int] = (2, 3)) -> None:
        super().__init__([x], output)
        if how not in ("adaptive", "mean"):
            raise ValueError(f"how={how!r} is not accepted: use 'adaptive' or 'mean'")
        self.how = how
        self.dims = tuple(dims)

    def float_pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1) if self.how == "adaptive" else x.mean(self.dims, keepdim=True)

    def plain(self) -> nn.Module:
        return nn.AdaptiveAvgPool2d(1) if self.how == "adaptive" else MeanHW(self.dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.float_pool(x)
        if x.dim() != 4 or not self.kernel_applies():
            return pooled
        (xq,) = self._inputs
        q = qlinear_global_avg_pool(stored_integers(x, xq), qparams(xq), qparams(self.output_quant))
        return self._straight_through(pooled, dequantize(q, self.output_quant, pooled))

    def extra_repr(self) -> str:
        return f"how={self.how!r}, QLinearGlobalAveragePool in the test phase"
