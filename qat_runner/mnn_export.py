"""`model.int8.mnn`: the QAT model as a full-int8 MNN model, made by MNN's own converter.

MNN's deployment path for a model trained elsewhere is a float ONNX plus a compression-parameters
file (`mnn_compression`): the converter quantizes every Convolution whose output tensor the file
names, with the file's activation scales and zero points and weight scales, and keeps a float bias.
We give it:

- a float twin of the test-phase model (`float_twin`): BatchNorm folded, weights and biases the
  dequantized integers the test phase uses (so MNN's rounding of W / scale gives back our
  integers), each Linear written as a 1x1 convolution (MNN quantizes only convolutions; a Gemm
  stays float), feature quantizers dropped (MNN quantizes from the file);
- per convolution, its input and output quantizers' parameters in MNN's signed int8 form
  (`activation_params`) under the ONNX tensor names MNN matches: the output of the Relu/Clip
  it fuses into the convolution, or the convolution's own output.

The converter runs in a child process (it aborts the process on some inputs and prints to the
C stdout); its result is dumped to JSON and refused unless every quantized layer is an int8
convolution, so a float model never ships under the int8 name.

What MNN 3.6.1's int8 CPU runtime does, measured on x86 (see README):
- its conv kernels compute our grid exactly with q = round(x / s) + zp in [-128, 127], so a uint8
  feature ships as the same grid shifted by -128 (`activation_params`);
- its x86 build stores int8 features as uint8 (q + 128) but its int8 MaxPool compares them as
  signed bytes, so a pooling window that mixes codes below and above 0 returns the wrong one;
  and an Add fused with the ReLU after it clamps at code 0, not at the zero point. Features
  that pass through a MaxPool, or come out of Add+ReLU, are given codes in [0, 127] only.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
import torch
from torch import fx, nn
from torch.utils.data import DataLoader

from .engine.fake_quant import FEATURE_SCALE_FLOOR, FeatureQuantizer, _channel_view, weight_limit
from .engine.files import write_atomically
from .engine.integer_ops import IntegerOp
from .engine.mnn_quant import is_mnn_depthwise, mnn_alpha, mnn_depthwise_bias, mnn_requant_scale
from .engine.modules import QuantLayer, apply_activation, dequantized_bias
from .mnn_compression import ActivationParams, LayerParams, WeightParams, encode_pipeline

MNN_FILE = "model.int8.mnn"
INSTALL_HINT = "pip install 'qat_runner[mnn]'"
INPUT_NAME, OUTPUT_NAME = "input", "logits"
OPSET = 18  # the lowest opset torch's dynamo exporter writes; MNN 3.6.1 reads it
CONVERT_TIMEOUT_S = 600
INT8_CODES = (-128, 127)  # MNN's int8 tensors
NONNEGATIVE_CODES = (0, 127)  # where MNN's x86 int8 MaxPool and its fused Add+ReLU are right
# ONNX ops that move or select values without changing them: a tensor and its result share a grid.
GRID_PRESERVING_OPS = ("MaxPool", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
FUSED_ACTIVATIONS = ("Relu", "Clip")  # MNN's converter fuses these into the convolution before it


class MnnExportError(RuntimeError):
    """The MNN artifact cannot be made or is not what it claims to be (one line, the run FAILED)."""


def mnn_missing() -> bool:
    """True when MNN's Python package (runtime and converter) cannot be imported."""
    return any(importlib.util.find_spec(name) is None for name in ("MNN", "_tools"))


def missing_mnn_message() -> str:
    return f"export.mnn=true needs MNN's Python package, which is not installed: {INSTALL_HINT}"


# --------------------------------------------------------------------------------------------
# The float twin given to MNN's converter


class MnnConv(nn.Module):
    """One quantized layer as MNN's converter should see it: a float Conv2d holding the test
    phase's folded, dequantized weight and bias, then the layer's activation.

    A Linear becomes a 1x1 Conv2d on an N x C x 1 x 1 view of its 2-D input (flattened back after),
    because MNN's converter quantizes convolutions only.
    """

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        p = layer.integer_parameters()
        weight = p["weight"].float() * _channel_view(p["weight_scale"], p["weight"].dim())
        bias = dequantized_bias(p)
        self.from_linear = isinstance(layer.layer, nn.Linear)
        if self.from_linear:
            conv = nn.Conv2d(layer.layer.in_features, layer.layer.out_features, 1)
            weight = weight.reshape(*weight.shape, 1, 1)
        else:
            conv = copy.deepcopy(layer.layer)
        conv.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        conv.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.conv = conv
        self.activation = layer.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.from_linear:
            if x.dim() != 2:
                raise MnnExportError(f"a Linear on a {x.dim()}-D input cannot be written as a 1x1 "
                                     "convolution for MNN: only 2-D (N x features) inputs are")
            x = x.reshape(x.shape[0], x.shape[1], 1, 1)
        y = apply_activation(self.conv(x), self.activation)
        return y.flatten(1) if self.from_linear else y


def float_twin(qat_model: fx.GraphModule) -> fx.GraphModule:
    """A float copy of an eval-mode QAT model for MNN: layers as `MnnConv`, integer ops as their
    plain float op, feature quantizers removed. The QAT model is not modified."""
    model = copy.deepcopy(qat_model).eval()
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLayer):
            model.add_submodule(name, MnnConv(module))
        elif isinstance(module, IntegerOp):
            model.add_submodule(name, module.plain())
    for name, module in list(model.named_modules()):
        if isinstance(module, FeatureQuantizer):
            model.add_submodule(name, nn.Identity())
    model.recompile()
    return model.eval()


def export_twin_onnx(twin: nn.Module, example_input: torch.Tensor) -> onnx.ModelProto:
    """torch's dynamo ONNX export with a dynamic batch; parameters keep their module names."""
    if example_input.shape[0] < 2:  # a batch of 1 would be specialised by torch.export
        example_input = example_input.expand(2, *example_input.shape[1:]).contiguous()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            twin, (example_input.detach().cpu(),), dynamo=True, opset_version=OPSET, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},))
    return program.model_proto


# --------------------------------------------------------------------------------------------
# Compression parameters


def activation_params(name: str, quantizer: FeatureQuantizer, nonnegative_codes: bool = False,
                      nonnegative: bool = False) -> ActivationParams:
    """Our feature quantizer in MNN's int8 convention, `q = round(x / scale) + zero_point`
    clamped to [clamp_min, clamp_max] within [-128, 127] (MNN's CPUCastCreator::cast and its
    conv kernels use the same sign as ours).

    The grid is kept exactly where MNN's codes can hold it: a uint8 [0, 255] quantizer moves by
    -128 (same scale, zero point - 128); a signed one (symmetric int8, or MNN's own [-127, 127]
    scheme) keeps its scale, zero point and clamp as they are.

    `nonnegative_codes`: the feature must use codes in [0, 127] only, where MNN 3.6.1 computes
    it wrongly otherwise (`compression_layers`). It keeps our grid where the codes it uses fit
    (`nonnegative`, a ReLU output, uses only codes from its zero point up, so a ReLU output of
    symmetric features fits; so do feature_bits <= 7), else it is re-gridded over its range at
    127 steps; a nonnegative feature then has zero point 0.
    """
    if quantizer.per_channel:
        raise MnnExportError(f"{name}: MNN's int8 tensors take one scale; per-channel features "
                             "(quant.feature_scale_stat_method=PerChannel) cannot be exported")
    low, high = (NONNEGATIVE_CODES if nonnegative_codes else INT8_CODES)
    zero_point = int(quantizer.zero_point)
    q_min = max(quantizer.quant_min, zero_point) if nonnegative else quantizer.quant_min
    q_max = quantizer.quant_max
    if q_max - q_min <= high - low:  # the codes used fit: shift them, keep scale and zero point
        offset = low - q_min if (q_min < low or q_max > high) else 0
        return ActivationParams(name, float(quantizer.scale), zero_point + offset, q_min + offset, q_max + offset)
    lo, hi = (0.0 if nonnegative else float(quantizer.running_min)), float(quantizer.running_max)
    scale = max((hi - lo) / (high - low), FEATURE_SCALE_FLOOR)
    zero_point = low - round(lo / scale)
    return ActivationParams(name, scale, int(np.clip(zero_point, low, high)), low, high)


def weight_params(name: str, layer: QuantLayer) -> WeightParams:
    """Our per-channel weight scales (of the BN-folded weight) and [-L, L]: MNN's converter
    divides the twin's weights, which are integers times these scales, by them again."""
    scales = layer.integer_parameters()["weight_scale"]
    limit = weight_limit(layer.bits)
    return WeightParams(name, tuple(float(s) for s in scales), -limit, limit, layer.bits)


@dataclass(frozen=True)
class ConvSite:
    """Where one quantized layer sits in the twin's ONNX graph, by MNN's tensor names."""

    layer: QuantLayer
    input: str
    weight: str
    output: str  # the fused activation's output, where there is one


def conv_sites(proto: onnx.ModelProto, layers: dict[str, QuantLayer]) -> list[ConvSite]:
    """The Conv of each quantized layer in the twin's graph, found by its weight's name
    (`<path>.conv.weight`); every quantized layer must have one."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    by_weight = {f"{path}.conv.weight": path for path in layers}
    sites = []
    for node in proto.graph.node:
        if node.op_type != "Conv" or node.input[1] not in by_weight:
            continue  # a layer left float (quant.layers) stays a float convolution
        output = node.output[0]
        users = consumers.get(output, [])
        if len(users) == 1 and users[0].op_type in FUSED_ACTIVATIONS:
            output = users[0].output[0]
        sites.append(ConvSite(layers[by_weight[node.input[1]]], node.input[0], node.input[1], output))
    missing = sorted(set(layers) - {by_weight[s.weight] for s in sites})
    if missing:
        raise MnnExportError(f"the float twin's ONNX graph has no Conv with the weight of layer(s) "
                             f"{', '.join(missing)}: cannot write their MNN parameters")
    return sites


def tensor_quantizers(proto: onnx.ModelProto, sites: list[ConvSite]) -> dict[str, FeatureQuantizer]:
    """The quantizer of every tensor on a quantized grid: each conv's input and output, and the
    tensors that share their grid through MaxPool and reshapes (in either direction)."""
    quantizer_of: dict[str, FeatureQuantizer] = {}
    for site in sites:
        quantizer_of.setdefault(site.input, site.layer.input_quant)
        quantizer_of.setdefault(site.output, site.layer.output_quant)
    changed = True
    while changed:
        changed = False
        for node in proto.graph.node:
            if node.op_type not in GRID_PRESERVING_OPS:
                continue
            a, b = node.input[0], node.output[0]
            if (a in quantizer_of) != (b in quantizer_of):
                known = quantizer_of[a] if a in quantizer_of else quantizer_of[b]
                quantizer_of[a] = quantizer_of[b] = known
                changed = True
    return quantizer_of


def compression_layers(proto: onnx.ModelProto, layers: dict[str, QuantLayer]) -> list[LayerParams]:
    """MNN's per-layer parameters for the twin's graph `proto`.

    Two kinds of features get codes in [0, 127] only (`activation_params`), for what MNN 3.6.1's
    CPU runtime does with int8 tensors:
    - a MaxPool's: x86 builds store int8 features as uint8 (q + 128, `_SSE_MNNFloat2Int8`) but
      the int8 MaxPool (`MNNMaxPoolInt8_`, x86_x64/FunctionDispatcher.cpp) compares them as
      signed bytes, so a window mixing codes below and above 0 returns the wrong one;
    - an Add followed by ReLU: the converter fuses them into a BinaryOp whose int8 kernel
      (CPUBinaryInt8) clamps at code 0, not at the zero point, so the zero point must be 0.
    """
    sites = conv_sites(proto, layers)
    quantizer_of = tensor_quantizers(proto, sites)
    producer = {out: node for node in proto.graph.node for out in node.output}
    pooled = {n.input[0] for n in proto.graph.node if n.op_type == "MaxPool"}
    relus = [n for n in proto.graph.node if n.op_type == "Relu"]
    after_add = {n.output[0] for n in relus if getattr(producer.get(n.input[0]), "op_type", "") in ("Add", "Sum")}
    one_sign = {id(quantizer_of[name]) for name in pooled | after_add if name in quantizer_of}
    nonnegative = ({id(s.layer.output_quant) for s in sites if s.layer.activation is not None}
                   | {id(quantizer_of[n.output[0]]) for n in relus if n.output[0] in quantizer_of})

    def params(name: str, quantizer: FeatureQuantizer | None) -> ActivationParams:
        if quantizer is None:
            raise MnnExportError(f"tensor {name!r} feeds a quantized layer but has no quantizer")
        return activation_params(name, quantizer, id(quantizer) in one_sign, id(quantizer) in nonnegative)

    return [LayerParams(params(s.input, s.layer.input_quant), weight_params(s.weight, s.layer),
                        params(s.output, s.layer.output_quant)) for s in sites]


def mnn_float_bias(layer: QuantLayer, params: LayerParams) -> np.ndarray:
    """The float bias to give MNN's converter for a depthwise `layer` so that MNN's int32 bias is
    `mnn_depthwise_bias` (rounded, as the test phase uses), not MNN's truncation of the true
    bias: MNN computes `trunc(b / (s_in * alpha)) + trunc(zp_out / scale)` in float32, so b is put
    in the middle of the unit interval that truncates to the integer we want."""
    p = layer.integer_parameters()
    input_scale = torch.tensor(params.input.scale, dtype=torch.float32)
    output_scale = torch.tensor(params.output.scale, dtype=torch.float32)
    zero_point = params.output.zero_point
    scale = mnn_requant_scale(p["weight_scale"], input_scale, output_scale)
    target = mnn_depthwise_bias(dequantized_bias(p), p["weight_scale"], input_scale, scale, zero_point)
    unit = input_scale * mnn_alpha(p["weight_scale"])
    wanted = target - torch.trunc(torch.tensor(float(zero_point)) / scale)
    bias = ((wanted.double() + 0.5 * torch.sign(wanted.double())) * unit.double()).float()
    if not torch.equal(torch.trunc(bias / unit), wanted):  # as MNN will compute it
        raise MnnExportError(f"{params.output.name}: no float32 bias gives MNN's int32 bias exactly")
    return bias.numpy()


def set_mnn_biases(proto: onnx.ModelProto, layers: dict[str, QuantLayer], params: list[LayerParams]) -> None:
    """Replace each depthwise Conv's bias initializer in the twin's graph by `mnn_float_bias`
    (MNN's other int8 convolutions use the float bias as it is)."""
    sites = conv_sites(proto, layers)
    bias_of = {node.input[1]: node.input[2] for node in proto.graph.node
               if node.op_type == "Conv" and len(node.input) > 2}
    initializers = {init.name: init for init in proto.graph.initializer}
    for site, layer_params in zip(sites, params, strict=True):
        if not is_mnn_depthwise(site.layer.layer):
            continue
        init = initializers.get(bias_of.get(site.weight, ""))
        if init is None:
            raise MnnExportError(f"the float twin's Conv of {site.weight} has no bias initializer")
        init.CopyFrom(numpy_helper.from_array(mnn_float_bias(site.layer, layer_params), init.name))


# --------------------------------------------------------------------------------------------
# MNN's converter, in a child process


_CONVERTER = """
import sys, _tools
onnx_path, params_path, mnn_path, json_path = sys.argv[1:]
_tools.mnnconvert(["mnnconvert", "-f", "ONNX", "--modelFile", onnx_path, "--MNNModel", mnn_path,
                   "--bizCode", "qat_runner", "--compressionParamsFile", params_path])
_tools.mnnconvert(["mnnconvert", "-f", "MNN", "--modelFile", mnn_path, "--JsonFile", json_path])
"""


def run_converter(onnx_path: Path, params_path: Path, mnn_path: Path, json_path: Path) -> None:
    """MNN's converter (its `_tools` module, not the `mnnconvert` script, which posts usage
    data), then its MNN-to-JSON dump of the result; raises MnnExportError with its output tail."""
    args = [sys.executable, "-c", _CONVERTER, str(onnx_path), str(params_path), str(mnn_path), str(json_path)]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise MnnExportError(f"MNN's converter did not finish in {CONVERT_TIMEOUT_S} s") from None
    if proc.returncode != 0 or not mnn_path.is_file() or not json_path.is_file():
        tail = " | ".join(line.strip() for line in (proc.stdout + proc.stderr).splitlines()[-4:])
        raise MnnExportError(f"MNN's converter failed (exit {proc.returncode}): {tail or 'no output'}")


def int8_conv_outputs(net: dict) -> set[str]:
    """Output tensor names of the int8 convolutions of an MNN model dumped to JSON: quantized
    weights (`quanParameter.buffer`), no float weights, int8 input/output parameters."""
    names = net.get("tensorName", [])
    found = set()
    for op in net.get("oplists", []):
        main = op.get("main") or {}
        if (op.get("type") in ("Convolution", "ConvolutionDepthwise") and not main.get("weight")
                and (main.get("quanParameter") or {}).get("buffer") and main.get("symmetricQuan")):
            found.add(names[op["outputIndexes"][0]])
    return found


def check_full_int8(json_path: Path, layers: list[LayerParams]) -> None:
    """Refuse a converted model in which a layer we gave parameters for is not an int8 convolution
    (the converter quietly leaves a layer whose output name it does not find in float)."""
    int8 = int8_conv_outputs(json.loads(json_path.read_text()))
    missing = [p.output.name for p in layers if p.output.name not in int8]
    if missing:
        raise MnnExportError(
            f"MNN's converter left {len(missing)} of {len(layers)} quantized layers in float (outputs "
            f"{', '.join(missing)}): its tensor names did not match the compression parameters; "
            "no MNN artifact written")


def export_int8_mnn(qat_model: fx.GraphModule, example_input: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write the full-int8 MNN model of an eval-mode QAT model to `path` (atomically); returns it."""
    if mnn_missing():
        raise MnnExportError(missing_mnn_message())
    layers = {name: m for name, m in qat_model.named_modules() if isinstance(m, QuantLayer)}
    if not layers:
        raise MnnExportError("the model has no quantized layer: pass the result of turn_quantize")
    qat_model.eval()
    proto = export_twin_onnx(float_twin(qat_model), example_input)
    params = compression_layers(proto, layers)
    set_mnn_biases(proto, layers, params)
    with tempfile.TemporaryDirectory(prefix="qat_mnn_") as tmp:
        work = Path(tmp)
        onnx.save(proto, work / "float_twin.onnx")
        (work / "compression.bin").write_bytes(encode_pipeline(params))
        converted, dumped = work / "model.mnn", work / "model.json"
        run_converter(work / "float_twin.onnx", work / "compression.bin", converted, dumped)
        check_full_int8(dumped, params)
        return write_atomically(path, lambda target: shutil.copyfile(converted, target))


# --------------------------------------------------------------------------------------------
# The artifact in MNN's runtime


@contextlib.contextmanager
def _c_stdout_silenced():
    """Send the C-level stdout to /dev/null: MNN prints its CPU features on import."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            try:
                yield
            finally:
                with contextlib.suppress(OSError, AttributeError):
                    ctypes.CDLL(None).fflush(None)  # C buffers, before fd 1 is restored
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def import_mnn():
    """MNN's Python runtime, imported quietly."""
    with _c_stdout_silenced():
        import MNN
    return MNN


@dataclass(frozen=True)
class MnnCheck:
    mnn_acc: float  # the .mnn in MNN's runtime
    agreement: float  # fraction of samples where it predicts what the test-phase model predicts
    samples: int


def _logits(output, mnn) -> np.ndarray:
    if isinstance(output, (list, tuple)):
        output = output[0]
    if output.data_format == mnn.expr.NC4HW4:
        output = mnn.expr.convert(output, mnn.expr.NCHW)
    return np.asarray(output.read(), dtype=np.float32)


@torch.no_grad()
def check_mnn_artifact(path: str | os.PathLike, model: nn.Module, loader: DataLoader) -> MnnCheck:
    """Run `loader` through the .mnn (MNN's module API, CPU) and through `model` (eval mode)."""
    mnn = import_mnn()
    module = mnn.nn.load_module_from_file(str(path), [INPUT_NAME], [OUTPUT_NAME])
    device = next(model.parameters()).device
    model.eval()
    hits = agree = total = 0
    for inputs, targets in loader:
        x = np.ascontiguousarray(inputs.numpy(), dtype=np.float32)
        logits = _logits(module.forward(mnn.expr.const(x, list(x.shape), mnn.expr.NCHW)), mnn)
        predicted = logits.reshape(len(x), -1).argmax(axis=1)
        reference = model(inputs.to(device)).argmax(dim=1).cpu().numpy()
        hits += int((predicted == targets.numpy()).sum())
        agree += int((predicted == reference).sum())
        total += len(x)
    if total == 0:
        raise ValueError("check_mnn_artifact got an empty loader")
    return MnnCheck(hits / total, agree / total, total)
