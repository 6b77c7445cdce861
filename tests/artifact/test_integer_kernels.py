"""The test phase's integer kernels against onnxruntime's, one kernel at a time.

Each case builds a one-node ONNX model with onnxruntime's contrib op (QLinearAdd,
QLinearGlobalAveragePool, QLinearAveragePool, QLinearConcat, QLinearConv), runs it on random
stored integers, with scales chosen so that many results fall exactly on rounding ties, and
requires the engine's result to be the same integers. A naive "float op, then quantize" must
differ somewhere on the same data, so the comparison can fail.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from qat_runner.engine.config import QuantConfig
from qat_runner.engine.fake_quant import FeatureQuantizer
from qat_runner.engine.ort_kernels import (
    QParams,
    host_add_flavour,
    qlinear_add,
    qlinear_avg_pool2d,
    qlinear_global_avg_pool,
    requantize,
)

TYPES = {False: (np.uint8, 0, 255), True: (np.int8, -128, 127)}  # signed: numpy type, range


def run_op(op: str, feeds: dict[str, np.ndarray], constants: dict[str, np.ndarray], order: list[str],
           domain: str = "com.microsoft", **attrs) -> np.ndarray:
    """One node, its constants as initializers, graph optimizations off: the kernel as written."""
    inits = [numpy_helper.from_array(np.asarray(v), name) for name, v in constants.items()]
    graph = helper.make_graph(
        [helper.make_node(op, order, ["Y"], domain=domain, **attrs)], op,
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for n, v in feeds.items()],
        [helper.make_tensor_value_info("Y", helper.np_dtype_to_tensor_dtype(next(iter(feeds.values())).dtype), None)],
        inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def qconst(scale: float, zero_point: int, np_type) -> tuple[np.ndarray, np.ndarray]:
    return np.float32(scale), np.asarray(zero_point, dtype=np_type)


def float32(value: float) -> float:
    return float(np.float32(value))


def scale_sets(rng: np.random.Generator, n: int) -> list[tuple[float, float, float]]:
    """(s1, s2, s_out) triples: random ones and ones whose ratios are 1/2 or 1/4 (many ties)."""
    out = []
    for i in range(n):
        s1, s2, s3 = (float32(rng.uniform(0.002, 0.2)) for _ in range(3))
        if i % 3 == 1:
            s3 = float32(2 * s1)
        elif i % 3 == 2:
            s1, s2 = float32(s3 / 2), float32(s3 / 4)
        out.append((s1, s2, s3))
    return out


def naive(values: torch.Tensor, y: QParams) -> torch.Tensor:
    """QuantizeLinear of a float result: the test phase before integer kernels."""
    return (torch.round(values / torch.tensor(y.scale)) + y.zero_point).clamp(y.type_min, y.type_max)


@pytest.mark.parametrize("signed", [False, True])
def test_qlinear_add_matches_onnxruntime(signed):
    np_type, lo, hi = TYPES[signed]
    rng = np.random.default_rng(1)
    naive_differs = 0
    for s_a, s_b, s_c in scale_sets(rng, 24):
        z_a, z_b, z_c = (int(rng.integers(lo, hi + 1)) for _ in range(3))
        a = rng.integers(lo, hi + 1, 2051).astype(np_type)  # not a multiple of 32: the tail path too
        b = rng.integers(lo, hi + 1, 2051).astype(np_type)
        (sa, za), (sb, zb), (sc, zc) = (qconst(s, z, np_type) for s, z in ((s_a, z_a), (s_b, z_b), (s_c, z_c)))
        expected = run_op("QLinearAdd", {"A": a, "B": b}, {"sa": sa, "za": za, "sb": sb, "zb": zb, "sc": sc, "zc": zc},
                          ["A", "sa", "za", "B", "sb", "zb", "sc", "zc"])
        pa, pb, pc = QParams(s_a, z_a, lo, hi), QParams(s_b, z_b, lo, hi), QParams(s_c, z_c, lo, hi)
        qa, qb = torch.from_numpy(a.astype(np.float32)), torch.from_numpy(b.astype(np.float32))
        got = qlinear_add(qa, qb, pa, pb, pc)
        np.testing.assert_array_equal(got.numpy(), expected, err_msg=f"scales {s_a, s_b, s_c}")
        deq = (qa - z_a) * torch.tensor(s_a) + (qb - z_b) * torch.tensor(s_b)
        naive_differs += int((naive(deq, pc).numpy() != expected).sum())
    assert naive_differs > 0, "the data has no case where the float add rounds differently"


def test_add_flavours_differ_so_the_host_kernel_matters():
    """The AVX2 (fused multiply-add) and SSE2 formulas round some sums differently, so picking
    the host's kernel matters; the host's is the one compared with onnxruntime above."""
    assert host_add_flavour() in ("avx2", "sse2", "reference")
    rng = np.random.default_rng(2)
    q = torch.from_numpy(rng.integers(0, 256, (2, 20_000)).astype(np.float32))
    differ = 0
    for scales in scale_sets(rng, 30):
        params = [QParams(s, int(z), 0, 255) for s, z in zip(scales, rng.integers(0, 256, 3))]
        fma, sse = (qlinear_add(q[0], q[1], *params, flavour=f) for f in ("avx2", "sse2"))
        assert int((fma - sse).abs().max()) <= 1
        differ += int((fma != sse).sum())
    assert differ > 0


@pytest.mark.parametrize("signed", [False, True])
def test_qlinear_global_average_pool_matches_onnxruntime(signed):
    np_type, lo, hi = TYPES[signed]
    rng = np.random.default_rng(3)
    naive_differs = 0
    for i, (s_x, _, s_y) in enumerate(scale_sets(rng, 18)):
        side = (1, 2, 3, 4, 7, 9)[i % 6]
        if i % 2:
            s_y = float32(2 * s_x / side**2)  # the sum times 0.5: a tie at every odd sum
        z_x, z_y = (int(rng.integers(lo, hi + 1)) for _ in range(2))
        (sx, zx), (sy, zy) = qconst(s_x, z_x, np_type), qconst(s_y, z_y, np_type)
        x = rng.integers(lo, hi + 1, (3, 33, side, side)).astype(np_type)
        py = QParams(s_y, z_y, lo, hi)
        got = qlinear_global_avg_pool(torch.from_numpy(x.astype(np.float32)), QParams(s_x, z_x, lo, hi), py)
        for channels_last in (0, 1):  # onnxruntime's NHWC transformer may pick either layout
            feed = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if channels_last else x
            expected = run_op("QLinearGlobalAveragePool", {"X": feed}, {"sx": sx, "zx": zx, "sy": sy, "zy": zy},
                              ["X", "sx", "zx", "sy", "zy"], channels_last=channels_last)
            expected = expected.transpose(0, 3, 1, 2) if channels_last else expected
            np.testing.assert_array_equal(got.numpy(), expected, err_msg=f"side {side}, NHWC {channels_last}")
        mean = ((torch.from_numpy(x.astype(np.float32)) - z_x) * torch.tensor(s_x)).mean((2, 3), keepdim=True)
        naive_differs += int((naive(mean, py).numpy() != expected).sum())
    assert naive_differs > 0


@pytest.mark.parametrize("signed", [False, True])
def test_qlinear_average_pool_matches_onnxruntime(signed):
    np_type, lo, hi = TYPES[signed]
    rng = np.random.default_rng(4)
    naive_differs = 0
    cases = [(3, 1, 1, True), (3, 1, 1, False), (2, 2, 0, True), (3, 2, 1, False), (5, 3, 2, True), (3, 3, 0, False)]
    for i, (s_x, _, s_y) in enumerate(scale_sets(rng, 18)):
        kernel, stride, pad, include_pad = cases[i % len(cases)]
        if i % 2:
            s_y = s_x  # sums of integers divided by 2, 4, 6, 9: ties and near-ties
        z_x, z_y = (int(rng.integers(lo, hi + 1)) for _ in range(2))
        (sx, zx), (sy, zy) = qconst(s_x, z_x, np_type), qconst(s_y, z_y, np_type)
        x = rng.integers(lo, hi + 1, (2, 6, 11, 10)).astype(np_type)
        py = QParams(s_y, z_y, lo, hi)
        qx = torch.from_numpy(x.astype(np.float32))
        got = qlinear_avg_pool2d(qx, QParams(s_x, z_x, lo, hi), py, (kernel, kernel), (stride, stride),
                                 (pad, pad), include_pad)
        for channels_last in (0, 1):
            feed = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if channels_last else x
            expected = run_op("QLinearAveragePool", {"X": feed}, {"sx": sx, "zx": zx, "sy": sy, "zy": zy},
                              ["X", "sx", "zx", "sy", "zy"], kernel_shape=[kernel, kernel], strides=[stride, stride],
                              pads=[pad] * 4, count_include_pad=int(include_pad), channels_last=channels_last)
            expected = expected.transpose(0, 3, 1, 2) if channels_last else expected
            np.testing.assert_array_equal(got.numpy(), expected,
                                          err_msg=f"{cases[i % len(cases)]}, NHWC {channels_last}")
        pooled = nn.functional.avg_pool2d((qx - z_x) * torch.tensor(s_x), kernel, stride, pad,
                                          count_include_pad=include_pad)
        naive_differs += int((naive(pooled, py).numpy() != expected).sum())
    assert naive_differs > 0


def test_average_pool_over_the_whole_input_is_the_global_kernel():
    """onnxruntime runs a pool whose kernel covers the unpadded input as QLinearGlobalAveragePool."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (2, 8, 4, 4)).astype(np.uint8)
    px, py = QParams(0.04, 3, 0, 255), QParams(0.01, 7, 0, 255)  # sum * 0.25: ties
    (sx, zx), (sy, zy) = qconst(px.scale, px.zero_point, np.uint8), qconst(py.scale, py.zero_point, np.uint8)
    expected = run_op("QLinearAveragePool", {"X": x}, {"sx": sx, "zx": zx, "sy": sy, "zy": zy},
                      ["X", "sx", "zx", "sy", "zy"], kernel_shape=[4, 4], strides=[1, 1], pads=[0] * 4)
    got = qlinear_avg_pool2d(torch.from_numpy(x.astype(np.float32)), px, py, (4, 4), (1, 1), (0, 0), True)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_qlinear_concat_is_the_test_phase_quantizer():
    """QLinearConcat requantizes each input with QuantizeLinear: the same integers as the test
    phase's concatenation of dequantized inputs followed by its feature quantizer."""
    rng = np.random.default_rng(6)
    out = FeatureQuantizer(QuantConfig(8, 8, "PerTensor", "MovingAverage", 0.99, False)).eval()
    for s_1, s_2, s_y in scale_sets(rng, 12):
        z_1, z_2, z_y = (int(rng.integers(0, 256)) for _ in range(3))
        if rng.integers(0, 2):
            s_2, z_2 = s_y, z_y  # the output's parameters: onnxruntime copies these bytes
        x1 = rng.integers(0, 256, (2, 3, 5, 5)).astype(np.uint8)
        x2 = rng.integers(0, 256, (2, 4, 5, 5)).astype(np.uint8)
        (s1, z1), (s2, z2), (sy, zy) = (qconst(s, z, np.uint8) for s, z in ((s_1, z_1), (s_2, z_2), (s_y, z_y)))
        expected = run_op("QLinearConcat", {"X1": x1, "X2": x2},
                          {"sy": sy, "zy": zy, "s1": s1, "z1": z1, "s2": s2, "z2": z2},
                          ["sy", "zy", "X1", "s1", "z1", "X2", "s2", "z2"], axis=1)
        out.scale.fill_(s_y)
        out.zero_point.fill_(z_y)
        deq = [(torch.from_numpy(v.astype(np.float32)) - z) * torch.tensor(s)
               for v, s, z in ((x1, s_1, z_1), (x2, s_2, z_2))]
        got = torch.round(out(torch.cat(deq, dim=1)) / out.scale) + out.zero_point
        np.testing.assert_array_equal(got.numpy(), expected)


def test_qlinear_conv_requantization_matches_onnxruntime():
    """QLinearConv: exact integer accumulation plus the int32 bias, then `requantize` with the
    float32 output scale x_scale * w_scale[c] / y_scale."""
    rng = np.random.default_rng(7)
    naive_differs = 0
    for i, (s_x, s_w0, s_y) in enumerate(scale_sets(rng, 6)):
        z_x, z_y = int(rng.integers(0, 256)), int(rng.integers(0, 256))
        x = rng.integers(0, 256, (2, 8, 9, 9)).astype(np.uint8)
        w = rng.integers(-127, 128, (6, 8, 3, 3)).astype(np.int8)
        bias = rng.integers(-5000, 5000, 6).astype(np.int32)
        s_w = (s_w0 * rng.uniform(0.01, 0.05, 6)).astype(np.float32)
        if i % 2:  # output scale exactly 0.5 for every channel: a tie at every odd accumulator
            s_w[:] = s_w[0]
            s_y = float32(float32(s_x * float(s_w[0])) * 2)
        (sx, zx), (sy, zy) = qconst(s_x, z_x, np.uint8), qconst(s_y, z_y, np.uint8)
        constants = {"sx": sx, "zx": zx, "W": w, "sw": s_w, "zw": np.zeros(6, np.int8), "sy": sy, "zy": zy, "B": bias}
        expected = run_op("QLinearConv", {"X": x}, constants, ["X", "sx", "zx", "W", "sw", "zw", "sy", "zy", "B"],
                          domain="", pads=[1] * 4)
        centered = torch.from_numpy(x.astype(np.float64)) - z_x
        acc = nn.functional.conv2d(centered, torch.from_numpy(w.astype(np.float64)),
                                   torch.from_numpy(bias.astype(np.float64)), padding=1)
        scale = (torch.tensor(s_x) * torch.from_numpy(s_w) / torch.tensor(s_y)).reshape(1, -1, 1, 1)
        py = QParams(s_y, z_y, 0, 255)
        np.testing.assert_array_equal(requantize(acc, scale, py).numpy(), expected)
        w_scale = torch.from_numpy(s_w)
        float_conv = nn.functional.conv2d(
            centered.float() * torch.tensor(s_x), torch.from_numpy(w.astype(np.float32)) * w_scale.reshape(-1, 1, 1, 1),
            torch.from_numpy(bias.astype(np.float32)) * torch.tensor(s_x) * w_scale, padding=1)
        naive_differs += int((naive(float_conv, py).numpy() != expected).sum())
    assert naive_differs > 0
