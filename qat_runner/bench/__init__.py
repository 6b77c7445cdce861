"""Benchmarks against the peers, side by side in one process: `python -m qat_runner.bench`.

Sections (each compares its contenders in one run, alternating them and taking medians):
training cost (float vs our QAT vs torch.ao eager QAT vs NNCF and Brevitas QAT step, time and peak
memory), inference latency (float ONNX vs our int8 artifact vs onnxruntime's `quantize_static`
artifact vs NNCF's and Brevitas's ONNX, in onnxruntime and OpenVINO), accuracy on Fashion-MNIST
(PTQ and QAT of each tool from one float checkpoint), sizes. NNCF and Brevitas are optional (the
`bench` extra); without them their rows say "unavailable: <reason>".
Writes a JSON file and a markdown table next to it. Speed goals live here, never in tests.
"""
from .settings import PRESETS, SECTIONS, BenchSettings, preset

__all__ = ["DEFAULT_OUT", "PRESETS", "SECTIONS", "BenchSettings", "preset", "run_benchmark"]


def __getattr__(name: str):
    # the runner (and with it onnxruntime, the engine's exporter, ...) loads on first use, so the
    # memory subprocesses (`python -m qat_runner.bench.memory`) start without it
    if name in ("DEFAULT_OUT", "run_benchmark"):
        from . import run
        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
