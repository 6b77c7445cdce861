"""Section 3: Fashion-MNIST accuracy of the float MobileNetV2 and its quantized versions.

Every tool starts from the same cached float checkpoint and sees the same calibration images;
every QAT tool trains by the same recipe (batch, iterations, optimizer, lr, batch order), once per
seed of the recipe, and is reported by its mean accuracy.
ONNX files are scored in onnxruntime (what ships); torch.ao's int8 model in PyTorch (x86 backend).
"""
from __future__ import annotations

import os
import statistics
from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from . import peers, runtimes
from .contenders import state_dict_bytes
from .fashion import Images
from .settings import BenchSettings
from .workspace import Workspace


# Our QAT with BatchNorm on its running statistics from the first step (the runner's
# quant.bn_freeze_step=0): the fine-tuning set-up Brevitas's folded BatchNorm amounts to.
OURS_BN_FROZEN = "ours, BatchNorm frozen (quant.bn_freeze_step=0)"


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
            train_seconds: float | None = None, per_seed: list[float] | None = None) -> None:
        row = {"method": method, "tool": tool, "weight_bits": bits, "accuracy": accuracy,
               "bytes": nbytes, "scored_in": scored_in}
        if train_seconds is not None:
            row["qat_train_seconds"] = train_seconds
        if per_seed is not None:
            row["accuracy_per_seed"] = per_seed
        rows.append(row)

    def add_qat(tool: str, bits: int, runs: list[tuple[float, int, float]], scored_in: str) -> None:
        """One row for a QAT tool's runs (accuracy, bytes, seconds), one per seed: the mean
        accuracy, each seed's, the first run's size, the median training time."""
        scores = [score for score, _, _ in runs]
        add("QAT", tool, bits, statistics.mean(scores), runs[0][1], scored_in,
            statistics.median(seconds for _, _, seconds in runs), scores)

    seeds = settings.qat_recipe.seeds
    float_path = ws.float_onnx(size)
    add("float", "torchvision", 32, onnx_accuracy(float_path, test, bs, threads),
        float_path.stat().st_size, "onnxruntime")
    ort_path = ws.ort_int8(size)
    add("PTQ", "onnxruntime quantize_static", 8, onnx_accuracy(ort_path, test, bs, threads),
        ort_path.stat().st_size, "onnxruntime")
    for bits in settings.our_bits:
        _, path = ws.ours_ptq(bits, size)
        add("PTQ", "ours", bits, onnx_accuracy(path, test, bs, threads), path.stat().st_size, "onnxruntime")
    for bits, bn_frozen in [(bits, False) for bits in settings.our_bits] + [(8, True)]:
        runs = []
        for seed in seeds:
            _, path, seconds = ws.ours_qat(bits, seed, bn_frozen)
            runs.append((onnx_accuracy(path, test, bs, threads), path.stat().st_size, seconds))
        add_qat(OURS_BN_FROZEN if bn_frozen else "ours", bits, runs, "onnxruntime")
    runs = []
    for seed in seeds:
        ao_model, seconds = ws.torch_ao_qat_int8(seed)
        runs.append((torch_accuracy(ao_model, test, bs), state_dict_bytes(ao_model), seconds))
    add_qat("torch.ao eager (x86)", 8, runs, "pytorch")
    for peer in settings.peers:
        runs = []
        for seed in seeds:
            found = ws.peer_qat(peer, seed)
            if found is None:
                break
            path, seconds = found
            try:
                runs.append((onnx_accuracy(path, test, bs, threads), path.stat().st_size, seconds))
            except Exception as err:  # e.g. an export onnxruntime cannot run
                ws.unavailable[peer] = peers.failure(peer, "run its ONNX in onnxruntime", err)
                break
        if peer not in ws.unavailable:
            add_qat(peers.LABELS[peer], 8, runs, "onnxruntime")

    float_acc = rows[0]["accuracy"]
    for row in rows:
        row["delta_to_float"] = row["accuracy"] - float_acc
    _, float_info = ws.float_state()
    return {"dataset": "fashion_mnist", "image_size": size, "test_images": len(test), "device": settings.device,
            "float_checkpoint": {k: v for k, v in float_info.items() if k != "recipe"},
            "float_recipe": asdict(settings.float_recipe), "qat_recipe": asdict(settings.qat_recipe),
            "notes": ["QAT rows: one run per seed of the recipe, their mean accuracy (each seed's in "
                      "accuracy_per_seed), the median training time",
                      "ours: turn_quantize, PTQ calibration, then the QAT recipe (the runner's workflow); "
                      f"{OURS_BN_FROZEN}: the same with BatchNorm frozen before the first step",
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
