"""Model source `model=onnx`: any float ONNX classifier becomes a trainable torch model.

The seed's workflow starts from a float model trained elsewhere (TensorFlow through tf2onnx,
PyTorch, ...). onnx2torch does the conversion; two things it does not do are done here:
- it cannot read the Identity nodes that torch's ONNX exporter writes for shared initializers
  (KeyError on the initializer name), so the file first goes through onnxruntime's basic graph
  optimizations (Identity removal, constant folding, Conv+BatchNorm fusion: standard ONNX ops only);
- it knows nothing of our config, so the input shape is checked against `model.in_channels` and
  `dataset.image_size`, and a head with other classes than `model.num_classes` is replaced.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import nn

from .errors import ConfigError, first_sentence
from .models import replace_head


def _input_shape(proto: onnx.ModelProto, path: str) -> list[int | None]:
    """The (N, C, H, W) of the one graph input that is not an initializer; None for a free dim."""
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ConfigError(f"model.path={path!r} has {len(inputs)} inputs: model=onnx takes a classifier "
                          "with one image input (N, C, H, W)")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ConfigError(f"model.path={path!r}: its input has rank {len(dims)}, not 4: model=onnx "
                          "takes an image input (N, C, H, W)")
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def _check_input(shape: list[int | None], path: str, in_channels: int, image_size: int) -> None:
    channels, height, width = shape[1:]
    if channels is not None and channels != in_channels:
        raise ConfigError(f"model.in_channels={in_channels} does not match {path!r}, whose input has "
                          f"{channels} channels: use model.in_channels={channels}")
    for side in (height, width):
        if side is not None and side != image_size:
            raise ConfigError(f"dataset.image_size={image_size} does not match {path!r}, whose input is "
                              f"{height}x{width}: use dataset.image_size={side}")


def _simplified(path: Path, workdir: Path) -> onnx.ModelProto:
    """The model after onnxruntime's basic optimizations, saved and loaded back as plain ONNX."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(workdir / "basic.onnx")
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise ConfigError(f"model.path={str(path)!r} is not a model onnxruntime can load "
                          f"({type(err).__name__}: {first_sentence(err)})") from None
    return onnx.load(str(workdir / "basic.onnx"))


def _convert(proto: onnx.ModelProto, path: str) -> nn.Module:
    from onnx2torch import convert  # imported here: it registers ~200 converters at import

    try:
        return convert(proto)
    except NotImplementedError as err:  # onnx2torch names the op and opset it lacks
        raise ConfigError(f"model.path={path!r} cannot be converted to torch: {first_sentence(err)} "
                          "(onnx2torch 1.5 converts opsets up to 17; re-export with opset_version=13..17)") from None


def onnx_classifier(path: str | None, num_classes: int, in_channels: int = 3, image_size: int = 224,
                    **_: object) -> nn.Module:
    """A float ONNX classifier at `path` as a trainable torch.fx.GraphModule with `num_classes` outputs."""
    if not path:
        raise ConfigError("model=onnx needs model.path: give a float ONNX classifier file, e.g. "
                          "model.path=/models/net.onnx")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model.path={path!r} does not exist: give a float ONNX classifier file")
    try:
        proto = onnx.load(str(file), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and friends
        raise ConfigError(f"model.path={path!r} is not an ONNX model ({type(err).__name__}: "
                          f"{first_sentence(err)})") from None
    _check_input(_input_shape(proto, path), path, in_channels, image_size)
    with tempfile.TemporaryDirectory(prefix="qat_onnx_") as workdir:
        model = _convert(_simplified(file, Path(workdir)), path)
    with torch.no_grad():
        logits = model.eval()(torch.zeros(1, in_channels, image_size, image_size))
    if logits.dim() != 2:
        raise ConfigError(f"model.path={path!r} outputs shape {tuple(logits.shape)}, not (N, classes): "
                          "model=onnx takes a classifier")
    if logits.shape[1] != num_classes:
        replace_head(model, num_classes)
    return model.train()
