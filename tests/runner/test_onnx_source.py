"""model=onnx: a float ONNX classifier (here exported from torchvision) becomes a trainable torch
model with the same predictions, then quantizes and exports like any other model."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision

from qat_runner import data as qdata
from qat_runner.artifact import integer_kernel_count
from qat_runner.config import ConfigError
from qat_runner.engine import calibrate, export_int8_onnx, turn_quantize
from qat_runner.onnx_import import onnx_classifier
from qat_runner.runner import check_traceable

SIZE = 32


def _export(model: torch.nn.Module, path, size: int = SIZE, channels: int = 3, dynamic: bool = True):
    """The legacy exporter, as most users call it: its shared-initializer Identity nodes are what
    onnx2torch alone cannot read."""
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, channels, size, size),), str(path), dynamo=False,
                          opset_version=13, input_names=["input"], output_names=["logits"], dynamic_axes=axes)
    return path


@pytest.fixture(scope="module")
def digits_test_batch():
    """The digits test split at 32 px, 3 channels: what model=onnx with dataset.image_size=32 trains on."""
    splits = qdata.digits(channels=3, image_size=SIZE)
    images, labels = zip(*(splits.test[i] for i in range(len(splits.test))))
    return torch.stack(images), torch.tensor(labels)


@pytest.fixture(scope="module")
def mobilenet_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    return model, _export(model, tmp_path_factory.mktemp("onnx") / "mobilenet_v2.onnx")


def test_onnx_model_has_the_torch_models_float_accuracy(mobilenet_onnx, digits_test_batch):
    model, path = mobilenet_onnx
    images, labels = digits_test_batch
    converted = onnx_classifier(str(path), num_classes=10, in_channels=3, image_size=SIZE).eval()
    with torch.no_grad():
        expected, got = model(images), converted(images)
    assert expected.argmax(1).unique().numel() > 1, "a constant prediction would make the check empty"
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert (got.argmax(1) == labels).float().mean() == (expected.argmax(1) == labels).float().mean()
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    assert any(p.requires_grad for p in converted.parameters()), "the converted model must be trainable"


def test_onnx_model_quantizes_and_exports_with_integer_kernels(mobilenet_onnx, digits_test_batch, tmp_path):
    _model, path = mobilenet_onnx
    images, _labels = digits_test_batch
    converted = onnx_classifier(str(path), num_classes=10, in_channels=3, image_size=SIZE)
    qat = turn_quantize(converted)
    calibrate(qat, [images[i:i + 16] for i in range(0, 64, 16)], 4)
    artifact = export_int8_onnx(qat.eval(), images[:2], tmp_path / "model.int8.onnx")
    # MobileNetV2: 52 convs and the classifier, all run by onnxruntime's integer kernels
    assert integer_kernel_count(artifact) == 53


def test_onnx_head_is_replaced_for_other_classes(mobilenet_onnx):
    _model, path = mobilenet_onnx
    converted = onnx_classifier(str(path), num_classes=4, in_channels=3, image_size=SIZE)
    assert converted(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, 4)


@pytest.mark.parametrize("kwargs, message", [
    ({"in_channels": 1}, "model.in_channels=1 does not match"),
    ({"image_size": 16}, "dataset.image_size=16 does not match"),
])
def test_onnx_input_mismatch_is_one_line(tmp_path, kwargs, message):
    path = _export(torchvision.models.squeezenet1_1(num_classes=10), tmp_path / "fixed.onnx", dynamic=False)
    settings = {"num_classes": 10, "in_channels": 3, "image_size": SIZE, **kwargs}
    with pytest.raises(ConfigError) as info:
        onnx_classifier(str(path), **settings)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert "use " in str(info.value)


def test_onnx_missing_or_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="model=onnx needs model.path"):
        onnx_classifier(None, num_classes=10)
    with pytest.raises(ConfigError, match="does not exist"):
        onnx_classifier(str(tmp_path / "nope.onnx"), num_classes=10)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(np.arange(100, dtype=np.uint8).tobytes())
    with pytest.raises(ConfigError, match="not an ONNX model|not a model onnxruntime can load"):
        onnx_classifier(str(junk), num_classes=10)


class _Gate(torch.nn.Module):
    def forward(self, x):
        return x if x.mean() > 0 else -x


def test_untraceable_model_is_refused_before_training_naming_the_layer():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), _Gate())
    with pytest.raises(ConfigError) as info:
        check_traceable(model, None)
    assert "layer '1'" in str(info.value) and "_Gate.forward" in str(info.value)
