"""The int8 ONNX artifact: integer kernels in onnxruntime, integer-only weights, INT4 packing,
dynamic batch, file size against the float ONNX (and the compaction that gets it there), and
an export that changes nothing it reads."""
from __future__ import annotations

import collections
import copy
import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from helpers.models import torchvision_with_bn_statistics
from qat_runner.artifact import (
    INTEGER_KERNELS,
    check_artifact,
    integer_kernel_count,
    runtime_op_counts,
    session,
)
from qat_runner.engine import QuantLayer, calibrate, quantization_report, turn_quantize
from qat_runner.engine import export as export_module
from qat_runner.engine.export import OPSET, export_float_onnx, export_int8_onnx, weight_dequantize_nodes

CONV_KERNELS = ("QLinearConv", "ConvInteger")
MATMUL_KERNELS = ("QLinearMatMul", "QGemm", "MatMulInteger")
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


# --------------------------------------------------------------------------------------------
# helpers


def quantized_rows(model: nn.Module):
    rows = [r for r in quantization_report(model) if r.weight_bits is not None]
    assert rows, "the model has no quantized layer: the test would prove nothing"
    return rows


def optimized_op_counts(path: Path, tmp_dir: Path) -> collections.Counter:
    """Op types of the graph onnxruntime runs, saved via SessionOptions.optimized_model_filepath."""
    optimized = tmp_dir / f"{path.stem}.optimized.onnx"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)


def assert_integer_kernels(path: Path, model: nn.Module, tmp_dir: Path) -> collections.Counter:
    rows = quantized_rows(model)
    counts = optimized_op_counts(path, tmp_dir)
    n_conv = sum(r.kind.startswith("Conv2d") for r in rows)
    n_linear = sum(r.kind.startswith("Linear") for r in rows)
    assert n_conv + n_linear == len(rows)
    assert sum(counts[k] for k in INTEGER_KERNELS) == len(rows), counts
    assert sum(counts[k] for k in CONV_KERNELS) == n_conv, counts
    assert sum(counts[k] for k in MATMUL_KERNELS) == n_linear, counts
    assert counts["Conv"] == 0 and counts["Gemm"] == 0 and counts["MatMul"] == 0, counts
    # the library's own counters see the same graph
    assert integer_kernel_count(path) == len(rows)
    assert runtime_op_counts(path) == counts
    return counts


def dequantized_weights(proto: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Weight initializer name -> (integers * scales, half a quantization step), from the file."""
    inits = {i.name: i for i in proto.graph.initializer}
    out = {}
    for node in weight_dequantize_nodes(proto):
        q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        if scale.ndim:
            shape[axis % q.ndim] = -1
        scale = scale.reshape(shape)
        out[node.input[0]] = (q * scale, np.broadcast_to(0.5 * scale, q.shape) * (1 + 1e-5) + 1e-12)
    return out


def float_twins(proto: onnx.ModelProto, dequantized: dict) -> set[str]:
    """Quantized weights (by name) that have a float initializer within half a step of their values."""
    found = set()
    for init in proto.graph.initializer:
        if init.data_type not in FLOAT_TYPES:
            continue
        values = numpy_helper.to_array(init).astype(np.float64)
        for name, (deq, tol) in dequantized.items():
            if values.size == deq.size and np.all(np.abs(values.reshape(deq.shape) - deq) <= tol):
                found.add(name)
    return found


def float_shapes(proto: onnx.ModelProto) -> set[tuple[int, ...]]:
    return {tuple(i.dims) for i in proto.graph.initializer if i.data_type in FLOAT_TYPES}


def assert_integer_weights_only(proto: onnx.ModelProto, model: nn.Module, bits: int) -> None:
    """Every quantized layer's weight is one INT8/INT4 initializer; no float copy of it exists."""
    rows = quantized_rows(model)
    expected_type = TensorProto.INT4 if bits <= 4 else TensorProto.INT8
    inits = {i.name: i for i in proto.graph.initializer}
    weight_inits = [inits[n.input[0]] for n in weight_dequantize_nodes(proto)]
    assert sorted(tuple(i.dims) for i in weight_inits) == sorted(r.weight_shape for r in rows)
    assert all(i.data_type == expected_type for i in weight_inits), \
        [(i.name, TensorProto.DataType.Name(i.data_type)) for i in weight_inits]
    # no float initializer has a quantized weight's shape ...
    quantized_shapes = {r.weight_shape for r in rows}
    assert not float_shapes(proto) & quantized_shapes
    # ... nor (in any shape) a quantized weight's values
    assert float_twins(proto, dequantized_weights(proto)) == set()


def assert_batch_dim_dynamic(path: Path) -> None:
    proto = onnx.load(str(path))
    assert len(proto.graph.input) == 1
    first_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert first_dim.dim_param and not first_dim.HasField("dim_value"), first_dim


def ptq_model(float_model: nn.Module, batches, bits: int) -> torch.fx.GraphModule:
    """turn_quantize + calibrate only: the quantized weights stay those of the float model."""
    return calibrate(turn_quantize(float_model, bits=bits), batches, len(batches))


def export_with_uncompacted(model: nn.Module, example: torch.Tensor, path: Path) -> tuple[Path, Path]:
    """export_int8_onnx, and beside it the same export as written before `_compact` shrank it
    (the reference the compacted file must compute exactly): one torch export for both."""
    reference = path.with_suffix(".uncompacted.onnx")
    compact = export_module._compact

    def save_then_compact(proto: onnx.ModelProto) -> None:
        onnx.save(proto, str(reference))
        compact(proto)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_module, "_compact", save_then_compact)
        return export_int8_onnx(model, example, path), reference


# --------------------------------------------------------------------------------------------
# LeNet on digits (short QAT after float pre-training)


@dataclass(frozen=True)
class Exported:
    model: torch.fx.GraphModule
    path: Path


@pytest.fixture(scope="module")
def lenet_qat(float_lenet, digits_split, qat_lenet_factory, tmp_path_factory) -> dict[int, Exported]:
    folder = tmp_path_factory.mktemp("lenet")
    out = {}
    for bits in (8, 4):
        model = qat_lenet_factory(float_lenet, digits_split, bits=bits, feature_scale_stat_method="PerTensor")
        out[bits] = Exported(model, export_int8_onnx(model, digits_split.x_test[:1], folder / f"lenet{bits}.onnx"))
    return out


@pytest.fixture(scope="module")
def lenet_ptq(float_lenet, digits_split, tmp_path_factory) -> tuple[Exported, Path]:
    """A calibrated-only 8-bit LeNet and the float ONNX of the float model it was made from."""
    folder = tmp_path_factory.mktemp("lenet_ptq")
    batches = [digits_split.x_train[i:i + 64] for i in range(0, 256, 64)]
    model = ptq_model(float_lenet, batches, 8)
    int8 = Exported(model, export_int8_onnx(model, digits_split.x_test[:1], folder / "int8.onnx"))
    return int8, export_float_onnx(float_lenet, digits_split.x_test[:1], folder / "float.onnx")


def test_lenet_8bit_per_tensor_runs_integer_kernels(lenet_qat, tmp_path):
    exported = lenet_qat[8]
    counts = assert_integer_kernels(exported.path, exported.model, tmp_path)
    print(f"\nLeNet 8-bit optimized graph: {dict(counts)}")


def test_lenet_weights_are_integers_without_float_twin(lenet_qat):
    for bits, exported in lenet_qat.items():
        proto = onnx.load(str(exported.path))
        assert any(o.domain in ("", "ai.onnx") and o.version == OPSET for o in proto.opset_import)
        assert_integer_weights_only(proto, exported.model, bits)
        # every layer has a per-tensor input here, so every bias is an int32 initializer
        types = {i.name: i.data_type for i in proto.graph.initializer}
        int32_biases = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"
                        and types.get(n.input[0]) == TensorProto.INT32]
        assert len(int32_biases) == len(quantized_rows(exported.model))


def test_lenet_int8_weights_equal_the_models_integers(lenet_qat):
    """The integers in the file (INT8 and unpacked INT4) are the layers' integer weights."""
    for bits, exported in lenet_qat.items():
        proto = onnx.load(str(exported.path))
        inits = {i.name: i for i in proto.graph.initializer}
        layers = {name: m for name, m in exported.model.named_modules() if isinstance(m, QuantLayer)}
        names = [n.input[0] for n in weight_dequantize_nodes(proto)]
        assert len(names) == len(layers)
        for name, layer in layers.items():
            (init_name,) = [n for n in names if n.startswith(f"{name}.")]
            stored = numpy_helper.to_array(inits[init_name]).astype(np.int8)
            expected = layer.integer_parameters()["weight"].numpy()
            np.testing.assert_array_equal(stored, expected, err_msg=f"{bits}-bit {name}")


def test_float_twin_check_can_fail(lenet_ptq):
    """Sanity of the twin check: the float ONNX holds float weights of the quantized shapes and
    values (at least the Linear layers, which have no BatchNorm to fold)."""
    int8, float_path = lenet_ptq
    int8_proto, float_proto = onnx.load(str(int8.path)), onnx.load(str(float_path))
    rows = quantized_rows(int8.model)
    assert {r.weight_shape for r in rows} <= float_shapes(float_proto)
    dequantized = dequantized_weights(int8_proto)
    linear_weights = {n for n in dequantized for r in rows
                      if r.kind.startswith("Linear") and n.startswith(f"{r.name}.")}
    assert linear_weights and linear_weights <= float_twins(float_proto, dequantized)
    assert_integer_weights_only(int8_proto, int8.model, 8)


def test_lenet_int4_file_is_packed_runs_and_agrees(lenet_qat, digits_split):
    int8, int4 = lenet_qat[8], lenet_qat[4]
    proto4 = onnx.load(str(int4.path))
    weight_elems = sum(int(np.prod(i.dims)) for i in proto4.graph.initializer
                       if i.data_type == TensorProto.INT4 and len(i.dims) > 1)
    assert weight_elems == sum(int(np.prod(r.weight_shape)) for r in quantized_rows(int4.model))
    saved = os.path.getsize(int8.path) - os.path.getsize(int4.path)
    assert saved >= 0.9 * weight_elems / 2, (saved, weight_elems)  # half a byte per weight
    check = check_artifact(int4.path, int4.model, digits_split.test_loader())
    assert check.agreement >= 0.999 and check.int8_acc > 0.9, check


def test_lenet_batch_dimension_is_dynamic(lenet_qat, digits_split):
    for exported in lenet_qat.values():
        assert_batch_dim_dynamic(exported.path)
        sess = session(exported.path)
        name = sess.get_inputs()[0].name
        x = digits_split.x_test[:7]
        out7 = sess.run(None, {name: x.numpy()})[0]
        out1 = sess.run(None, {name: x[:1].numpy()})[0]
        assert out7.shape == (7, 10) and out1.shape == (1, 10)
        np.testing.assert_allclose(out1[0], out7[0], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            expected = exported.model(x).argmax(dim=1).numpy()
        np.testing.assert_array_equal(out7.argmax(axis=1), expected)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_export_leaves_model_unchanged_and_writes_atomically(mode, float_lenet, digits_split,
                                                              qat_lenet_factory, tmp_path):
    model = qat_lenet_factory(float_lenet, digits_split, bits=8, qat_epochs=0)
    model.train(mode == "train")
    before = copy.deepcopy(model.state_dict())
    modes = {name: m.training for name, m in model.named_modules()}

    folder = tmp_path / "out" / "nested"
    path = export_int8_onnx(model, digits_split.x_test[:3], folder / "model.onnx")
    export_int8_onnx(model, digits_split.x_test[:3], folder / "model.onnx")  # overwrite in place

    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert Path(path) == folder / "model.onnx"
    assert sorted(os.listdir(folder)) == ["model.onnx"]
    onnx.checker.check_model(str(path))


def test_failed_save_keeps_previous_file_and_leaves_no_temporary(lenet_qat, digits_split, tmp_path,
                                                                  monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous artifact")

    def broken_save(proto, f, *args, **kwargs):
        Path(f).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_int8_onnx(lenet_qat[8].model, digits_split.x_test[:1], path)
    assert path.read_bytes() == b"previous artifact"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


# --------------------------------------------------------------------------------------------
# torchvision MobileNetV2 (10 classes, 32x32), calibrated on one random batch


@dataclass(frozen=True)
class MobileNetFiles:
    models: dict[int, torch.fx.GraphModule]
    paths: dict[int, Path]
    uncompacted: dict[int, Path]  # the same exports before `_compact`
    float_path: Path
    batch: torch.Tensor


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory) -> MobileNetFiles:
    model = torchvision_with_bn_statistics("mobilenet_v2")
    batch = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    folder = tmp_path_factory.mktemp("mobilenet")
    models, paths, uncompacted = {}, {}, {}
    for bits in (8, 4):
        models[bits] = ptq_model(model, [batch], bits)
        paths[bits], uncompacted[bits] = export_with_uncompacted(
            models[bits], batch, folder / f"mobilenet_v2_int{bits}.onnx")
    float_path = export_float_onnx(model, batch, folder / "mobilenet_v2_float.onnx")
    return MobileNetFiles(models, paths, uncompacted, float_path, batch)


@pytest.mark.slow
def test_mobilenet_8bit_per_tensor_runs_integer_kernels(mobilenet, tmp_path):
    counts = assert_integer_kernels(mobilenet.paths[8], mobilenet.models[8], tmp_path)
    rows = quantized_rows(mobilenet.models[8])
    print(f"\nMobileNetV2 8-bit: {len(rows)} quantized layers, integer kernels "
          f"{ {k: counts[k] for k in INTEGER_KERNELS if counts[k]} }")


@pytest.mark.slow
def test_mobilenet_weights_are_integers_without_float_twin(mobilenet):
    for bits in (8, 4):
        assert_integer_weights_only(onnx.load(str(mobilenet.paths[bits])), mobilenet.models[bits], bits)
    # the same checks find the float weights in the float ONNX
    float_proto = onnx.load(str(mobilenet.float_path))
    rows = quantized_rows(mobilenet.models[8])
    assert {r.weight_shape for r in rows} <= float_shapes(float_proto)
    dequantized = dequantized_weights(onnx.load(str(mobilenet.paths[8])))
    assert float_twins(float_proto, dequantized)


@pytest.mark.slow
def test_mobilenet_int4_is_packed_smaller_and_runs(mobilenet):
    proto4 = onnx.load(str(mobilenet.paths[4]))
    weights = [i for i in proto4.graph.initializer
               if i.name in {n.input[0] for n in weight_dequantize_nodes(proto4)}]
    assert len(weights) == len(quantized_rows(mobilenet.models[4]))
    assert all(i.data_type == TensorProto.INT4 for i in weights)
    size8, size4 = os.path.getsize(mobilenet.paths[8]), os.path.getsize(mobilenet.paths[4])
    print(f"\nMobileNetV2 int4/int8 bytes: {size4}/{size8} = {size4 / size8:.3f}")
    assert size4 < 0.65 * size8

    for bits in (8, 4):
        assert_batch_dim_dynamic(mobilenet.paths[bits])
        sess = session(mobilenet.paths[bits])
        name = sess.get_inputs()[0].name
        last_layer = [m for m in mobilenet.models[bits].modules() if isinstance(m, QuantLayer)][-1]
        step = float(last_layer.output_quant.scale.max())
        for n in (1, 7):
            out = sess.run(None, {name: mobilenet.batch[:n].numpy()})[0]
            with torch.no_grad():
                expected = mobilenet.models[bits](mobilenet.batch[:n]).numpy()
            assert out.shape == expected.shape == (n, 10)
            assert np.isfinite(out).all()
            # same values up to a few steps of the output grid (float rounding across 53 layers)
            assert float(expected.max() - expected.min()) > 10 * step
            np.testing.assert_allclose(out, expected, rtol=0, atol=3 * step)
            np.testing.assert_array_equal(out.argmax(axis=1), expected.argmax(axis=1))


@pytest.mark.slow
def test_mobilenet_artifact_size_against_float_onnx(mobilenet):
    float_bytes = os.path.getsize(mobilenet.float_path)
    ratios = {bits: os.path.getsize(mobilenet.paths[bits]) / float_bytes for bits in (8, 4)}
    print(f"\nMobileNetV2 size ratio vs float ONNX ({float_bytes} bytes): "
          f"int8 {ratios[8]:.4f}, int4 {ratios[4]:.4f}")
    assert ratios[8] <= 0.27  # issue 11: 27.36% before the compaction
    assert ratios[4] <= 0.16


@pytest.mark.slow
def test_mobilenet_compaction_changes_no_kernel_and_no_logit(mobilenet):
    """The compacted file runs the same onnxruntime graph (53 integer kernels at 8 bits) and
    gives bit-for-bit the logits of the export as it was, at 8 and 4 bits; and it is smaller."""
    inputs = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(2)).numpy()
    for bits in (8, 4):
        compacted, reference = mobilenet.paths[bits], mobilenet.uncompacted[bits]
        counts = runtime_op_counts(compacted)
        assert counts == runtime_op_counts(reference), bits
        if bits == 8:
            assert sum(counts[k] for k in INTEGER_KERNELS) == len(quantized_rows(mobilenet.models[8])) == 53
        outputs = [session(p).run(None, {"input": inputs})[0] for p in (compacted, reference)]
        assert outputs[0].dtype == outputs[1].dtype == np.float32
        assert outputs[0].tobytes() == outputs[1].tobytes(), bits
        saved = os.path.getsize(reference) - os.path.getsize(compacted)
        print(f"\nMobileNetV2 {bits}-bit compaction: {os.path.getsize(reference)} -> "
              f"{os.path.getsize(compacted)} bytes")
        assert saved > 0.015 * os.path.getsize(reference), saved  # 48 kB at 8 bits, 47 kB at 4


def test_compaction_drops_zero_points_and_names_but_keeps_what_fusion_needs(lenet_qat):
    """Constant DequantizeLinears lose their all-zero zero points except an 8-bit Gemm weight's
    (QGemm needs it; INT4 weights run dequantized, no QGemm); nodes are unnamed; the interface and
    weight names stay."""
    for bits, exported in lenet_qat.items():
        proto = onnx.load(str(exported.path))
        graph = proto.graph
        inits = {i.name for i in graph.initializer}
        producer = {out: n for n in graph.node for out in n.output}
        gemm_weights = {producer[n.input[1]].input[0] for n in graph.node if n.op_type == "Gemm"}
        for dq in (n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits):
            assert (len(dq.input) == 3) == (dq.input[0] in gemm_weights and bits > 4), (bits, dq)
        assert gemm_weights and all(not n.name for n in graph.node)
        assert [v.name for v in graph.input] == ["input"] and [v.name for v in graph.output] == ["logits"]
        weights = {n.input[0] for n in weight_dequantize_nodes(proto)}
        layers = [name for name, m in exported.model.named_modules() if isinstance(m, QuantLayer)]
        assert weights == {f"{layer}.weight_int" for layer in layers}
        others = {t for n in graph.node for t in [*n.input, *n.output]} - weights - {"input", "logits"}
        assert max(len(t) for t in others) <= 2, others


def test_short_names_are_unique_identifiers():
    names = list(itertools.islice(export_module._short_names(), 5000))
    assert len(set(names)) == len(names)
    assert all(n.isalnum() and n[0].isalpha() for n in names)
    assert len(names[51]) == 1 and len(names[52]) == 2 and len(names[52 * 63 - 1]) == 2
