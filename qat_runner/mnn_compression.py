"""MNN's compression-parameters file (`MNN_compression.proto`, package `MNN.Compression`),
written by hand in protobuf's proto2 wire format.

MNN's converter reads this file (`--compressionParamsFile`) to make a full-int8 model from a float
one: per convolution, the activation scale, zero point and clamp range of its input and output
tensors (keyed by tensor name) and the per-channel scales of its weight. Encoding the few messages
we need by hand keeps protobuf's code generator and MNN's .proto out of the project.

Schema (MNN 3.6.1; the field numbers are those in the descriptor compiled into MNN's converter)::

    message Pipeline            { required string version = 1 [default = "0.0.0"];
                                  repeated CompressionAlgo algo = 2; }
    message CompressionAlgo     { optional CompressionType type = 1 [default = QUANTIZE];  // 0
                                  optional QuantizeParams quant_params = 2; }
    message QuantizeParams      { optional RoundMode round_mode = 1 [default = ROUND_AWAY_FROM_ZERO];
                                  repeated LayerQuantizeParams layer = 4; }
    message LayerQuantizeParams { repeated ActivationParams input = 1;
                                  repeated WeightParams weight = 2;
                                  repeated ActivationParams output = 3;
                                  optional QuantMethod method = 4 [default = QAT]; }        // 0
    message ActivationParams    { required string name = 1; optional int32 bits = 2 [default = 8];
                                  repeated float scales = 3; optional int32 zero_point = 4;
                                  optional int32 clamp_min = 5 [default = -128];
                                  optional int32 clamp_max = 6 [default = 127]; }
    message WeightParams        { required string name = 1; optional int32 bits = 2 [default = 8];
                                  repeated float scales = 3;
                                  optional int32 clamp_min = 4 [default = -128];
                                  optional int32 clamp_max = 5 [default = 127]; }

Every field we know a value for is written, defaults included, so the file says what it means
without the schema's defaults. `repeated float` is written unpacked (proto2's default encoding).
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

# Wire types (protobuf encoding): varint, 32-bit, length-delimited.
VARINT, FIXED32, LENGTH_DELIMITED = 0, 5, 2
QUANTIZE = 0  # CompressionAlgo.CompressionType
ROUND_AWAY_FROM_ZERO = 1  # QuantizeParams.RoundMode
QAT = 0  # LayerQuantizeParams.QuantMethod
PIPELINE_VERSION = "0.0.0"


@dataclass(frozen=True)
class ActivationParams:
    """One activation tensor: q = round(x / scale) + zero_point, clamped to [clamp_min, clamp_max]."""

    name: str
    scale: float
    zero_point: int
    clamp_min: int = -128
    clamp_max: int = 127
    bits: int = 8


@dataclass(frozen=True)
class WeightParams:
    """One weight tensor: symmetric, one scale per output channel, integers in [clamp_min, clamp_max]."""

    name: str
    scales: tuple[float, ...]
    clamp_min: int
    clamp_max: int
    bits: int = 8


@dataclass(frozen=True)
class LayerParams:
    """One Convolution as MNN's converter finds it: by the name of its output tensor."""

    input: ActivationParams
    weight: WeightParams
    output: ActivationParams


def _varint(value: int) -> bytes:
    """Base-128 varint; a negative int32 is sign-extended to 64 bits (10 bytes), as protobuf does."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _int(field: int, value: int) -> bytes:
    return _key(field, VARINT) + _varint(int(value))


def _bytes(field: int, value: bytes) -> bytes:
    return _key(field, LENGTH_DELIMITED) + _varint(len(value)) + value


def _string(field: int, value: str) -> bytes:
    return _bytes(field, value.encode("utf-8"))


def _floats(field: int, values: Sequence[float]) -> bytes:
    return b"".join(_key(field, FIXED32) + struct.pack("<f", float(v)) for v in values)


def encode_activation(p: ActivationParams) -> bytes:
    return (_string(1, p.name) + _int(2, p.bits) + _floats(3, [p.scale]) + _int(4, p.zero_point)
            + _int(5, p.clamp_min) + _int(6, p.clamp_max))


def encode_weight(p: WeightParams) -> bytes:
    return (_string(1, p.name) + _int(2, p.bits) + _floats(3, p.scales)
            + _int(4, p.clamp_min) + _int(5, p.clamp_max))


def encode_layer(p: LayerParams) -> bytes:
    return (_bytes(1, encode_activation(p.input)) + _bytes(2, encode_weight(p.weight))
            + _bytes(3, encode_activation(p.output)) + _int(4, QAT))


def encode_pipeline(layers: Sequence[LayerParams]) -> bytes:
    """A `Pipeline` with one QUANTIZE algorithm holding `layers`: the file's whole content."""
    quant_params = _int(1, ROUND_AWAY_FROM_ZERO) + b"".join(_bytes(4, encode_layer(p)) for p in layers)
    algo = _int(1, QUANTIZE) + _bytes(2, quant_params)
    return _string(1, PIPELINE_VERSION) + _bytes(2, algo)
