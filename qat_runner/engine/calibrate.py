"""Post-training quantization (PTQ): observe feature ranges on a few batches, no weight updates.

This is the "offline quantization" baseline the seed workflow starts from, computed with the
same modules that QAT trains, so the two accuracies are directly comparable.
"""
from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from .fake_quant import FeatureQuantizer


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, num_batches: int | None = None) -> nn.Module:
    """Update every feature quantizer's running range from `batches`, then leave `model` in eval.

    `batches` yields input tensors or (input, target) pairs; `num_batches` limits how many are
    used (all when None). BatchNorm uses its running statistics (folded, as in the test phase)
    and no parameter changes. Returns the same model, in eval mode.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches={num_batches!r} is not accepted: use a positive integer or None")
    quantizers = [m for m in model.modules() if isinstance(m, FeatureQuantizer)]
    device = next(model.parameters()).device
    model.eval()
    for q in quantizers:
        q.observing = True
    try:
        for batch in islice(batches, num_batches):
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(inputs.to(device))
    finally:
        for q in quantizers:
            q.observing = False
    return model
