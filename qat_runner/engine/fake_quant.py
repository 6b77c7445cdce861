"""Fake quantization of weights and features, in training and in the test phase.

Weights: symmetric, one scale per output channel, recomputed on every forward (no state):
``scale = max(max|W_c|, 1e-6) / L`` and integers ``clamp(round(W / scale), -L, L)``.

Features: a `FeatureQuantizer` keeps a running range (per tensor or per channel), updated in
training by MNN's `MovingAverage` or `Maximum` rule. Unlike MNN, training and test quantize with
the same running range, so the model that trains is the model that is tested and shipped.

Training cost: the fake quantization is a few in-place vectorized torch ops (`_grid_values`), the
straight-through gradient a custom autograd function (`_StraightThrough`), the range update a
few float32 operations on Python floats on the CPU (per tensor) or a handful of ops on tiny
tensors without a host sync elsewhere. Training outputs the values of torch's fused
`fake_quantize_per_*_affine` kernels, bit for bit (tests/engine/test_fast_fake_quant.py), at a
fraction of the time: those kernels are scalar loops that also write a gradient mask. A layer's
activation and output quantizer run in place on its output (`activation_quant.py`).
"""
from __future__ import annotations

import math
import struct
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from .config import FeatureScaleStatMethod, QuantConfig, ScaleUpdateMethod

WEIGHT_SCALE_FLOOR = 1e-6  # MNN's floor on max|W_c|, so an all-zero channel does not divide by 0
FEATURE_SCALE_FLOOR = 1e-8  # same idea for a feature that was all zeros so far
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# MovingAverage: a batch range over this many times the running range widens it at once. A
# converged model's batch ranges stay well under 2x of the running range.
OUTGROWN_FACTOR = 2.0
_FLOAT32 = struct.Struct("f")


def _f32(value: float) -> float:
    """`value` rounded to the nearest float32 (overflow to +-inf), as a Python float.

    One float32 operation on float32 operands gives exactly its double result rounded once to
    float32 (a double carries more than 2*24+2 bits), so `_f32(a * b)` is the float32 product:
    float32 arithmetic on Python floats, without numpy scalars' per-operation overhead.
    """
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(value))[0]
    except OverflowError:  # struct refuses a finite double past float32's range
        return math.copysign(math.inf, value)


_FEATURE_SCALE_FLOOR32 = _f32(FEATURE_SCALE_FLOOR)


def weight_limit(bits: int) -> int:
    """L = 2^(bits-1) - 1: weights live in [-L, L] (127 for 8 bits)."""
    return 2 ** (bits - 1) - 1


def weight_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """One symmetric scale per output channel (dim 0)."""
    # abs().amax() in two ops: faster than two reductions and a maximum for any MobileNetV2 weight
    max_abs = weight.detach().flatten(1).abs().amax(dim=1)
    return max_abs.clamp_(min=WEIGHT_SCALE_FLOOR).div_(weight_limit(bits))


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape((-1,) + (1,) * (ndim - 1))


class _StraightThrough(torch.autograd.Function):
    """`fn(x)` forward, the incoming gradient unchanged backward: not clipped, no mask.

    One autograd node instead of the sub/detach/add graph, and no gradient mask to write.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _grid_values(x: torch.Tensor, scale: torch.Tensor | float, low: torch.Tensor | int,
                 high: torch.Tensor | int, out: torch.Tensor | None = None) -> torch.Tensor:
    """`clamp(round(x * (1/scale)), low, high) * scale`, with `low, high = qmin - zp, qmax - zp`.

    Bit for bit the values of torch's fused fake-quantize kernels for finite float32 inputs: the
    same float product `x * (1/scale)` rounded half to even, and `n * scale` is correctly rounded
    in float as the kernels' double product cast back is. Five vectorized passes over one new
    tensor (or `out`), against the kernels' scalar loop (per channel: a division per element,
    two loops) that also writes a gradient mask. `scale`, `low` and `high` broadcast against `x`;
    a float `scale` (a float32 value) is used as a scalar, with its float32 reciprocal.
    Non-finite inputs stay non-finite (the kernels' int64 cast of NaN or inf is undefined).
    """
    inv = torch.reciprocal(scale) if isinstance(scale, torch.Tensor) else _f32(1.0 / scale)
    q = torch.mul(x, inv, out=out).round_()
    if isinstance(low, torch.Tensor):
        q.clamp_min_(low).clamp_max_(high)  # one clamp_ with tensor bounds is 3x slower than these two
    else:
        q.clamp_(low, high)
    return q.mul_(scale)


# Elements per block when a large per-tensor feature is fake-quantized block by block (CPU): a
# block of input and of output stays in a core's L2 cache through the seven passes, where whole
# tensors stream from memory seven times (a fifth to a quarter faster on MobileNetV2's
# 224-pixel features, 2 cores).
BLOCK = 1 << 18


def _blocks(x: torch.Tensor, out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Matching flat blocks of two contiguous tensors of one shape."""
    return list(zip(x.view(-1).split(BLOCK), out.view(-1).split(BLOCK)))


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


def _weight_grid_values(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """`_grid_values` of a weight without its clamp: `|w| <= max|W_c|` keeps `w * (1/scale)`
    within 1e-4 of [-L, L] (three float roundings), so the rounded integers are already in it."""
    scale = _channel_view(weight_scale(weight, bits), weight.dim())
    return torch.mul(weight, torch.reciprocal(scale)).round_().mul_(scale)


def fake_quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-channel symmetric fake quantization with a straight-through gradient.

    The values of `torch.fake_quantize_per_channel_affine` and the same gradient: its gradient
    is clipped outside [-L*s, L*s], but a weight never leaves that range (the scale comes from
    max|W_c|), so its mask is all ones and the identity gradient equals it.
    """
    if not weight.requires_grad:
        return _weight_grid_values(weight, bits)
    return _StraightThrough.apply(weight, partial(_weight_grid_values, bits=bits))


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
        """The batch's min and max, per tensor (0-dim) or per channel, without copying `x`.

        Per channel, the dims before the channel axis (the batch) are reduced first: slice
        against slice, vectorized; then the spatial dims of the much smaller result. Both
        orders give the same values (min and max are exact); this one is fast for large and
        small feature maps alike, where one reduction over (0, 2, 3) is slow on small ones.
        """
        x = x.detach()
        if not self.per_channel:
            return torch.aminmax(x)
        axis = self._axis(x)
        lo = hi = x
        if axis > 0:
            outer = tuple(range(axis))
            lo, hi = x.amin(dim=outer), x.amax(dim=outer)
        if lo.dim() > 1:
            inner = tuple(range(1, lo.dim()))
            lo, hi = lo.amin(dim=inner), hi.amax(dim=inner)
        return lo, hi

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

        Two implementations of one rule, equal bit for bit: per-tensor ranges on the CPU on
        float32 scalars (`_update_on_host`: a few operations), else in torch ops on the tensors'
        device ("first batch" is a tensor condition, not a host sync). No autograd graph: `x` is
        detached, the buffers need no gradient.
        """
        if self.on_host(x):
            self._update_on_host(x)
        else:
            self._update_with_tensors(x)

    def on_host(self, x: torch.Tensor) -> bool:
        """A per-tensor range of a CPU feature: its range update and grid parameters are Python
        numbers (`fold_on_host`, `_grid_parameters`), where reading a buffer costs no sync."""
        return x.device.type == "cpu" and not self.per_channel

    def _update_with_tensors(self, x: torch.Tensor) -> None:
        """`update` in torch ops on the feature's device, without a host sync."""
        lo, hi = self._batch_min_max(x)
        max_abs = torch.maximum(lo.neg(), hi)  # max|x|, as lo <= hi; NaN if the batch holds NaN
        finite = max_abs < math.inf  # both ends finite
        first = self.num_updates == 0
        if self.symmetric:
            self._update_scale(max_abs / self.quant_max, finite, first)
        else:
            self._update_range(lo, hi, finite, first)
        self.num_updates.add_(1)  # in place: `+=` on a buffer goes through Module.__setattr__

    def _update_on_host(self, x: torch.Tensor) -> None:
        """`update` for a per-tensor range on the CPU: the batch's two ends, then `fold_on_host`."""
        lo, hi = torch.aminmax(x.detach())
        self.fold_on_host(lo.item(), hi.item())

    def fold_on_host(self, lo: float, hi: float) -> None:
        """Fold a batch's range `[lo, hi]` (float32 values) into a per-tensor running range,
        with the rule of `_update_with_tensors` computed on Python floats rounded to float32
        after each operation (`_f32`): the buffers end bit for bit the same
        (tests/engine/test_fast_fake_quant.py). The tensor path costs some 35 small torch ops per
        quantizer and step (about 100 us on the CPU, where reading two numbers costs nothing);
        on a GPU it avoids host syncs.
        """
        finite = math.isfinite(lo) and math.isfinite(hi)
        first = int(self.num_updates) == 0
        self.num_updates.add_(1)
        average = self.update_method is ScaleUpdateMethod.MovingAverage
        m, rest = _f32(self.momentum), _f32(1.0 - self.momentum)

        def follow(running: float, batch: float, outgrown: bool, widen: Callable[[float, float], float]) -> float:
            if first:
                return batch
            return _f32(_f32(m * running) + _f32(rest * batch)) if average and not outgrown else widen(running, batch)

        if self.symmetric:
            scale = self.scale.item()
            if finite:
                batch = _f32(max(-lo, hi) / self.quant_max)
                scale = follow(scale, batch, batch > _f32(OUTGROWN_FACTOR * scale), max)
            scale = max(scale, _FEATURE_SCALE_FLOOR32)
            top = _f32(scale * self.quant_max)
            self.scale.fill_(scale)
            self.running_max.fill_(top)
            self.running_min.fill_(-top)
            return
        run_lo, run_hi = self.running_min.item(), self.running_max.item()
        if finite:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            outgrown = _f32(hi - lo) > _f32(OUTGROWN_FACTOR * _f32(run_hi - run_lo))
            lo, hi = follow(run_lo, lo, outgrown, min), follow(run_hi, hi, outgrown, max)
        else:
            lo, hi = run_lo, run_hi
        scale = max(_f32(_f32(hi - lo) / (self.quant_max - self.quant_min)), _FEATURE_SCALE_FLOOR32)
        zero_point = min(max(self.quant_min - round(_f32(lo / scale)), self.quant_min), self.quant_max)
        self.running_min.fill_(lo)
        self.running_max.fill_(hi)
        self.scale.fill_(scale)
        self.zero_point.fill_(zero_point)

    def _update_scale(self, batch: torch.Tensor, finite: torch.Tensor, first: torch.Tensor) -> None:
        """Symmetric: the scale itself follows the batch's max|x| / L."""
        scale = self._follow(self.scale, batch, self._outgrown(self.scale, batch), torch.maximum, first)
        torch.where(finite, scale, self.scale, out=self.scale).clamp_(min=FEATURE_SCALE_FLOOR)
        torch.mul(self.scale, self.quant_max, out=self.running_max)
        torch.neg(self.running_max, out=self.running_min)

    def _update_range(self, lo: torch.Tensor, hi: torch.Tensor, finite: torch.Tensor,
                      first: torch.Tensor) -> None:
        """Asymmetric: both range ends follow the batch's; scale and zero point derive from them."""
        # Zero must be representable exactly (padding, ReLU): the range always holds 0.
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        outgrown = self._outgrown(self.running_max - self.running_min, hi - lo)
        lo = self._follow(self.running_min, lo, outgrown, torch.minimum, first)
        hi = self._follow(self.running_max, hi, outgrown, torch.maximum, first)
        lo = torch.where(finite, lo, self.running_min, out=self.running_min)
        hi = torch.where(finite, hi, self.running_max, out=self.running_max)
        scale = torch.div(hi - lo, self.quant_max - self.quant_min, out=self.scale)
        scale.clamp_(min=FEATURE_SCALE_FLOOR)
        zero_point = (self.quant_min - torch.round(lo / scale)).clamp_(self.quant_min, self.quant_max)
        self.zero_point.copy_(zero_point)

    def _follow(self, running: torch.Tensor, batch: torch.Tensor, outgrown: torch.Tensor | None,
                widen: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                first: torch.Tensor) -> torch.Tensor:
        """The running value after this batch: the batch's own at first, else the update rule.

        `widen` is torch.maximum for upper ends and scales, torch.minimum for lower ends.
        """
        widened = widen(running, batch)
        if self.update_method is ScaleUpdateMethod.MovingAverage:
            averaged = self.momentum * running + (1.0 - self.momentum) * batch
            widened = torch.where(outgrown, widened, averaged)
        return torch.where(first, batch, widened)

    def _outgrown(self, running_width: torch.Tensor, batch_width: torch.Tensor) -> torch.Tensor | None:
        """Where the batch's range is over OUTGROWN_FACTOR times the running one (MovingAverage)."""
        if self.update_method is not ScaleUpdateMethod.MovingAverage:
            return None
        return batch_width > OUTGROWN_FACTOR * running_width

    def _grid_shape(self, x: torch.Tensor) -> list[int]:
        """A shape that broadcasts per-tensor or per-channel parameters against `x`."""
        shape = [1] * x.dim()
        if self.per_channel:
            shape[self._axis(x)] = -1
        return shape

    def _grid_parameters(self, x: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | int, torch.Tensor | int]:
        """Scale and integer bounds (`qmin - zp`, `qmax - zp`) of `_grid_values` for `x`: Python
        numbers for a per-tensor range on the CPU (reading them is free there, and scalar operands
        save three small ops per step), else tensors (no host sync on a GPU)."""
        if self.on_host(x):
            zero = int(self.zero_point)
            return float(self.scale), self.quant_min - zero, self.quant_max - zero
        scale, zero = self.scale, self.zero_point
        if self.per_channel:  # per tensor, shape (1,) broadcasts as it is
            shape = self._grid_shape(x)
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        if self.symmetric:  # the zero point stays 0: constant bounds, the fast clamp
            return scale, self.quant_min, self.quant_max
        zero = zero.to(scale.dtype)
        return scale, self.quant_min - zero, self.quant_max - zero

    def _training_grid_values(self, x: torch.Tensor) -> torch.Tensor:
        """The fused fake-quantize kernels' values (`x * (1/scale)` rounded) with the running range."""
        return _grid_values(x, *self._grid_parameters(x))

    def _training_output(self, x: torch.Tensor) -> torch.Tensor:
        """The grid values of `x` in a new tensor; large per-tensor features on the CPU block by
        block (`BLOCK`; on a GPU, blocks would only add kernel launches)."""
        if not (self.on_host(x) and x.numel() >= 2 * BLOCK and x.is_contiguous()):
            return self._training_grid_values(x)
        parameters = self._grid_parameters(x)
        out = torch.empty_like(x)
        for x_block, out_block in _blocks(x, out):
            _grid_values(x_block, *parameters, out=out_block)
        return out

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize and dequantize with the current running range, straight-through gradient.

        Training rounds `x * (1/scale)` as torch's fused fake-quantize ops do. The test phase
        rounds `x / scale` as ONNX QuantizeLinear (and onnxruntime) does: the two differ by one
        step at exact ties, which discrete inputs such as pixels hit often (3.5% of digits pixels).
        """
        if not self.training:
            shape = self._grid_shape(x)
            scale, zero = self.scale.reshape(shape), self.zero_point.reshape(shape)
            q = torch.clamp(torch.round(x / scale) + zero, self.quant_min, self.quant_max)
            return self._straight_through(x, (q - zero) * scale)
        if not x.requires_grad:
            return self._training_output(x)
        return _StraightThrough.apply(x, self._training_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.observing:
            self.update(x)
        return self.fake_quantize(x)

    @staticmethod
    def _straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        """`quantized` forward, identity gradient, not clipped outside the range.

        The range is a running statistic of the unclipped values, so they must stay free to grow
        past it: with a clipped gradient, values stuck at the top of a moving-average range get
        no gradient, the batch maximum stops growing and training stalls. (Training takes the
        same gradient from `_StraightThrough`, without building this graph.)
        """
        if not x.requires_grad:
            return quantized
        return x + (quantized - x).detach()

    def extra_repr(self) -> str:
        kind = "per-channel" if self.per_channel else "per-tensor"
        sym = "symmetric" if self.symmetric else "asymmetric"
        return f"bits={self.bits}, {kind}, {sym}, {self.update_method.value}, momentum={self.momentum}"
