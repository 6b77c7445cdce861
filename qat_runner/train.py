"""Training and evaluation loops: step-counted (MNN's recipe counts iterations), resumable.

The batch at step k depends only on (seed, k), so a run resumed from a checkpoint sees the same
batches as one that never stopped.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from .checkpoint import Checkpointer

log = logging.getLogger(__name__)

StepLogger = Callable[[int, float, float], None]  # (step, loss, batch accuracy)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN or inf; training stops at that step."""


def _largest_abs(tensors: list[torch.Tensor | None]) -> float:
    """max |x| over the tensors, NaN if any holds one (a norm would overflow float32 on large
    finite values)."""
    values = [t.detach().abs().max() for t in tensors if t is not None and t.numel()]
    return float(torch.stack(values).max()) if values else 0.0


def _likely_cause(model: nn.Module, inputs: torch.Tensor, first_step: bool, start_weight: float,
                  lr: float) -> str:
    """Why the numbers went non-finite, so the advice fits: lr only when the weights blew up."""
    if not bool(torch.isfinite(inputs).all()):
        return "the batch holds NaN/inf inputs: check the data"
    bad = next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        return f"the weights became NaN/inf ({bad}) after too large an update: lower optim.lr (now {lr:g})"
    largest = _largest_abs(list(model.parameters()))
    if largest > 1e3 * max(start_weight, 1e-6):
        return (f"the weights grew from max |w| {start_weight:.3g} to {largest:.3g}: lower optim.lr "
                f"(now {lr:g})")
    if first_step:
        return ("it is not finite on the first batch, before any update, with finite inputs and "
                "weights: check model.weights and the model's own numerics (not optim.lr)")
    return ("the inputs and weights are finite and did not blow up: check the data and the model's "
            "numerics (feature ranges, BatchNorm statistics) before optim.lr")


class ShuffledStream(Sampler[int]):
    """An endless stream of sample indices, one fresh permutation per epoch, from `start`.

    Epoch e is permuted with a generator seeded by (seed, e), so position p of the stream is the
    same whether the run started at 0 or resumed at p.
    """

    def __init__(self, size: int, seed: int, start: int = 0) -> None:
        self.size, self.seed, self.start = size, seed, start

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.size)
        while True:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            yield from torch.randperm(self.size, generator=generator)[offset:].tolist()
            epoch, offset = epoch + 1, 0


def stream_loader(dataset: Dataset, batch_size: int, seed: int, start_step: int = 0,
                  num_workers: int = 0) -> DataLoader:
    """Batches of the shuffled stream, starting at batch `start_step`."""
    sampler = ShuffledStream(len(dataset), seed, start_step * batch_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available())


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float


def train(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, steps: int,
          device: torch.device, desc: str, log_step: StepLogger | None = None, log_every: int = 10,
          start_step: int = 0, checkpointer: Checkpointer | None = None,
          before_step: Callable[[int], None] | None = None,
          scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> TrainResult:
    """Train from step `start_step` to `steps` with cross-entropy; `loader` yields the batches.

    `checkpointer` keeps periodic checkpoints and saves one more on Ctrl-C/SIGTERM before the
    interrupt propagates. A NaN/inf loss raises NonFiniteLossError at its step, before the
    optimizer applies it, and so do non-finite gradients; the checkpoint on disk is then the last
    one known to be good. The error names the likely cause (learning rate, data or numerics).
    `before_step(step)` runs before each step (the runner freezes BatchNorm statistics there);
    `scheduler` (the float stage's lr schedule) steps after each optimizer step.
    """
    model.train()
    start, loss_value, done = time.perf_counter(), math.nan, start_step
    start_weight = _largest_abs(list(model.parameters()))

    def stop(what: str, step: int, inputs: torch.Tensor) -> NonFiniteLossError:
        cause = _likely_cause(model, inputs, step == start_step + 1, start_weight, optimizer.param_groups[0]["lr"])
        return NonFiniteLossError(f"{desc}: {what} at step {step}: {cause}")

    batches = iter(loader)
    # disable=None: a bar on a terminal only; logs and CI get the periodic log lines instead
    with tqdm(total=steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
              leave=False, disable=None) as bar:
        try:
            for step in range(start_step + 1, steps + 1):
                if before_step is not None:
                    before_step(step)
                inputs, targets = next(batches)
                inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                logits = model(inputs)
                loss = F.cross_entropy(logits, targets)
                loss_value = loss.item()

                if not math.isfinite(loss_value):
                    raise stop(f"loss is {loss_value}", step, inputs)
                if checkpointer is not None:
                    checkpointer.loss_is_finite()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                largest_grad = _largest_abs([p.grad for p in model.parameters()])
                if not math.isfinite(largest_grad):  # checked before the step: the weights stay good
                    raise stop(f"a gradient is {largest_grad} (loss {loss_value:.4g})", step, inputs)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                done = step
                bar.update()
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                if log_step is not None and (step % log_every == 0 or step == steps):
                    accuracy = (logits.argmax(dim=1) == targets).float().mean().item()
                    log_step(step, loss_value, accuracy)
                    log.info("%s step %d/%d loss %.4f batch acc %.3f", desc, step, steps, loss_value, accuracy)
                if checkpointer is not None:
                    checkpointer.after_step(step)
        except KeyboardInterrupt:
            if checkpointer is not None and done > start_step:
                checkpointer.save_now(done)
            raise
    if checkpointer is not None and checkpointer.pending is not None:
        checkpointer.loss_is_finite()  # the last step's state: nothing after it can prove it bad
    return TrainResult(steps - start_step, loss_value, time.perf_counter() - start)


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
