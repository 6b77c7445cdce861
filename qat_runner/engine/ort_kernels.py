"""onnxruntime's CPU integer kernels, their arithmetic written out in PyTorch.

The int8 artifact runs integer kernels where onnxruntime fuses DequantizeLinear -> op ->
QuantizeLinear (QLinearConv, QGemm, QLinearAdd, QLinearAveragePool, QLinearGlobalAveragePool).
They do not compute "the op in float, then QuantizeLinear": they work on the stored integers with
scale ratios in float32, and their roundings differ from the float op at near-ties. The test
phase calls these functions so that it computes, bit for bit, what the artifact computes.

Each function follows the x86-64 code of onnxruntime's MLAS library and CPU contrib ops
(onnxruntime 1.2x-1.3x): `qladd.cpp` / `intrinsics/avx2/qladd_avx2.cpp`, `qlgavgpool.cpp`,
`MlasRequantizeOutput`, `qlinear_pool.cc`, `qlinearconv.cc`, `quant_gemm.cc`. Integers travel as
integer-valued float tensors. Hand-written because no library exposes these kernels' arithmetic
without running onnxruntime, which the engine must not depend on. Not emulated bit for bit:
ARM's NEON kernels, which use fixed-point multipliers (the results differ from these at rounding
ties only).

QLinearConcat needs no function: it dequantizes each input (`scale * (q - zero_point)`) and
quantizes with QuantizeLinear's `round(x / scale)`, which is exactly what the test phase's
concatenation followed by its feature quantizer computes. uint8 max pooling is exact anyway.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from typing import Literal

import torch

AddFlavour = Literal["avx2", "sse2", "reference"]


@dataclass(frozen=True)
class QParams:
    """Per-tensor quantization of one kernel input or output: scale, zero point, integer type."""

    scale: float  # a float32 value
    zero_point: int
    type_min: int  # the integer type's range (0..255 or -128..127), where the kernels saturate
    type_max: int


def _f32(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fused multiply-add (one rounding), as `_mm256_fmadd_ps` computes it.

    Here `a` or `b` is an 8-bit integer, so the product is exact in float64, and so is the sum
    as long as the scale ratio is above 2^-20 of the zero-point term (or the integer is 0):
    rounding the float64 result to float32 is then the single rounding of a true FMA. torch
    has no FMA op.
    """
    return (a.double() * b.double() + c.double()).float()


@functools.lru_cache(maxsize=1)
def host_add_flavour() -> AddFlavour:
    """Which QLinearAdd kernel onnxruntime picks on this machine.

    MLAS uses its AVX2 kernel (fused multiply-adds) where the CPU and OS support AVX2 and FMA3,
    else the SSE2 one (separate multiply and add); other architectures get the reference formula
    here. Asks the CPU itself (torch's cpuinfo, else /proc/cpuinfo), not ATEN_CPU_CAPABILITY.
    Every x86 CPU with AVX2 has FMA3, so AVX2 alone decides.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "reference"
    probe = getattr(torch.cpu, "_is_avx2_supported", None)
    if probe is not None:
        return "avx2" if probe() else "sse2"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "avx2" if {"avx2", "fma"} <= set(flags) else "sse2"


def qlinear_add(qa: torch.Tensor, qb: torch.Tensor, a: QParams, b: QParams, c: QParams,
                flavour: AddFlavour | None = None) -> torch.Tensor:
    """QLinearAdd(A, B) -> C on stored integers `qa`, `qb` (same shape): C's integers.

    MLAS (x86): `rAC = sA/sC`, `rBC = sB/sC` and `fixed = zC - (rAC*zA + rBC*zB)` in float32,
    then per element `round_half_even(fixed + qa*rAC + qb*rBC)` saturated to the type. The AVX2
    kernel evaluates the sum as `fma(qa, rAC, fma(qb, rBC, fixed))` (and `fixed` with one FMA, as
    the compiler contracts it); the SSE2 kernel rounds after every multiply and add.
    """
    flavour = flavour or host_add_flavour()
    qa, qb = qa.float(), qb.float()
    if flavour == "reference":  # MlasQLinearAddKernelRawHelper
        value = (_f32(a.scale, qa) * (qa - a.zero_point) + _f32(b.scale, qa) * (qb - b.zero_point)) / _f32(c.scale, qa)
        value = value.clamp(c.type_min - c.zero_point, c.type_max - c.zero_point)
        return torch.round(value + c.zero_point)
    r_ac = _f32(a.scale, qa) / _f32(c.scale, qa)
    r_bc = _f32(b.scale, qa) / _f32(c.scale, qa)
    za, zb, zc = (_f32(float(z), qa) for z in (a.zero_point, b.zero_point, c.zero_point))
    if flavour == "avx2":
        fixed = zc - _fma32(r_ac, za, r_bc * zb)
        value = _fma32(qa, r_ac, _fma32(qb, r_bc, fixed))
    elif flavour == "sse2":
        fixed = zc - (r_ac * za + r_bc * zb)
        value = (fixed + qa * r_ac) + qb * r_bc
    else:
        raise ValueError(f"flavour={flavour!r} is not accepted: use 'avx2', 'sse2' or 'reference'")
    return torch.round(value).clamp(c.type_min, c.type_max)


def requantize(acc: torch.Tensor, scale: torch.Tensor, y: QParams) -> torch.Tensor:
    """QLinearConv / QGemm output: int32 accumulators (bias included) -> output integers.

    MLAS (`MlasRequantizeOutput`): the accumulator converted to float32, times the float32
    output scale (per output channel), clamped, rounded half to even, plus the zero point.
    """
    value = (acc.float() * scale).clamp(y.type_min - y.zero_point, y.type_max - y.zero_point)
    return torch.round(value) + y.zero_point


def qlinear_global_avg_pool(q: torch.Tensor, x: QParams, y: QParams) -> torch.Tensor:
    """QLinearGlobalAveragePool over the last two dims (N, C, H, W) -> (N, C, 1, 1) integers.

    MLAS: an exact integer sum minus `zX * HW`, converted to float32, times the float32
    `sX / (sY * HW)`, clamped, rounded half to even, plus `zY`.
    """
    size = q.shape[-2] * q.shape[-1]
    scale = _f32(x.scale, q) / (_f32(y.scale, q) * _f32(float(size), q))
    # integer sums are exact in float64 (|sum| < 2^53), whatever order torch adds them in
    acc = q.double().sum(dim=(-2, -1), keepdim=True) - float(x.zero_point * size)
    value = (acc.float() * scale).clamp(y.type_min - y.zero_point, y.type_max - y.zero_point)
    return torch.round(value) + y.zero_point


def qlinear_avg_pool2d(q: torch.Tensor, x: QParams, y: QParams, kernel_size: tuple[int, int],
                       stride: tuple[int, int], padding: tuple[int, int],
                       count_include_pad: bool) -> torch.Tensor:
    """QLinearAveragePool (2-D, floor mode) on stored integers (N, C, H, W).

    onnxruntime dequantizes (`sX * (q - zX)`, float32), sums each window's valid elements one
    by one in row-major order in float32, divides by the count (the kernel area with
    `count_include_pad`, else the valid elements), then `nearbyint(v / sY + zY)` saturated. A
    kernel that covers the whole unpadded input takes the global-average-pool kernel instead.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    height, width = q.shape[-2:]
    if (kh, kw) == (height, width) and (ph, pw) == (0, 0):
        return qlinear_global_avg_pool(q, x, y)
    values = (q.float() - x.zero_point) * _f32(x.scale, q)
    padded = torch.nn.functional.pad(values, (pw, pw, ph, ph))  # adding +0.0 leaves a sum as is
    out_h, out_w = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    acc = torch.zeros(*q.shape[:-2], out_h, out_w, dtype=torch.float32, device=q.device)
    for i in range(kh):
        for j in range(kw):
            acc = acc + padded[..., i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw]
    if count_include_pad:
        count = _f32(float(kh * kw), q)
    else:
        count = (_valid_counts(height, out_h, kh, sh, ph, q)[:, None]
                 * _valid_counts(width, out_w, kw, sw, pw, q)[None, :])
    value = (acc / count) / _f32(y.scale, q) + _f32(float(y.zero_point), q)
    return torch.round(value).clamp(y.type_min, y.type_max)


def _valid_counts(size: int, out: int, kernel: int, stride: int, pad: int, like: torch.Tensor) -> torch.Tensor:
    """Per output position, how many input positions of one dim its window covers."""
    start = torch.arange(out, device=like.device) * stride - pad
    return ((start + kernel).clamp(max=size) - start.clamp(min=0)).float()
