"""Benchmarks against the peers, side by side in one process: `python -m qat_runner.bench`.

Sections (each compares its contenders in one run, alternating them and taking medians):
training cost (float vs our QAT vs torch.ao eager QAT step), inference latency (float ONNX vs
our int8 artifact vs onnxruntime's `quantize_static` artifact, in onnxruntime and OpenVINO),
accuracy on Fashion-MNIST (PTQ and QAT of each tool from one float checkpoint), sizes.
Writes a JSON file and a markdown table next to it. Speed goals live here, never in tests.
"""
from .run import DEFAULT_OUT, run_benchmark
from .settings import PRESETS, SECTIONS, BenchSettings, preset

__all__ = ["DEFAULT_OUT", "PRESETS", "SECTIONS", "BenchSettings", "preset", "run_benchmark"]
