"""onnxruntime's own static quantization of a float ONNX model: the tool users reach for first.

QDQ format, per-channel int8 weights, uint8 activations, MinMax calibration on the same images
our PTQ sees. `quant_pre_process` (shape inference and onnxruntime's graph optimizations, which
fold BatchNorm into Conv) runs first, as onnxruntime's documentation recommends.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

SETTINGS = {"quant_format": "QDQ", "per_channel": True, "activation_type": "QUInt8",
            "weight_type": "QInt8", "calibrate_method": "MinMax", "pre_process": True}


class TensorReader(CalibrationDataReader):
    """Feeds calibration batches (torch tensors) to onnxruntime's calibrator."""

    def __init__(self, input_name: str, batches: list[torch.Tensor]) -> None:
        self.input_name = input_name
        self._items = iter([{input_name: b.numpy().astype(np.float32)} for b in batches])

    def get_next(self) -> dict | None:
        return next(self._items, None)


def quantize_with_onnxruntime(float_path: str | os.PathLike, out_path: str | os.PathLike,
                              batches: list[torch.Tensor], input_name: str = "input") -> Path:
    """Write onnxruntime's int8 QDQ artifact of `float_path` to `out_path`."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared))
        quantize_static(str(prepared), str(out_path), TensorReader(input_name, batches),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out_path
