"""ONNX export: the int8 artifact (QDQ form with integer weight initializers) and the float twin.

The int8 file is the frozen integer model (`to_integer_model`) exported by torch's ONNX
exporter. Weights are INT8 initializers with per-channel scales, biases INT32 on the
input*weight scale, activations Q/DQ pairs with the running scales and zero points from
training. For bits <= 4 the weight initializers are repacked as INT4 (two per byte, opset 21).
Then the file is compacted (`_compact`): zero points that are 0 by default dropped, short names.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import fx, nn

from .files import write_atomically
from .integer import to_integer_model
from .modules import QuantLayer

OPSET = 21  # DequantizeLinear with INT4 inputs needs opset 21
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def _export_proto(model: nn.Module, example_input: torch.Tensor) -> onnx.ModelProto:
    """torch.onnx (dynamo) export with a dynamic batch dimension."""
    if example_input.shape[0] < 2:  # a batch of 1 would be specialised by torch.export
        example_input = example_input.expand(2, *example_input.shape[1:]).contiguous()
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(), (example_input,), dynamo=True, opset_version=OPSET, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},))
    proto = program.model_proto
    _integer_global_average_pools(proto)  # needs the exporter's shapes, dropped next
    _strip_debug_info(proto)
    _derive_bias_scales(proto)
    return proto


def _constant_values(proto: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of an initializer or Constant-node output, else None."""
    for init in proto.graph.initializer:
        if init.name == name:
            return onnx.numpy_helper.to_array(init)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            value = node.attribute[0]
            return onnx.numpy_helper.to_array(value.t) if value.type == onnx.AttributeProto.TENSOR else None
    return None


def _rank(proto: onnx.ModelProto, name: str) -> int | None:
    for info in [*proto.graph.value_info, *proto.graph.input]:
        if info.name == name and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    return None


def _integer_global_average_pools(proto: onnx.ModelProto) -> int:
    """Write ReduceMean over H, W (keepdims) of a per-tensor-dequantized 4-D tensor, quantized
    after, as GlobalAveragePool.

    torch exports `adaptive_avg_pool2d(x, 1)` as ReduceMean, which onnxruntime runs in float. As
    GlobalAveragePool (the same mean), DQ -> GlobalAveragePool -> Q fuses into the integer
    QLinearGlobalAveragePool, which the test phase computes (`integer_ops.QuantGlobalAvgPool`).
    Returns the number of nodes rewritten.
    """
    producer = {out: n for n in proto.graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def quantized_after(name: str) -> bool:  # through reshapes only, as `integer_ops` requires
        users = consumers.get(name, [])
        while len(users) == 1 and users[0].op_type in ("Reshape", "Flatten", "Squeeze", "Identity", "Dropout"):
            users = consumers.get(users[0].output[0], [])
        return len(users) == 1 and users[0].op_type == "QuantizeLinear"

    rewritten = 0
    for node in proto.graph.node:
        if node.op_type != "ReduceMean" or len(node.input) != 2 or not quantized_after(node.output[0]):
            continue
        dq = producer.get(node.input[0])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axes = _constant_values(proto, node.input[1])
        if (dq is None or dq.op_type != "DequantizeLinear" or attrs.get("keepdims", 1) != 1
                or attrs.get("noop_with_empty_axes", 0) != 0 or axes is None
                or _rank(proto, node.input[0]) != 4 or sorted(int(a) % 4 for a in axes.ravel()) != [2, 3]):
            continue
        scale = _constant_values(proto, dq.input[1])
        if scale is None or scale.size != 1:
            continue  # per-channel input: no integer kernel
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]
        rewritten += 1
    return rewritten


def _strip_debug_info(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and shape annotations (about 400 kB for
    MobileNetV2, 15% of an int8 file); onnxruntime infers shapes itself."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del proto.graph.value_info[:]


def _derive_bias_scales(proto: onnx.ModelProto) -> None:
    """Replace each stored int32-bias scale by Mul(input scale, weight scales).

    The bias scale is by definition input_scale * weight_scale; storing it again costs 4 bytes
    per output channel (0.8% of an int8 MobileNetV2). onnxruntime folds the Mul of two
    constants when it loads the model, before its QDQ fusions look at the bias.
    """
    producer = {out: n for n in proto.graph.node for out in n.output}
    inits = {i.name: i for i in proto.graph.initializer}
    uses: dict[str, int] = {}
    for n in proto.graph.node:
        for name in n.input:
            uses[name] = uses.get(name, 0) + 1
    new_nodes, dropped = [], set()
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            continue
        x_dq, w_dq, b_dq = (producer.get(name) for name in node.input[:3])
        if not all(d is not None and d.op_type == "DequantizeLinear" for d in (x_dq, w_dq, b_dq)):
            continue
        bias_scale = b_dq.input[1]
        if bias_scale not in inits or uses[bias_scale] != 1 or inits[bias_scale].data_type != onnx.TensorProto.FLOAT:
            continue
        expected = onnx.numpy_helper.to_array(inits[x_dq.input[1]]) * onnx.numpy_helper.to_array(inits[w_dq.input[1]])
        if not np.array_equal(expected.astype(np.float32), onnx.numpy_helper.to_array(inits[bias_scale])):
            continue  # not the plain product (float rounding differed): keep the stored one
        new_nodes.append(onnx.helper.make_node("Mul", [x_dq.input[1], w_dq.input[1]], [bias_scale],
                                               name=f"{bias_scale}_from_scales"))
        dropped.add(bias_scale)
    kept = [i for i in proto.graph.initializer if i.name not in dropped]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    # Mul nodes go first: their inputs are initializers, so the graph stays topologically sorted.
    nodes = new_nodes + list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def _drop_constant_zero_points(proto: onnx.ModelProto) -> int:
    """Drop the all-zero zero point of each DequantizeLinear of a constant (weights, biases).

    The zero point is an optional input of DequantizeLinear, 0 when absent, of the type of `x`
    (so leaving it out changes no type). The exporter stores per-channel vectors of zeros for
    the INT8 weights and INT32 biases (one per width: about 22 kB in MobileNetV2). onnxruntime fuses a Conv
    without them, but its QGemm fusion needs the weight's zero point, so a Gemm/MatMul weight
    keeps it. Activation zero points (scalars, and they type the QuantizeLinear output) stay.
    Returns the number of inputs dropped.
    """
    inits = {i.name: i for i in proto.graph.initializer}
    matmul_weights = {n.input[1] for n in proto.graph.node if n.op_type in ("Gemm", "MatMul")}
    dropped = 0
    for node in proto.graph.node:
        if (node.op_type != "DequantizeLinear" or len(node.input) < 3 or node.input[0] not in inits
                or node.output[0] in matmul_weights):
            continue
        zero_point = inits.get(node.input[2])
        if zero_point is not None and not onnx.numpy_helper.to_array(zero_point).any():
            del node.input[2]
            dropped += 1
    return dropped


def _drop_unused_initializers(proto: onnx.ModelProto) -> None:
    """Remove initializers no node reads: zero points dropped above, and the exporter leaves one."""
    used = {name for n in proto.graph.node for name in n.input}
    kept = [i for i in proto.graph.initializer if i.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)


def _short_names():
    """a..Z, then a0..Z9 and so on: names that start with a letter, as short as they can be."""
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    digits = "0123456789" + letters
    k = 0
    while True:
        name, rest = letters[k % len(letters)], k // len(letters)
        while rest:
            rest, d = divmod(rest - 1, len(digits))
            name += digits[d]
        yield name
        k += 1


def _shorten_names(proto: onnx.ModelProto) -> None:
    """Rename intermediate tensors and constants to one- or two-character names; unname nodes.

    The exporter's names ("val_123", "node_dequantize_per_tensor_12") are written once per
    definition and once per use: about 27 kB of a MobileNetV2 artifact (1.1%); node names are
    optional in ONNX. Kept: the graph's input and output names (the artifact's interface) and
    the weight initializers' names (3 kB), which say which layer of the model each weight is.
    """
    graph = proto.graph
    kept = {v.name for v in [*graph.input, *graph.output]}
    kept |= {n.input[0] for n in weight_dequantize_nodes(proto)}
    fresh = (name for name in _short_names() if name not in kept)
    renamed: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in kept:  # "" marks an omitted optional input
            return name
        if name not in renamed:
            renamed[name] = next(fresh)
        return renamed[name]

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.name = ""
        for k, name in enumerate(node.input):
            node.input[k] = short(name)
        for k, name in enumerate(node.output):
            node.output[k] = short(name)


def _strip_graph_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's torch.export bookkeeping on the graph's input and output."""
    for value in [*proto.graph.input, *proto.graph.output]:
        del value.metadata_props[:]
        value.doc_string = ""


def _compact(proto: onnx.ModelProto) -> None:
    """Shrink the artifact without changing what onnxruntime computes or which kernels it fuses
    (MobileNetV2: 2.0% smaller, from 27.4% to 26.8% of the float ONNX). Identical constants need
    no sharing step: the exporter already stores each distinct value once."""
    _drop_constant_zero_points(proto)
    _drop_unused_initializers(proto)
    _shorten_names(proto)
    _strip_graph_metadata(proto)


def _save_atomically(proto: onnx.ModelProto, path: str | os.PathLike) -> Path:
    return write_atomically(path, lambda tmp: onnx.save(proto, tmp))


def weight_dequantize_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """DequantizeLinear nodes whose input is an INT8/INT4 initializer: the quantized weights."""
    types = {i.name: i.data_type for i in proto.graph.initializer}
    return [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
            and types.get(n.input[0]) in (onnx.TensorProto.INT8, onnx.TensorProto.INT4)]


def _int4_bytes(array: np.ndarray) -> bytes:
    """Two signed 4-bit values per byte, low nibble first (ONNX's INT4 raw layout)."""
    flat = array.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    return ((flat[0::2] & 0x0F) | ((flat[1::2] & 0x0F) << 4)).astype(np.uint8).tobytes()


def _fits_int4(array: np.ndarray) -> bool:
    return not array.size or (array.min() >= -8 and array.max() <= 7)


def _pack_int4(proto: onnx.ModelProto) -> int:
    """Repack as INT4 each INT8 weight initializer whose values fit [-8, 7], with its zero point.

    With per-layer bits (quant.layers) only the layers at 4 bits or fewer fit; their 8-bit
    neighbours stay INT8. Returns the number of weight tensors repacked.
    """
    inits = {i.name: i for i in proto.graph.initializer}
    nodes = [n for n in weight_dequantize_nodes(proto) if _fits_int4(onnx.numpy_helper.to_array(inits[n.input[0]]))]
    for node in nodes:  # an all-zero zero point is optional (0 of the weight's type), and the
        # exporter shares one between layers of equal width, 8-bit ones included: leave it out
        if len(node.input) > 2 and not onnx.numpy_helper.to_array(inits[node.input[2]]).any():
            del node.input[2]
    names = {n.input[0] for n in nodes} | {n.input[2] for n in nodes if len(n.input) > 2}
    users = [n for n in proto.graph.node if n not in nodes]
    if any(name in u.input for u in users for name in names):
        raise RuntimeError("an INT8 weight initializer is shared with another node; cannot pack as INT4")
    for name in names:
        array = onnx.numpy_helper.to_array(inits[name])
        inits[name].CopyFrom(onnx.helper.make_tensor(
            name, onnx.TensorProto.INT4, array.shape, _int4_bytes(array), raw=True))
    return len(nodes)


def _weight_bits(model: nn.Module) -> int:
    """The smallest weight bit width of the model's quantized layers."""
    bits = {m.bits for m in model.modules() if isinstance(m, QuantLayer)}
    if not bits:
        raise ValueError("the model has no quantized layer: pass the result of turn_quantize")
    return min(bits)


def export_int8_onnx(qat_model: fx.GraphModule, example_input: torch.Tensor,
                     path: str | os.PathLike) -> Path:
    """Write the int8 artifact of a QAT model (from `turn_quantize`) to `path`; returns the path.

    `example_input` fixes every dimension but the batch, which stays dynamic. The QAT model is
    not modified. The file is written atomically.
    """
    bits = _weight_bits(qat_model)
    proto = _export_proto(to_integer_model(qat_model), example_input.detach().cpu())
    if bits <= 4:
        _pack_int4(proto)
    _compact(proto)
    return _save_atomically(proto, path)


def export_float_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write the float model (eval mode) as ONNX, the size reference for the int8 artifact."""
    was_training = model.training
    try:
        proto = _export_proto(model, example_input.detach().cpu())
    finally:
        model.train(was_training)
    return _save_atomically(proto, path)
