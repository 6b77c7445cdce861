"""The shipped file computes what the eval-mode QAT model computes: onnxruntime vs PyTorch on
the digits test split, for every weight width / feature-scale / scale-update combination."""
from __future__ import annotations

import pytest

from qat_runner.artifact import check_artifact
from qat_runner.engine.export import export_int8_onnx


@pytest.mark.parametrize("scale_update_method", ["MovingAverage", "Maximum"])
@pytest.mark.parametrize("feature_scale_stat_method", ["PerTensor", "PerChannel"])
@pytest.mark.parametrize("bits", [8, 4])
def test_artifact_agrees_with_eval_model(bits, feature_scale_stat_method, scale_update_method,
                                         float_lenet, digits_split, qat_lenet_factory, tmp_path):
    qat = qat_lenet_factory(float_lenet, digits_split, bits=bits,
                            feature_scale_stat_method=feature_scale_stat_method,
                            scale_update_method=scale_update_method)
    path = export_int8_onnx(qat, digits_split.x_test[:1], tmp_path / "model.onnx")

    check = check_artifact(path, qat, digits_split.test_loader())

    print(f"\n{bits}-bit {feature_scale_stat_method}/{scale_update_method}: {check}")
    assert check.samples == len(digits_split.y_test)
    assert check.agreement >= 0.999
    assert check.int8_acc > 0.9
    assert check.torch_acc > 0.9
