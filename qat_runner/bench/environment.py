"""Thread settings and the record of where a benchmark ran (machine, versions, command line)."""
from __future__ import annotations

import os
import platform
import shlex
import sys
from importlib import metadata

import torch


def set_threads(threads: int) -> None:
    """Use `threads` intra-op threads in torch (onnxruntime and OpenVINO take it per session)."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before torch's first parallel work; then keep torch's
        pass


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def gpu_model(device: str) -> str | None:
    if device != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


def machine_record(threads: int, command: str | None = None, device: str = "cpu") -> dict:
    """What a reader needs to judge the timings: CPU, cores, threads used, library versions."""
    return {
        "device": device,
        "gpu": gpu_model(device),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "threads": {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads(),
                    "onnxruntime_intra_op": threads, "openvino_inference": threads},
        "versions": {name: _version(name) for name in
                     ("torch", "torchvision", "onnx", "onnxruntime", "openvino", "qat_runner",
                      "nncf", "brevitas", "onnxoptimizer")},
        "command": command or " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "note": "timings taken on a machine that may be shared with other processes; "
                "contenders alternate round by round and medians are reported",
    }
