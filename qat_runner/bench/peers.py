"""Other QAT tools next to ours and torch.ao: NNCF and Brevitas (optional, the `bench` extra).

Each tool gets the float MobileNetV2 it is given and quantizes it by its own documented flow; the
bench then trains the result by the shared QAT recipe and exports it as that tool ships ONNX:

* NNCF (`nncf.quantize` with a calibration `nncf.Dataset`; 8-bit, NNCF's default preset:
  symmetric per-channel weights, per-tensor features; then ordinary PyTorch training, NNCF's QAT
  workflow). ONNX: `torch.onnx.export` (TorchScript exporter: NNCF's quantizers emit their ONNX form
  only when traced) with the quantizers in QuantizeLinear/DequantizeLinear export mode: a QDQ graph
  whose weights stay float initializers, as NNCF writes them.
* Brevitas (`brevitas.graph.quantize`: `preprocess_for_quantize`, which folds BatchNorm into the
  convolutions, ReLU6 kept; `quantize` with 8-bit per-channel weights (Int8WeightPerChannelFloat),
  8-bit features, int32 biases; `calibration_mode` over the calibration batches). ONNX:
  `brevitas.export.export_onnx_qcdq` (QCDQ: int8 weights, TorchScript exporter; its dynamo path
  refuses quantized biases).

Telemetry: NNCF sends usage telemetry through `openvino_telemetry` unless told not to (it asks no
consent when no consent file exists); `telemetry.disable()` runs before the first `import nncf`
(NNCF_CI=1, openvino_telemetry hidden from the process: see telemetry.py).

A tool that is not installed, fails to import next to this torch, or fails while quantizing,
training or exporting is reported as "unavailable: <reason>", never as a crash of the benchmark.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from . import telemetry

PEERS = ("nncf", "brevitas")
LABELS = {"nncf": "NNCF", "brevitas": "Brevitas"}
INSTALL_HINT = "pip install 'qat_runner[bench]'"
ONNX_OPSET = 17  # QuantizeLinear/DequantizeLinear per axis (13+); what both exporters handle
INPUT_NAME, OUTPUT_NAME = "input", "logits"  # as our artifact names them


def disable_nncf_telemetry() -> None:
    """NNCF's (and OpenVINO's) telemetry off for this process; call before `import nncf`."""
    telemetry.disable()
    # NNCF compiles its CPU kernels on first use (minutes on 2 cores) and gives up after 60 s
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "1200")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {name: _version(name) for name in PEERS}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".strip().rstrip(":")


@lru_cache(maxsize=None)
def _import(name: str):
    if name not in PEERS:
        raise ValueError(f"peer {name!r} is not known: use one of {', '.join(PEERS)}")
    if name == "nncf":
        disable_nncf_telemetry()
    with warnings.catch_warnings():  # brevitas: "fast_hadamard_transform package not found"
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


def unavailable(name: str) -> str | None:
    """None when `name` imports next to this torch, else "unavailable: <reason>"."""
    try:
        _import(name)
    except ModuleNotFoundError as err:
        if err.name is not None and err.name.split(".")[0] == name:
            return f"unavailable: {name} is not installed ({INSTALL_HINT})"
        return (f"unavailable: {name} {_version(name)} does not import with torch {torch.__version__}: "
                f"{_first_line(err)}")
    except Exception as err:  # a version conflict shows up here (ImportError, AttributeError, ...)
        return (f"unavailable: {name} {_version(name)} does not import with torch {torch.__version__}: "
                f"{_first_line(err)}")
    return None


def failure(name: str, stage: str, err: BaseException) -> str:
    """The "unavailable: <reason>" of a tool that imported but failed at `stage`."""
    return (f"unavailable: {name} {_version(name)} failed to {stage} with torch {torch.__version__}: "
            f"{_first_line(err)}")


# NNCF -------------------------------------------------------------------------------------------
def nncf_quantize(model: nn.Module, batches: list[torch.Tensor], device: torch.device | str = "cpu",
                  bias_correction: bool = True) -> nn.Module:
    """NNCF's QAT model of `model` (its ranges set on `batches`), in train mode on `device`.

    `bias_correction=False` skips NNCF's fast bias correction (a PTQ refinement of the biases that
    leaves the graph as it is): for the step-time contender, where only the graph matters.
    """
    nncf = _import("nncf")
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    device = torch.device(device)
    model = model.to(device).eval()
    dataset = nncf.Dataset([b.to(device) for b in batches])
    advanced = None if bias_correction else AdvancedQuantizationParameters(disable_bias_correction=True)
    with _quiet():
        quantized = nncf.quantize(model, dataset, subset_size=len(batches), advanced_parameters=advanced)
    return quantized.train()


def nncf_export(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """NNCF's QDQ ONNX of `model` (on the CPU, eval mode), dynamic batch."""
    _import("nncf")
    from nncf.torch.quantization.layers import BaseQuantizer, QuantizerExportMode

    model = model.cpu().eval()
    for module in model.modules():
        if isinstance(module, BaseQuantizer):
            module.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), torch.no_grad():
        torch.onnx.export(model, (_batch_of_two(example),), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return path


# Brevitas ---------------------------------------------------------------------------------------
def brevitas_quantize(model: nn.Module, batches: list[torch.Tensor], device: torch.device | str = "cpu",
                      bias_correction: bool = True) -> nn.Module:
    """Brevitas's QAT model of `model` (8-bit, per-channel weights, calibrated on `batches`);
    `bias_correction` is NNCF's option, without a counterpart in Brevitas's default flow."""
    _import("brevitas")
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.graph.quantize import COMPUTE_LAYER_MAP, preprocess_for_quantize, quantize
    from brevitas.quant import Int8WeightPerChannelFloat

    layer_map = dict(COMPUTE_LAYER_MAP)
    for layer in (nn.Conv2d, nn.Linear):
        quant_layer, kwargs = layer_map[layer]
        layer_map[layer] = (quant_layer, {**kwargs, "weight_quant": Int8WeightPerChannelFloat})
    device = torch.device(device)
    with _quiet():
        prepared = preprocess_for_quantize(model.cpu().eval(), relu6_to_relu=False)
        quantized = quantize(prepared, compute_layer_map=layer_map).to(device).eval()
        with torch.no_grad(), calibration_mode(quantized):
            for batch in batches:
                quantized(batch.to(device))
    return quantized.train()


def brevitas_export(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """Brevitas's QCDQ ONNX of `model` (on the CPU, eval mode), dynamic batch."""
    _import("brevitas")
    from brevitas.export import export_onnx_qcdq

    model = model.cpu().eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), torch.no_grad():
        export_onnx_qcdq(model, args=_batch_of_two(example), export_path=str(path), dynamo=False,
                         opset_version=ONNX_OPSET, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                         dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return path


# both -------------------------------------------------------------------------------------------
QUANTIZE = {"nncf": nncf_quantize, "brevitas": brevitas_quantize}
EXPORT = {"nncf": nncf_export, "brevitas": brevitas_export}
ARTIFACT_FORMAT = {"nncf": "onnx QDQ (float weights)", "brevitas": "onnx QCDQ"}


def quantize(name: str, model: nn.Module, batches: list[torch.Tensor], device: torch.device | str = "cpu",
             bias_correction: bool = True) -> nn.Module:
    return QUANTIZE[name](model, batches, device, bias_correction)


def export(name: str, model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    return EXPORT[name](model, example, path)


def _batch_of_two(example: torch.Tensor) -> torch.Tensor:
    """A batch of 2 on the CPU: the traced batch dimension stays symbolic (dynamic_axes)."""
    example = example[:2].detach().cpu()
    return example if example.shape[0] == 2 else example.expand(2, *example.shape[1:]).contiguous()


@contextlib.contextmanager
def _quiet():
    """The tools' deprecation and tracer warnings off (they would bury the benchmark's log)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
