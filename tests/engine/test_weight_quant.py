"""Weight quantization: symmetric, per output channel, integers in [-L, L], L = 2^(bits-1) - 1."""
from __future__ import annotations

import pytest
import torch

from qat_runner.engine import fake_quantize_weight, quantize_weight, weight_scale

BITS = [2, 4, 8]
SHAPES = [(16, 8, 3, 3), (10, 20), (6, 1, 3, 3)]  # conv, linear, depthwise conv


def limit(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def reference(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, integers, dequantized) straight from the documented formula, in float64."""
    w64 = w.double()
    L = limit(bits)
    scale = w64.abs().flatten(1).amax(dim=1).clamp(min=1e-6) / L
    view = scale.reshape((-1,) + (1,) * (w.dim() - 1))
    q = torch.clamp(torch.round(w64 / view), -L, L)
    return scale, q, q * view


def random_weight(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Channels of very different magnitudes, so a per-tensor scale would be visibly wrong.
    mags = torch.logspace(-3, 1, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    return torch.randn(shape, generator=g) * mags


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", BITS)
def test_weight_scale_is_max_abs_over_limit_per_channel(bits, shape):
    w = random_weight(shape)
    scale_ref, _, _ = reference(w, bits)
    scale = weight_scale(w, bits)
    assert scale.shape == (shape[0],)
    torch.testing.assert_close(scale.double(), scale_ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_weight_matches_formula(bits, shape):
    w = random_weight(shape, seed=bits)
    _, _, deq_ref = reference(w, bits)
    out = fake_quantize_weight(w, bits)
    assert out.shape == w.shape and out.dtype == w.dtype
    torch.testing.assert_close(out.double(), deq_ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", BITS)
def test_quantize_weight_integers_and_scale(bits, shape):
    w = random_weight(shape, seed=10 + bits)
    scale_ref, q_ref, _ = reference(w, bits)
    q, scale = quantize_weight(w, bits)
    L = limit(bits)
    assert q.dtype == torch.int8
    assert q.shape == w.shape
    assert int(q.min()) >= -L and int(q.max()) <= L
    torch.testing.assert_close(q.double(), q_ref, rtol=0, atol=0)
    torch.testing.assert_close(scale.double(), scale_ref, rtol=1e-6, atol=0)
    # The largest-magnitude weight of every channel maps onto +-L: the full range is used.
    assert torch.equal(q.flatten(1).abs().amax(dim=1), torch.full((shape[0],), L, dtype=torch.int8))
    # q * scale is what the fake-quantized training forward used.
    view = scale.reshape((-1,) + (1,) * (w.dim() - 1))
    torch.testing.assert_close(q.float() * view, fake_quantize_weight(w, bits), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bits", BITS)
def test_number_of_levels_per_channel(bits):
    # Many weights per channel: every level would be hit if the grid were finer than allowed.
    g = torch.Generator().manual_seed(bits)
    w = torch.rand(4, 4096, generator=g) * 2 - 1
    w[:, 0], w[:, 1] = 1.0, -1.0  # both ends of the range are present in every channel
    q, _ = quantize_weight(w, bits)
    out = fake_quantize_weight(w, bits)
    max_levels = 2**bits - 1
    for c in range(w.shape[0]):
        assert torch.unique(q[c]).numel() <= max_levels
        assert torch.unique(out[c]).numel() <= max_levels
    # A dense uniform sample over [-max, max] hits every level: exactly 2^bits - 1 of them.
    assert torch.unique(q[0]).numel() == max_levels


@pytest.mark.parametrize("bits", BITS)
def test_all_zero_channel_gives_no_nan(bits):
    w = random_weight((4, 3, 3, 3), seed=3)
    w[1] = 0.0
    scale = weight_scale(w, bits)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    torch.testing.assert_close(scale[1], torch.tensor(1e-6 / limit(bits)))
    out = fake_quantize_weight(w, bits)
    q, q_scale = quantize_weight(w, bits)
    assert torch.isfinite(out).all()
    assert torch.isfinite(q_scale).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(q[1], torch.zeros_like(q[1]))
    # The other channels are unaffected by the zero one.
    _, _, deq_ref = reference(w, bits)
    torch.testing.assert_close(out.double(), deq_ref, rtol=1e-5, atol=1e-9)


def test_fake_quantize_weight_has_straight_through_gradient():
    w = random_weight((8, 4, 3, 3), seed=5).requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(w.shape, generator=g)
    (fake_quantize_weight(w, 4) * upstream).sum().backward()
    # Every weight is inside [-L*scale, L*scale] by construction, so the gradient is the identity.
    torch.testing.assert_close(w.grad, upstream)


def test_weight_quant_does_not_modify_input():
    w = random_weight((5, 7), seed=2)
    before = w.clone()
    quantize_weight(w, 4)
    fake_quantize_weight(w, 4)
    weight_scale(w, 4)
    assert torch.equal(w, before)
