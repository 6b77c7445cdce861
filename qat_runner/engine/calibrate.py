"""Post-training quantization (PTQ): observe feature ranges on a few batches, no weight updates.

This is the "offline quantization" baseline the seed workflow starts from, computed with the
same modules that QAT trains, so the two accuracies are directly comparable.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from itertools import islice

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import ScaleUpdateMethod
from .fake_quant import FeatureQuantizer
from .modules import QuantLayer


# Running statistics still carrying more than this share of their initial values (mean 0,
# variance 1) describe no data yet: torch's momentum 0.1 needs 44 batches to get under it.
INITIAL_SHARE_LIMIT = 0.01


def _statistics_untrained(bn: _BatchNorm) -> bool:
    at_init = bool((bn.running_mean == 0).all() and (bn.running_var == 1).all())
    steps = int(bn.num_batches_tracked) if bn.num_batches_tracked is not None else 0
    # the momentum the statistics were gathered at (turn_quantize sets quant.bn_momentum for QAT)
    momentum = getattr(bn, "momentum_before_qat", bn.momentum)
    if at_init or momentum is None:  # momentum None: a cumulative average, real after one batch
        return at_init
    # A checkpoint without num_batches_tracked loads it as 0: trust statistics that moved.
    return 0 < steps and (1.0 - momentum) ** steps > INITIAL_SHARE_LIMIT


def untrained_batch_norms(model: nn.Module) -> list[_BatchNorm]:
    """BatchNorms whose running statistics are still (mostly) their initial mean 0, variance 1."""
    return [m for m in model.modules()
            if isinstance(m, _BatchNorm) and m.track_running_stats and _statistics_untrained(m)]


@contextmanager
def _batch_statistics(model: nn.Module, batch_norms: list[_BatchNorm]) -> Iterator[None]:
    """Run the quantized layers and BatchNorms as in training; BN running statistics are restored.

    With untrained running statistics the eval-mode features are not the ones training will
    see (a random-init MobileNetV2's eval outputs shrink to ~1e-6 while training normalises each
    batch), so ranges observed in eval mode would saturate every feature on the first training
    step and the straight-through gradients through batch-normalised constants overflow to NaN.
    """
    saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in batch_norms]
    for m in model.modules():
        if isinstance(m, (QuantLayer, _BatchNorm)):
            m.train()  # Dropout and the rest stay in eval
    try:
        yield
    finally:
        for bn, state in zip(batch_norms, saved):
            bn.load_state_dict(state)
        model.eval()


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, num_batches: int | None = None) -> nn.Module:
    """Set every feature quantizer's running range from `batches`, then leave `model` in eval.

    `MovingAverage` ranges become the mean of the batches' ranges (each batch weighted equally;
    the training momentum, 0.99, would leave the first of ten batches 91% of the weight: PTQ
    accuracy of the bench's MobileNetV2 87.59% that way, 87.74% with the mean), with the update
    rule's guards (a non-finite batch is skipped, an outgrown one widens the range at once);
    `Maximum` ranges widen to every batch's.

    `batches` yields input tensors or (input, target) pairs; `num_batches` limits how many are
    used (all when None). BatchNorm uses its running statistics (folded, as in the test phase),
    or each batch's statistics where the running ones are still (mostly) their initial values
    (`untrained_batch_norms`); no parameter or BatchNorm statistic changes. Returns the same
    model, in eval mode.
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches={num_batches!r} is not accepted: use a positive integer or None")
    quantizers = [m for m in model.modules() if isinstance(m, FeatureQuantizer)]
    averaging = [q for q in quantizers if q.update_method is ScaleUpdateMethod.MovingAverage]
    momenta = [q.momentum for q in averaging]
    device = next(model.parameters()).device
    model.eval()
    untrained = untrained_batch_norms(model)
    for q in quantizers:
        q.observing = True
    try:
        with _batch_statistics(model, untrained) if untrained else nullcontext():
            for k, batch in enumerate(islice(batches, num_batches)):
                for q in averaging:  # batch k gets weight 1/(k+1): the mean of the batches so far
                    q.momentum = k / (k + 1)
                inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(inputs.to(device))
    finally:
        for q, momentum in zip(averaging, momenta):
            q.momentum = momentum
        for q in quantizers:
            q.observing = False
    return model.eval()

