"""model.int8.mnn (export.mnn=true): the hand-written compression-parameters encoding, our
quantizers in MNN's int8 convention, the converter's output refused unless full int8, a QAT LeNet
through MNN's converter and runtime, and the one-line error when MNN is not installed."""
from __future__ import annotations

import dataclasses
import json
import struct
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qat_runner.engine import FeatureQuantizer, QuantConfig
from qat_runner.mnn_compression import ActivationParams, LayerParams, WeightParams, encode_activation, encode_pipeline
from qat_runner.mnn_export import (INSTALL_HINT, MNN_FILE, MnnExportError, activation_params, check_full_int8,
                                   check_mnn_artifact, export_int8_mnn, int8_conv_outputs, mnn_missing)

needs_mnn = pytest.mark.skipif(mnn_missing(), reason="MNN is not installed (pip install 'qat_runner[mnn]')")


# --------------------------------------------------------------------------------------------
# A protobuf wire-format reader, just enough to decode what we write


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(data: bytes) -> list[tuple[int, object]]:
    """(field number, value): varints as signed int32/64, fixed32 as float, the rest as bytes."""
    out, i = [], 0
    while i < len(data):
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
            value -= (1 << 64) if value >= 1 << 63 else 0
        elif wire == 5:
            value, i = struct.unpack("<f", data[i:i + 4])[0], i + 4
        elif wire == 2:
            n, i = _varint(data, i)
            value, i = data[i:i + n], i + n
        else:
            raise AssertionError(f"unexpected wire type {wire}")
        out.append((field, value))
    return out


def _one(fields, number):
    values = [v for f, v in fields if f == number]
    assert len(values) == 1, (number, fields)
    return values[0]


def _activation(data: bytes) -> ActivationParams:
    f = _fields(data)
    (scale,) = [v for n, v in f if n == 3]
    return ActivationParams(_one(f, 1).decode(), scale, _one(f, 4), _one(f, 5), _one(f, 6), _one(f, 2))


def _assert_same(got: ActivationParams, want: ActivationParams) -> None:
    """Equal, the scale to float32 precision (it travels as a fixed32)."""
    assert got.scale == pytest.approx(want.scale, rel=1e-6)
    assert dataclasses.replace(got, scale=want.scale) == want


def test_activation_known_bytes():
    """Negative int32s are 10-byte sign-extended varints; floats are unpacked fixed32."""
    got = encode_activation(ActivationParams("x", 0.5, -1, -128, 127))
    assert got == bytes.fromhex("0a0178" "1008" "1d0000003f" "20ffffffffffffffffff01"
                                "2880ffffffffffffffff01" "307f")


def test_pipeline_round_trips():
    layers = [LayerParams(ActivationParams("input", 0.0098, -52), WeightParams("w0", (0.01, 0.02), -127, 127),
                          ActivationParams("relu", 0.016, -128)),
              LayerParams(ActivationParams("pool", 0.03, 0, 0, 127), WeightParams("w1", (0.5,), -7, 7, 4),
                          ActivationParams("logits", 0.18, -27))]
    pipeline = _fields(encode_pipeline(layers))
    assert _one(pipeline, 1) == b"0.0.0"  # Pipeline.version (required)
    algo = _fields(_one(pipeline, 2))
    assert _one(algo, 1) == 0  # QUANTIZE
    quant = _fields(_one(algo, 2))
    assert _one(quant, 1) == 1  # ROUND_AWAY_FROM_ZERO
    decoded = [_fields(v) for n, v in quant if n == 4]
    assert len(decoded) == 2
    for layer, want in zip(decoded, layers):
        _assert_same(_activation(_one(layer, 1)), want.input)
        _assert_same(_activation(_one(layer, 3)), want.output)
        weight = _fields(_one(layer, 2))
        assert _one(weight, 1).decode() == want.weight.name
        assert [v for n, v in weight if n == 3] == pytest.approx(want.weight.scales)
        assert (_one(weight, 4), _one(weight, 5), _one(weight, 2)) == (
            want.weight.clamp_min, want.weight.clamp_max, want.weight.bits)
        assert _one(layer, 4) == 0  # QuantMethod QAT


# --------------------------------------------------------------------------------------------
# Our quantizers in MNN's convention


def _quantizer(lo: float, hi: float, **settings) -> FeatureQuantizer:
    q = FeatureQuantizer(QuantConfig(**settings))
    q.observing = True
    q(torch.tensor([lo, hi]))
    return q.eval()


def test_uint8_grid_shifted_exactly():
    q = _quantizer(-0.75, 1.75)
    p = activation_params("t", q)
    assert p.scale == pytest.approx(float(q.scale))
    assert (p.zero_point, p.clamp_min, p.clamp_max) == (int(q.zero_point) - 128, -128, 127)


def test_symmetric_grid_kept():
    q = _quantizer(-1.0, 2.0, symmetric_features=True)
    p = activation_params("t", q)
    assert (p.scale, p.zero_point, p.clamp_min, p.clamp_max) == (pytest.approx(float(q.scale)), 0, -127, 127)


def test_max_pooled_features_get_codes_of_one_sign():
    relu8 = _quantizer(0.0, 2.54)
    p = activation_params("t", relu8, nonnegative_codes=True, nonnegative=True)
    assert (p.zero_point, p.clamp_min, p.clamp_max) == (0, 0, 127)
    assert p.scale == pytest.approx(2.54 / 127)  # 256 codes do not fit: 127 steps over the range
    relu7 = _quantizer(0.0, 1.27, feature_bits=7)  # [0, 127]: the grid is kept
    assert activation_params("t", relu7, nonnegative_codes=True) == ActivationParams(
        "t", float(relu7.scale), 0, 0, 127)
    symmetric_relu = _quantizer(-1.0, 1.0, symmetric_features=True)
    assert activation_params("t", symmetric_relu, nonnegative_codes=True, nonnegative=True) == ActivationParams(
        "t", float(symmetric_relu.scale), 0, 0, 127)


class _Residual(nn.Module):
    """conv-ReLU, MaxPool, a residual Add then ReLU, a Linear head: each MNN special case once."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6())
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        return self.head(x.flatten(1))


def test_special_features_get_nonnegative_codes():
    """MaxPool's input and the Add+ReLU's output use codes [0, 127] with zero point 0; the model
    input and the logits keep our uint8 grid, shifted by -128."""
    from qat_runner.engine import QuantLayer, calibrate, turn_quantize
    from qat_runner.mnn_export import compression_layers, export_twin_onnx, float_twin

    torch.manual_seed(0)
    qat = turn_quantize(_Residual().eval())
    calibrate(qat, [(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))] * 2, 2)
    qat.eval()
    layers = {name: m for name, m in qat.named_modules() if isinstance(m, QuantLayer)}
    params = compression_layers(export_twin_onnx(float_twin(qat), torch.rand(2, 1, 8, 8)), layers)
    stem, body, head = params
    for p in (stem.output, body.input, head.input):  # ReLU -> MaxPool; MaxPool; Add -> ReLU
        assert (p.zero_point, p.clamp_min, p.clamp_max) == (0, 0, 127), p
    assert body.output.clamp_min == -128  # ReLU6 output, not pooled, not added: our grid
    for p in (stem.input, head.output):
        assert (p.clamp_min, p.clamp_max) == (-128, 127), p


def test_per_channel_features_refused():
    q = FeatureQuantizer(QuantConfig(feature_scale_stat_method="PerChannel"), channels=3)
    with pytest.raises(MnnExportError, match="one scale"):
        activation_params("t", q)


def test_float_convolution_refused(tmp_path):
    """A converted model whose convolution kept float weights is never accepted as int8."""
    net = {"tensorName": ["input", "relu"],
           "oplists": [{"type": "Convolution", "name": "conv", "inputIndexes": [0], "outputIndexes": [1],
                        "main": {"weight": [0.5, -0.25], "bias": [0.0]}}]}
    assert int8_conv_outputs(net) == set()
    path = tmp_path / "net.json"
    path.write_text(json.dumps(net))
    params = [LayerParams(ActivationParams("input", 0.1, 0), WeightParams("w", (0.1,), -127, 127),
                          ActivationParams("relu", 0.1, -128))]
    with pytest.raises(MnnExportError, match="left 1 of 1 quantized layers in float"):
        check_full_int8(path, params)


# --------------------------------------------------------------------------------------------
# A QAT LeNet through MNN's converter and runtime


@pytest.fixture(scope="module")
def mnn_run(digits_split, qat_lenet_factory, tmp_path_factory):
    """A small LeNet (wide enough that MNN's fixed per-layer overhead does not dominate) trained
    two epochs, calibrated (QAT's test phase), exported to .mnn and scored in MNN's runtime."""
    torch.manual_seed(0)
    model = nn.Sequential(  # the default LeNet's pattern: ReLU and ReLU6 fused, MaxPool, two Linear
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(2):
        for inputs, targets in digits_split.train_loader(seed=epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    qat = qat_lenet_factory(model.eval(), digits_split, qat_epochs=0)
    path = export_int8_mnn(qat, digits_split.x_test[:2], tmp_path_factory.mktemp("mnn") / MNN_FILE)
    check = check_mnn_artifact(path, qat, digits_split.test_loader())
    float_bytes = 4 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        qat_acc = (qat(digits_split.x_test).argmax(1) == digits_split.y_test).float().mean().item()
    return qat, path, float_bytes, check, qat_acc


@needs_mnn
def test_mnn_artifact_is_int8_and_agrees(mnn_run):
    _, path, float_bytes, check, qat_acc = mnn_run
    assert path.is_file()
    assert not list(path.parent.glob(f".{MNN_FILE}.*")), "temporary file left behind"
    ratio = path.stat().st_size / float_bytes
    assert ratio < 0.35, f"{path.stat().st_size} B is {ratio:.0%} of the float weights: not int8"
    assert check.samples == 360
    assert qat_acc > 0.85, "training failed"
    assert check.agreement >= 0.99, check
    assert abs(check.mnn_acc - qat_acc) <= 0.01, (check, qat_acc)


@needs_mnn
def test_failed_export_leaves_no_file(mnn_run, digits_split, tmp_path, monkeypatch):
    import qat_runner.mnn_export as mnn_export

    def fail(*args):
        raise MnnExportError("converter failed (simulated)")

    monkeypatch.setattr(mnn_export, "run_converter", fail)
    with pytest.raises(MnnExportError, match="simulated"):
        export_int8_mnn(mnn_run[0], digits_split.x_test[:2], tmp_path / MNN_FILE)
    assert list(tmp_path.iterdir()) == []


class _InvertedResidual(nn.Module):
    """MobileNetV2's pattern: conv+ReLU6, depthwise conv+ReLU6, 1x1 projection, residual add,
    global average pool, classifier. One depthwise channel has 10x the weights (as BatchNorm
    folding makes), where MNN's own truncation of its int32 bias shifts codes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6())
        self.project = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 10)
        with torch.no_grad():
            self.depthwise[0].weight[2] *= 10
            self.depthwise[0].bias[2] = 0.37

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.project(self.depthwise(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


@needs_mnn
def test_mnn_scheme_computes_mnns_int8_kernels_code_for_code(tmp_path):
    """quant=mnn's test phase and MNN 3.6.1's runtime give the same int8 codes, tensor by tensor:
    depthwise and GEMM kernels, the residual add and the pooled classifier input."""
    from qat_runner.engine import QuantLayer, calibrate, turn_quantize
    from qat_runner.mnn_export import INPUT_NAME, OUTPUT_NAME, conv_sites, export_twin_onnx, float_twin, import_mnn

    torch.manual_seed(0)
    qat = turn_quantize(_InvertedResidual().eval(), QuantConfig(scheme="mnn"))
    inputs = torch.randn(64, 3, 8, 8)
    calibrate(qat, [(inputs[i:i + 16], torch.zeros(16, dtype=torch.long)) for i in range(0, 64, 16)], 4)
    qat.eval()
    path = export_int8_mnn(qat, inputs[:2], tmp_path / MNN_FILE)
    layers = {name: m for name, m in qat.named_modules() if isinstance(m, QuantLayer)}
    sites = conv_sites(export_twin_onnx(float_twin(qat), inputs[:2]), layers)
    ours = {}
    for site in sites:
        site.layer.register_forward_hook(lambda m, i, o, name=site.output: ours.__setitem__(name, o))
    with torch.no_grad():
        logits = qat(inputs)
    mnn = import_mnn()
    x = mnn.expr.const(inputs.numpy(), list(inputs.shape), mnn.expr.NCHW)
    for site in sites:
        module = mnn.nn.load_module_from_file(str(path), [INPUT_NAME], [site.output])
        out = module.forward([x])[0]
        if out.data_format == mnn.expr.NC4HW4:
            out = mnn.expr.convert(out, mnn.expr.NCHW)
        theirs = torch.from_numpy(np.asarray(out.read(), dtype=np.float32).copy()).reshape(ours[site.output].shape)
        scale = site.layer.output_quant.scale
        differ = (theirs - ours[site.output]).abs() > scale / 2
        # measured: 1-2 codes of 32,768 (float ties); MNN's truncated depthwise bias: 0.07%, 0.4%
        # of the large channel; the float path (dequantize, conv, quantize): 0.2% of conv2d_2
        assert differ.float().mean().item() <= 3e-4, f"{site.output}: {differ.float().mean():.3%} differ from MNN"
        assert differ[:, 2].float().mean().item() <= 1e-3, f"{site.output}: the large channel differs"
    # random weights leave near-tied logits: a one-code difference may flip one of 64 (seen once)
    check = check_mnn_artifact(path, qat, [(inputs, torch.zeros(64, dtype=torch.long))])
    assert check.agreement >= 0.95, check


@needs_mnn
def test_default_scheme_with_a_depthwise_conv_ships_an_mnn(tmp_path):
    """quant=default's int32 bias goes to MNN's depthwise kernel the same way (a regression: the
    export once read only quant=mnn's float bias)."""
    from qat_runner.engine import calibrate, turn_quantize

    torch.manual_seed(0)
    qat = turn_quantize(_InvertedResidual().eval())
    inputs = torch.randn(64, 3, 8, 8)
    calibrate(qat, [(inputs, torch.zeros(64, dtype=torch.long))], 1)
    path = export_int8_mnn(qat.eval(), inputs[:2], tmp_path / MNN_FILE)
    check = check_mnn_artifact(path, qat, [(inputs, torch.zeros(64, dtype=torch.long))])
    assert check.agreement >= 0.95, check


# --------------------------------------------------------------------------------------------
# Before training: MNN missing, per-channel features


def test_missing_mnn_is_one_line_before_training(monkeypatch):
    from qat_runner.preflight import command_line_error

    monkeypatch.setitem(sys.modules, "MNN", None)  # `import MNN` now fails
    line = command_line_error(["export.mnn=true"])
    assert line is not None and "\n" not in line
    assert "export.mnn=true" in line and INSTALL_HINT in line
    assert command_line_error(["export.mnn=false"]) is None


@needs_mnn
def test_per_channel_features_refused_before_training():
    from qat_runner.preflight import command_line_error

    line = command_line_error(["export.mnn=true", "quant.feature_scale_stat_method=PerChannel"])
    assert line is not None and "export.mnn=true" in line and "PerTensor" in line
