"""Checks of the int8 artifact in onnxruntime: accuracy, agreement with PyTorch, integer kernels.

Run on every job, so the accuracy a run reports is the accuracy of the file it ships.
"""
from __future__ import annotations

import collections
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.utils.data import DataLoader

INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger")


@dataclass(frozen=True)
class ArtifactCheck:
    int8_acc: float  # the artifact in onnxruntime
    torch_acc: float  # the eval-mode (test-phase) PyTorch model
    agreement: float  # fraction of samples with the same predicted class
    samples: int
    max_logit_diff: float = 0.0  # largest |artifact - test phase| over all logits


def session(path: str | os.PathLike, optimized_path: str | os.PathLike | None = None) -> ort.InferenceSession:
    """A CPU onnxruntime session; `optimized_path` saves the graph onnxruntime actually runs."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the optimized-model serialisation warning is expected
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_artifact(path: str | os.PathLike, model: nn.Module, loader: DataLoader) -> ArtifactCheck:
    """Run `loader` through the artifact and through `model` (eval mode, on its own device)."""
    sess = session(path)
    input_name = sess.get_inputs()[0].name
    device = next(model.parameters()).device
    model.eval()
    ort_hits = torch_hits = agree = total = 0
    max_diff = 0.0
    for inputs, targets in loader:
        ort_logits = sess.run(None, {input_name: inputs.numpy()})[0]
        torch_logits = model(inputs.to(device)).float().cpu().numpy()
        max_diff = max(max_diff, float(np.abs(ort_logits - torch_logits).max(initial=0.0)))
        ort_pred, torch_pred = np.argmax(ort_logits, axis=1), np.argmax(torch_logits, axis=1)
        labels = targets.numpy()
        ort_hits += int((ort_pred == labels).sum())
        torch_hits += int((torch_pred == labels).sum())
        agree += int((ort_pred == torch_pred).sum())
        total += len(labels)
    if total == 0:
        raise ValueError("check_artifact got an empty loader")
    return ArtifactCheck(ort_hits / total, torch_hits / total, agree / total, total, max_diff)


def runtime_op_counts(path: str | os.PathLike) -> collections.Counter:
    """Op types of the graph onnxruntime runs after its optimizations (QDQ fusions included)."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session(path, optimized)
        return collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)


def integer_kernel_count(path: str | os.PathLike) -> int:
    """How many integer conv/matmul kernels onnxruntime runs for the artifact."""
    counts = runtime_op_counts(path)
    return sum(counts[k] for k in INTEGER_KERNELS)
