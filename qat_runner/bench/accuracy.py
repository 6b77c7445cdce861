"""Section 3: Fashion-MNIST accuracy of the float MobileNetV2 and its quantized versions.

Every tool starts from the same cached float checkpoint and sees the same calibration images;
both QAT tools train by the same recipe (batch, iterations, optimizer, lr, seed, batch order).
ONNX files are scored in onnxruntime (what ships); torch.ao's int8 model in PyTorch (x86 backend).
"""
from __future__ import annotations

import os
from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from . import peers, runtimes
from .contenders import state_dict_bytes
from .fashion import Images
from .settings import BenchSettings
from .workspace import Workspace


def onnx_accuracy(path: str | os.PathLike, images: Images, batch_size: int, threads: int) -> float:
    run = runtimes.ort_runner(path, threads)
    hits = sum(int((np.argmax(run(x.numpy()), axis=1) == y.numpy()).sum()) for x, y in images.batches(batch_size))
    return hits / len(images)


@torch.no_grad()
def torch_accuracy(model: nn.Module, images: Images, batch_size: int) -> float:
    model.eval()
    hits = sum(int((model(x).argmax(dim=1) == y).sum()) for x, y in images.batches(batch_size))
    return hits / len(images)


def run(settings: BenchSettings, ws: Workspace) -> dict:
    test = ws.test_images()
    size, bs, threads = ws.train_size, settings.eval_batch_size, settings.threads
    rows: list[dict] = []

    def add(method: str, tool: str, bits: int, accuracy: float, nbytes: int, scored_in: str,
            train_seconds: float | None = None) -> None:
        row = {"method": method, "tool": tool, "weight_bits": bits, "accuracy": accuracy,
               "bytes": nbytes, "scored_in": scored_in}
        if train_seconds is not None:
            row["qat_train_seconds"] = train_seconds
        rows.append(row)

    float_path = ws.float_onnx(size)
    add("float", "torchvision", 32, onnx_accuracy(float_path, test, bs, threads),
        float_path.stat().st_size, "onnxruntime")
    ort_path = ws.ort_int8(size)
    add("PTQ", "onnxruntime quantize_static", 8, onnx_accuracy(ort_path, test, bs, threads),
        ort_path.stat().st_size, "onnxruntime")
    for bits in settings.our_bits:
        _, path = ws.ours_ptq(bits, size)
        add("PTQ", "ours", bits, onnx_accuracy(path, test, bs, threads), path.stat().st_size, "onnxruntime")
    for bits in settings.our_bits:
        _, path, seconds = ws.ours_qat(bits)
        add("QAT", "ours", bits, onnx_accuracy(path, test, bs, threads), path.stat().st_size, "onnxruntime",
            seconds)
    ao_model, ao_seconds = ws.torch_ao_qat_int8()
    add("QAT", "torch.ao eager (x86)", 8, torch_accuracy(ao_model, test, bs), state_dict_bytes(ao_model),
        "pytorch", ao_seconds)
    for peer in settings.peers:
        found = ws.peer_qat(peer)
        if found is not None:
            path, seconds = found
            try:
                score = onnx_accuracy(path, test, bs, threads)
            except Exception as err:  # e.g. an export onnxruntime cannot run
                ws.unavailable[peer] = peers.failure(peer, "run its ONNX in onnxruntime", err)
            else:
                add("QAT", peers.LABELS[peer], 8, score, path.stat().st_size, "onnxruntime", seconds)

    float_acc = rows[0]["accuracy"]
    for row in rows:
        row["delta_to_float"] = row["accuracy"] - float_acc
    _, float_info = ws.float_state()
    return {"dataset": "fashion_mnist", "image_size": size, "test_images": len(test), "device": settings.device,
            "float_checkpoint": {k: v for k, v in float_info.items() if k != "recipe"},
            "float_recipe": asdict(settings.float_recipe), "qat_recipe": asdict(settings.qat_recipe),
            "notes": ["ours: turn_quantize, PTQ calibration, then the QAT recipe (the runner's workflow)",
                      "torch.ao: prepare_qat (its ReLU6 replaced by ReLU), then the QAT recipe; its "
                      "observers start from the first training batch (torch.ao's documented workflow)",
                      "onnxruntime: quant_pre_process, then quantize_static on the calibration batches",
                      "NNCF: nncf.quantize on the calibration batches, then the QAT recipe; its ONNX "
                      "(torch.onnx.export, QDQ) scored",
                      "Brevitas: preprocess_for_quantize (BatchNorm folded) + quantize (8-bit, per-channel "
                      "weights), calibration_mode on the calibration batches, then the QAT recipe; its "
                      "QCDQ ONNX scored"],
            "peer_versions": peers.versions(),
            "unavailable": {peers.LABELS[p]: ws.unavailable[p] for p in settings.peers if p in ws.unavailable},
            "rows": rows}
