"""Training and evaluation loops: step-counted (MNN's recipe counts iterations), with a progress bar."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

log = logging.getLogger(__name__)

StepLogger = Callable[[int, float, float], None]  # (step, loss, batch accuracy)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; training stops at that step."""


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float


def _cycle(loader: DataLoader) -> Iterator:
    while True:  # fresh shuffles each pass; a plain itertools.cycle would replay one order
        yield from loader


def train(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, steps: int,
          device: torch.device, desc: str, log_step: StepLogger | None = None,
          log_every: int = 10) -> TrainResult:
    """`steps` optimizer steps of cross-entropy training; returns the last loss and the wall time."""
    model.train()
    start, loss_value = time.perf_counter(), math.nan
    batches = _cycle(loader)
    # disable=None: a bar on a terminal only; logs and CI get the periodic log lines instead
    with tqdm(total=steps, desc=desc, unit="step", dynamic_ncols=True, leave=False, disable=None) as bar:
        for step in range(1, steps + 1):
            inputs, targets = next(batches)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f"{desc}: loss is {loss_value} at step {step}: lower optim.lr "
                                         "or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if log_step is not None and (step % log_every == 0 or step == steps):
                accuracy = (logits.argmax(dim=1) == targets).float().mean().item()
                log_step(step, loss_value, accuracy)
                log.info("%s step %d/%d loss %.4f batch acc %.3f", desc, step, steps, loss_value, accuracy)
    return TrainResult(steps, loss_value, time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy in eval mode (for a QAT model: the integer test phase)."""
    model.eval()
    hits = total = 0
    for inputs, targets in loader:
        predictions = model(inputs.to(device)).argmax(dim=1).cpu()
        hits += int((predictions == targets).sum())
        total += len(targets)
    return hits / max(total, 1)
