"""FeatureQuantizer: running range (MovingAverage / Maximum), symmetric or asymmetric, per tensor
or per channel, updated in training (or while observing) and frozen in eval."""
from __future__ import annotations

import pytest
import torch

from qat_runner.engine import FeatureQuantizer, QuantConfig
from qat_runner.engine.fake_quant import OUTGROWN_FACTOR

M = 0.9  # a momentum far from 1 so a wrong rule is visible


def make_q(channels=1, channel_axis=1, **cfg) -> FeatureQuantizer:
    cfg.setdefault("momentum", M)
    q = FeatureQuantizer(QuantConfig(**cfg), channels, channel_axis)
    return q.train()


def batch(shape, seed, shift=0.0, mag=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * mag + shift


def state(q: FeatureQuantizer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in q.state_dict().items()}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- symmetric: the scale is tracked


def sym_scale(x: torch.Tensor, bits=8) -> torch.Tensor:
    return (x.abs().max() / (2 ** (bits - 1) - 1)).reshape(1)


@pytest.mark.parametrize("bits", [8, 4])
def test_symmetric_moving_average_scale(bits):
    q = make_q(symmetric_features=True, feature_bits=bits, scale_update_method="MovingAverage")
    x1, x2 = batch((4, 3, 5, 5), 1, mag=2.0), batch((4, 3, 5, 5), 2, mag=0.5)
    s1, s2 = sym_scale(x1, bits), sym_scale(x2, bits)
    q(x1)
    assert torch.equal(q.scale, s1)  # the first value is taken as is
    assert int(q.num_updates) == 1
    q(x2)
    assert torch.equal(q.scale, M * s1 + (1 - M) * s2)
    assert int(q.num_updates) == 2
    assert torch.equal(q.zero_point, torch.zeros(1, dtype=torch.int32))
    L = 2 ** (bits - 1) - 1
    torch.testing.assert_close(q.running_max, q.scale * L)
    torch.testing.assert_close(q.running_min, -q.scale * L)


@pytest.mark.parametrize("order", ["growing", "shrinking"])
def test_symmetric_maximum_scale(order):
    q = make_q(symmetric_features=True, scale_update_method="Maximum")
    small, large = batch((4, 3, 5, 5), 1, mag=0.5), batch((4, 3, 5, 5), 2, mag=3.0)
    x1, x2 = (small, large) if order == "growing" else (large, small)
    q(x1)
    assert torch.equal(q.scale, sym_scale(x1))
    q(x2)
    assert torch.equal(q.scale, torch.maximum(sym_scale(x1), sym_scale(x2)))
    assert torch.equal(q.scale, sym_scale(large))


# ------------------------------------------------------- asymmetric: the range ends are tracked


def asym_scale_zp(lo, hi, bits=8):
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    zp = torch.clamp(-torch.round(lo / scale), 0, qmax).to(torch.int32)
    return scale, zp


def check_asym_scale_zp(q, bits=8):
    scale, zp = asym_scale_zp(q.running_min, q.running_max, bits)
    torch.testing.assert_close(q.scale, scale, rtol=1e-6, atol=0)
    assert torch.equal(q.zero_point, zp)
    assert int(q.zero_point.min()) >= 0 and int(q.zero_point.max()) <= 2**bits - 1
    # The real value 0 is exactly representable: zero_point is the integer of 0.0.
    assert (q.running_min <= 0).all() and (q.running_max >= 0).all()


def test_asymmetric_moving_average_range():
    q = make_q(scale_update_method="MovingAverage")
    x1 = batch((4, 3, 5, 5), 1, shift=0.5)  # both signs
    x2 = batch((4, 3, 5, 5), 2, shift=1.0, mag=1.5)
    lo1, hi1 = x1.min().clamp(max=0.0).reshape(1), x1.max().clamp(min=0.0).reshape(1)
    lo2, hi2 = x2.min().clamp(max=0.0).reshape(1), x2.max().clamp(min=0.0).reshape(1)
    # under OUTGROWN_FACTOR times the first range: blended (a wider batch widens at once, see
    # tests/engine/test_qat_from_scratch.py)
    assert hi2 - lo2 < OUTGROWN_FACTOR * (hi1 - lo1)
    q(x1)
    assert torch.equal(q.running_min, lo1) and torch.equal(q.running_max, hi1)
    check_asym_scale_zp(q)
    q(x2)
    assert torch.equal(q.running_min, M * lo1 + (1 - M) * lo2)
    assert torch.equal(q.running_max, M * hi1 + (1 - M) * hi2)
    check_asym_scale_zp(q)


def test_asymmetric_range_always_holds_zero():
    q = make_q(scale_update_method="MovingAverage")
    pos = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) + 1.0  # all >= 1
    q(pos)
    assert torch.equal(q.running_min, torch.zeros(1))
    assert torch.equal(q.running_max, pos.max().reshape(1))
    assert torch.equal(q.zero_point, torch.zeros(1, dtype=torch.int32))
    neg = -pos  # all <= -1
    q2 = make_q(scale_update_method="Maximum")
    q2(neg)
    assert torch.equal(q2.running_max, torch.zeros(1))
    assert torch.equal(q2.running_min, neg.min().reshape(1))
    assert torch.equal(q2.zero_point, torch.full((1,), 255, dtype=torch.int32))


def test_asymmetric_maximum_widens_both_ends():
    q = make_q(scale_update_method="Maximum")
    x1 = batch((4, 3, 5, 5), 1, shift=-2.0)  # mostly negative, reaches far below zero
    x2 = batch((4, 3, 5, 5), 2, shift=3.0)   # mostly positive, reaches far above
    q(x1)
    q(x2)
    lo = torch.minimum(x1.min().clamp(max=0), x2.min().clamp(max=0)).reshape(1)
    hi = torch.maximum(x1.max().clamp(min=0), x2.max().clamp(min=0)).reshape(1)
    assert torch.equal(q.running_min, lo)
    assert torch.equal(q.running_max, hi)
    check_asym_scale_zp(q)
    # A third, narrower batch does not shrink the range.
    q(batch((4, 3, 5, 5), 3, mag=0.1))
    assert torch.equal(q.running_min, lo) and torch.equal(q.running_max, hi)


@pytest.mark.parametrize("bits", [8, 5, 2])
def test_asymmetric_feature_bits_set_the_integer_range(bits):
    q = make_q(feature_bits=bits)
    assert (q.quant_min, q.quant_max) == (0, 2**bits - 1)
    x = batch((3, 2, 4, 4), 7, shift=0.3)
    out = q(x)
    check_asym_scale_zp(q, bits)
    levels = out / q.scale + q.zero_point
    assert levels.min() >= -1e-3 and levels.max() <= 2**bits - 1 + 1e-3
    assert torch.unique(out).numel() <= 2**bits


# ------------------------------------------------------------------------------- per channel


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_nchw(symmetric):
    C = 5
    q = make_q(C, 1, feature_scale_stat_method="PerChannel", symmetric_features=symmetric)
    g = torch.Generator().manual_seed(0)
    mags = torch.tensor([0.01, 0.1, 1.0, 10.0, 3.0]).reshape(1, C, 1, 1)
    x = torch.randn(4, C, 6, 6, generator=g) * mags + 0.2 * mags
    q(x)
    assert q.scale.shape == (C,) and q.zero_point.shape == (C,)
    for c in range(C):
        xc = x[:, c]
        if symmetric:
            assert torch.equal(q.scale[c:c + 1], sym_scale(xc))
        else:
            lo, hi = xc.min().clamp(max=0).reshape(1), xc.max().clamp(min=0).reshape(1)
            assert torch.equal(q.running_min[c:c + 1], lo)
            assert torch.equal(q.running_max[c:c + 1], hi)
            scale, zp = asym_scale_zp(lo, hi)
            torch.testing.assert_close(q.scale[c:c + 1], scale, rtol=1e-6, atol=0)
            assert torch.equal(q.zero_point[c:c + 1], zp)
    # Scales follow the channel magnitudes (they are really per channel).
    assert len(set(q.scale.tolist())) == C


@pytest.mark.parametrize("shape", [(16, 6), (4, 3, 6)])
def test_per_channel_linear_features_use_last_axis(shape):
    F_ = shape[-1]
    q = make_q(F_, -1, feature_scale_stat_method="PerChannel", symmetric_features=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 1, F_)
    out = q(x)
    assert q.scale.shape == (F_,)
    for f in range(F_):
        assert torch.equal(q.scale[f:f + 1], sym_scale(x[..., f]))
    levels = out / q.scale  # broadcast along the last axis
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)


def test_per_channel_moving_average_per_entry():
    C = 3
    q = make_q(C, 1, feature_scale_stat_method="PerChannel", symmetric_features=True,
               scale_update_method="MovingAverage")
    x1 = batch((2, C, 4, 4), 1) * torch.tensor([1.0, 2.0, 4.0]).reshape(1, C, 1, 1)
    x2 = batch((2, C, 4, 4), 2) * torch.tensor([1.5, 1.5, 3.0]).reshape(1, C, 1, 1)
    q(x1)
    q(x2)
    for c in range(C):
        s1, s2 = sym_scale(x1[:, c]), sym_scale(x2[:, c])
        assert s2 < OUTGROWN_FACTOR * s1, "within the factor: blended, not widened at once"
        assert torch.equal(q.scale[c:c + 1], M * s1 + (1 - M) * s2)


def test_per_tensor_has_one_scale():
    q = make_q(7, 1, feature_scale_stat_method="PerTensor")
    q(batch((2, 7, 3, 3), 0))
    assert q.scale.shape == (1,) and q.zero_point.shape == (1,)
    assert q.running_min.shape == (1,) and q.running_max.shape == (1,)


# ------------------------------------------------------------------------ train / eval / observe


@pytest.mark.parametrize("method", ["MovingAverage", "Maximum"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_eval_freezes_training_updates_observing_updates(method, symmetric):
    q = make_q(scale_update_method=method, symmetric_features=symmetric)
    q(batch((2, 3, 4, 4), 0))
    trained = state(q)
    assert int(q.num_updates) == 1

    q.eval()
    for seed in (1, 2):
        q(batch((2, 3, 4, 4), seed, mag=5.0))
    assert_state_equal(state(q), trained)

    q.observing = True
    q(batch((2, 3, 4, 4), 3, mag=5.0))
    assert int(q.num_updates) == 2
    assert not torch.equal(q.scale, trained["scale"])

    q.observing = False
    q.train()
    before = state(q)
    q(batch((2, 3, 4, 4), 4, mag=20.0))
    assert int(q.num_updates) == 3
    assert not torch.equal(q.scale, before["scale"])


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_output_on_grid_and_in_range(per_channel, symmetric, bits):
    C = 4
    q = make_q(C, 1, feature_bits=bits, symmetric_features=symmetric,
               feature_scale_stat_method="PerChannel" if per_channel else "PerTensor")
    q(batch((8, C, 5, 5), 0, shift=0.3))  # training: sets the range
    q.eval()
    x = batch((8, C, 5, 5), 1, shift=0.3, mag=3.0)  # wider than the range: some values clip
    out = q(x)
    view = (1, C, 1, 1) if per_channel else (1, 1, 1, 1)
    scale = q.scale.reshape(view)
    zp = q.zero_point.reshape(view).float()
    levels = out / scale + zp
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-3)
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert levels.round().min() >= qmin and levels.round().max() <= qmax
    # Values inside the range are rounded to the nearest level (error <= scale / 2).
    lo, hi = (qmin - zp) * scale, (qmax - zp) * scale
    inside = (x >= lo) & (x <= hi)
    err = (out - x).abs()
    assert inside.float().mean() > 0.3
    assert (err <= scale / 2 * (1 + 1e-4) + 1e-7)[inside].all()
    # Values outside are clipped onto the ends.
    torch.testing.assert_close(out[x > hi], hi.expand_as(x)[x > hi])
    torch.testing.assert_close(out[x < lo], lo.expand_as(x)[x < lo])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradient_is_straight_through_and_not_clipped(mode):
    """Identity gradient inside and outside the range (a clipped one lets a moving-average
    range lock values at its top), while the forward value is the quantized one."""
    q = make_q(symmetric_features=True)
    q(torch.linspace(-1, 1, 101).reshape(1, 1, 1, -1))  # range [-1, 1]
    q.train(mode == "train")
    x = torch.tensor([-3.0, -0.5, 0.0, 0.3, 0.99, 2.0]).reshape(1, 1, 1, -1).requires_grad_(True)
    out = q(x)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert out.max() <= q.scale * q.quant_max + 1e-6  # 2.0 and -3.0 were clamped in the forward
    assert out.min() >= -q.scale * q.quant_max - 1e-6


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_feature_gives_no_nan(symmetric):
    q = make_q(symmetric_features=symmetric)
    out = q(torch.zeros(2, 3, 4, 4))
    assert torch.isfinite(q.scale).all() and (q.scale > 0).all()
    assert torch.equal(out, torch.zeros_like(out))
    out = q(torch.ones(2, 3, 4, 4))  # the next batch still quantizes finitely
    assert torch.isfinite(out).all()
