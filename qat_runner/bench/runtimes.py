"""The two inference runtimes, behind one small interface: `runner(path, batch)` -> callable.

onnxruntime runs the ONNX files as they are (dynamic batch). OpenVINO is imported lazily (the
`bench` extra); each model is reshaped to the static batch being timed and compiled for the CPU
with f32 inference precision, so the float model is timed in fp32 and not silently in bf16 on
CPUs with AMX (OpenVINO's default there).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from . import telemetry

# onnxruntime's pool threads spin after each run by default; with several sessions alternating
# in one process, one session's spinning threads would slow the next one down.
ORT_OPTIONS = {"session.intra_op.allow_spinning": "0"}
OPENVINO_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}


def ort_session(path: str | os.PathLike, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    for key, value in ORT_OPTIONS.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(path: str | os.PathLike, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    sess = ort_session(path, threads)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _import_openvino():
    """`import openvino` with its usage telemetry off (`import openvino` alone would start it)."""
    telemetry.disable()
    import openvino

    return openvino


def openvino_unavailable() -> str | None:
    """None when OpenVINO can be used, else why not (for the JSON's `skipped`)."""
    try:
        _import_openvino()
    except ImportError as err:
        return f"openvino is not installed ({err}); pip install 'qat_runner[bench]'"
    return None


def openvino_version() -> str | None:
    try:
        return _import_openvino().__version__
    except ImportError:
        return None


def openvino_runner(path: str | os.PathLike, threads: int, input_shape: tuple[int, ...]
                    ) -> Callable[[np.ndarray], np.ndarray]:
    """A compiled OpenVINO CPU model for a static `input_shape`."""
    ov = _import_openvino()

    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({model.inputs[0].get_any_name(): ov.PartialShape(list(input_shape))})
    compiled = core.compile_model(model, "CPU", {**OPENVINO_CONFIG, "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    output = compiled.outputs[0]

    def run(x: np.ndarray) -> np.ndarray:
        return request.infer({0: x})[output]

    return run
