"""Models and files shared by the sections, each built once per run on first use.

The accuracy, inference and sizes sections compare the same artifacts (the float ONNX of the
trained MobileNetV2, our int8 export, onnxruntime's own); building them here once keeps the
sections short and the run's exports few.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from ..engine import freeze_bn_stats
from ..engine.export import export_float_onnx, export_int8_onnx
from ..train import train
from . import contenders, fashion, float_checkpoint, peers
from .ort_quant import quantize_with_onnxruntime
from .settings import BenchSettings

log = logging.getLogger(__name__)


class Workspace:
    def __init__(self, settings: BenchSettings, artifact_dir: Path, cache_dir: Path) -> None:
        self.settings, self.artifact_dir, self.cache_dir = settings, artifact_dir, cache_dir
        self._memo: dict[tuple, object] = {}
        self.unavailable: dict[str, str] = {}  # peer -> "unavailable: <reason>" (first failure)

    @property
    def device(self) -> torch.device:
        """Where the models train (float checkpoint, QAT); exports and runtimes use the CPU."""
        return torch.device(self.settings.device)

    def _once(self, key: tuple, build):
        if key not in self._memo:
            started = time.perf_counter()
            self._memo[key] = build()
            log.info("built %s in %.1f s", key, time.perf_counter() - started)
        return self._memo[key]

    # data ---------------------------------------------------------------------------------
    @property
    def train_size(self) -> int:
        return self.settings.float_recipe.image_size

    def train_images(self) -> fashion.Images:
        r = self.settings.float_recipe
        return fashion.load("train", r.image_size, r.train_images)

    def test_images(self) -> fashion.Images:
        return fashion.load("test", self.train_size, self.settings.test_images)

    def calibration(self, size: int) -> list[torch.Tensor]:
        """The PTQ calibration batches at `size`, the same for every tool.

        At the training size: the QAT recipe's `calibration_batches` batches; at other sizes
        (latency only): `calibration_images` images in batches of 8.
        """
        def build() -> list[torch.Tensor]:
            q = self.settings.qat_recipe
            if size == self.train_size:
                count, batch = q.calibration_batches * q.batch_size, q.batch_size
            else:
                count, batch = self.settings.calibration_images, 8
            pool = fashion.load("train", size, max(count, 1024))
            images = fashion.sample(pool, count, seed=q.seed).x
            return [images[i:i + batch] for i in range(0, len(images), batch)]
        return self._once(("calibration", size), build)

    # float ----------------------------------------------------------------------------------
    def float_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self._once(("float_state",), lambda: float_checkpoint.load_or_train(
            self.settings.float_recipe, self.cache_dir, self.device))

    def float_model(self) -> nn.Module:
        return contenders.float_model(self.float_state()[0]).eval()

    def float_onnx(self, size: int) -> Path:
        return self._once(("float_onnx", size), lambda: export_float_onnx(
            self.float_model(), self.calibration(size)[0][:2], self.artifact_dir / f"float_{size}.onnx"))

    # onnxruntime's PTQ ----------------------------------------------------------------------
    def ort_int8(self, size: int) -> Path:
        return self._once(("ort_int8", size), lambda: quantize_with_onnxruntime(
            self.float_onnx(size), self.artifact_dir / f"onnxruntime_int8_{size}.onnx", self.calibration(size)))

    # ours -------------------------------------------------------------------------------------
    def ours_ptq(self, bits: int, size: int) -> tuple[nn.Module, Path]:
        def build():
            model = contenders.ours_ptq(self.float_model(), self.calibration(size), bits)
            path = export_int8_onnx(model, self.calibration(size)[0][:2],
                                    self.artifact_dir / f"ours_ptq_w{bits}_{size}.onnx")
            return model, path
        return self._once(("ours_ptq", bits, size), build)

    def _qat_train(self, model: nn.Module, desc: str, seed: int) -> float:
        """The shared QAT recipe: same optimizer, lr, batches (`seed`'s stream) and steps."""
        q = self.settings.qat_recipe
        torch.manual_seed(seed)
        model.to(self.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=q.lr, momentum=q.momentum, weight_decay=q.weight_decay)
        batches = fashion.SeededBatches(self.train_images(), q.batch_size, seed)
        seconds = train(model, batches, optimizer, q.steps, self.device, desc).seconds
        model.cpu()
        return seconds

    def ours_qat(self, bits: int, seed: int, bn_frozen: bool = False) -> tuple[nn.Module, Path, float]:
        """Our QAT model after the recipe (calibrated first, as the runner does), its artifact,
        and its training seconds. `bn_frozen`: BatchNorm on its running statistics from the
        first step (the runner's `quant.bn_freeze_step=0`)."""
        def build():
            model = contenders.ours_ptq(self.float_model(), self.calibration(self.train_size), bits)
            if bn_frozen:
                freeze_bn_stats(model)
            seconds = self._qat_train(model, f"bench ours QAT w{bits} seed {seed}", seed)
            model.eval()
            name = f"ours_qat_w{bits}{'_bn_frozen' if bn_frozen else ''}_seed{seed}_{self.train_size}.onnx"
            path = export_int8_onnx(model, self.calibration(self.train_size)[0][:2], self.artifact_dir / name)
            return model, path, seconds
        return self._once(("ours_qat", bits, seed, bn_frozen), build)

    # torch.ao ---------------------------------------------------------------------------------
    def torch_ao_calibrated(self) -> nn.Module:
        """torch.ao's prepared model after observing the calibration batches (no training)."""
        def build():
            model = contenders.torch_ao_qat(self.float_state()[0])
            return contenders.torch_ao_observe(model, self.calibration(self.train_size))
        return self._once(("torch_ao_calibrated",), build)

    def torch_ao_qat_int8(self, seed: int) -> tuple[nn.Module, float]:
        """torch.ao QAT by the same recipe, converted to int8.

        torch.ao's documented workflow: `prepare_qat`, then train; its observers start from the
        first training batch. (Observing calibration batches in eval mode first, as our runner
        does, leaves torch.ao's fused Conv+BN observers in a state whose first training step
        fails with "zero_point must be between quant_min and quant_max" when the running BN
        statistics are far from the batch ones.)
        """
        def build():
            model = contenders.torch_ao_qat(self.float_state()[0])
            seconds = self._qat_train(model, f"bench torch.ao QAT seed {seed}", seed)
            return contenders.torch_ao_convert(model), seconds
        return self._once(("torch_ao_qat_int8", seed), build)

    # the peers: NNCF, Brevitas (optional) ----------------------------------------------------------
    def peer_available(self, peer: str) -> bool:
        if peer not in self.unavailable:
            reason = peers.unavailable(peer)
            if reason is not None:
                self.unavailable[peer] = reason
        return peer not in self.unavailable

    def _peer(self, peer: str, stage: str, build):
        """`build()`, or None with the peer marked unavailable when it (or an earlier stage) failed."""
        if not self.peer_available(peer):
            return None
        try:
            return build()
        except Exception as err:  # the tool's own failure is a finding, not the benchmark's crash
            self.unavailable[peer] = peers.failure(peer, stage, err)
            log.warning("%s", self.unavailable[peer])
            return None

    def peer_int8(self, peer: str, size: int) -> Path | None:
        """The peer's ONNX at `size` after its calibration on our PTQ batches (no training): the
        same graph its QAT artifact has, for latency and size."""
        def build():
            model = peers.quantize(peer, self.float_model(), self.calibration(size))
            return peers.export(peer, model, self.calibration(size)[0], self.artifact_dir / f"{peer}_ptq_{size}.onnx")
        return self._once(("peer_int8", peer, size),
                          lambda: self._peer(peer, f"quantize and export at {size}px", build))

    def peer_qat(self, peer: str, seed: int) -> tuple[Path, float] | None:
        """The peer's QAT by the shared recipe (its ranges first set on the calibration batches, as
        its documented flow does), exported; with its training seconds."""
        def build():
            calibration = self.calibration(self.train_size)
            model = peers.quantize(peer, self.float_model(), calibration, self.device)
            seconds = self._qat_train(model, f"bench {peer} QAT seed {seed}", seed)
            path = peers.export(peer, model, calibration[0],
                                self.artifact_dir / f"{peer}_qat_seed{seed}_{self.train_size}.onnx")
            return path, seconds
        return self._once(("peer_qat", peer, seed), lambda: self._peer(peer, "run QAT and export", build))
