"""The QAT engine: plain PyTorch, no Hydra, no MLflow. Usable as a library on its own.

    qat = turn_quantize(model, QuantConfig(bits=4))   # a QAT copy (or turn_quantize(model, bits=4))
    ...train qat...                                   # fake-quant weights and features, BN on batch stats
    qat.eval()                                        # test phase: BN folded, integer arithmetic
    export_int8_onnx(qat, example, "model.int8.onnx") # the int8 artifact (ONNX QDQ)
"""
from .calibrate import calibrate
from .export import export_float_onnx, export_int8_onnx
from .config import FeatureScaleStatMethod, QuantConfig, QuantScheme, ScaleUpdateMethod
from .fake_quant import FeatureQuantizer, fake_quantize_weight, quantize_weight, weight_scale
from .integer import to_integer_model
from .mnn_quant import MnnFeatureQuantizer
from .modules import QuantConv2d, QuantLayer, QuantLinear, freeze_bn_stats
from .report import LayerReport, format_report, quantization_report
from .transform import check_quantizable, turn_quantize

__all__ = [
    "FeatureQuantizer", "FeatureScaleStatMethod", "LayerReport", "MnnFeatureQuantizer", "QuantConfig",
    "QuantConv2d", "QuantLayer", "QuantLinear", "QuantScheme", "ScaleUpdateMethod", "calibrate", "check_quantizable",
    "fake_quantize_weight", "freeze_bn_stats",
    "export_float_onnx", "export_int8_onnx", "format_report", "quantization_report", "quantize_weight",
    "to_integer_model", "turn_quantize", "weight_scale",
]
