"""The QAT engine: plain PyTorch, no Hydra, no MLflow. Usable as a library on its own.

    qat = turn_quantize(model, bits=8)      # a QAT copy of the model
    ...train qat...                         # fake-quant weights and features, BN on batch stats
    qat.eval()                              # test phase: BN folded, integer arithmetic
"""
from .calibrate import calibrate
from .config import FeatureScaleStatMethod, QuantConfig, ScaleUpdateMethod
from .fake_quant import FeatureQuantizer, fake_quantize_weight, quantize_weight, weight_scale
from .modules import QuantConv2d, QuantLayer, QuantLinear
from .report import LayerReport, format_report, quantization_report
from .transform import turn_quantize

__all__ = [
    "FeatureQuantizer", "FeatureScaleStatMethod", "LayerReport", "QuantConfig", "QuantConv2d",
    "QuantLayer", "QuantLinear", "ScaleUpdateMethod", "calibrate", "fake_quantize_weight",
    "format_report", "quantization_report", "quantize_weight", "turn_quantize", "weight_scale",
]
