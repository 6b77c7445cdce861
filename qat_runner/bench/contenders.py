"""The models being compared: float MobileNetV2, our QAT model, torch.ao eager QAT.

All three start from the same float weights: torchvision's quantizable MobileNetV2 has the
same state_dict keys as the plain one (QuantStub/DeQuantStub hold no tensors), so one
checkpoint loads into both before fusion. One difference is torchvision's, not ours: its
quantizable MobileNetV2 replaces ReLU6 by ReLU (eager-mode fusion knows Conv+BN+ReLU only), so
torch.ao's QAT starts from a slightly different function than the float model it was given.
"""
from __future__ import annotations

import copy
import io
import warnings

import torch
import torchvision
from torch import nn

from ..engine import calibrate, turn_quantize
from .fashion import NUM_CLASSES

TORCH_AO_QCONFIG = "x86"


def float_model(state: dict[str, torch.Tensor] | None = None, seed: int = 0) -> nn.Module:
    """torchvision MobileNetV2 with a 10-class head; seeded initialisation, or `state` loaded."""
    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=NUM_CLASSES)
    if state is not None:
        model.load_state_dict(state)
    return model


def ours_qat(model: nn.Module, bits: int = 8) -> nn.Module:
    """Our QAT copy (MNN defaults: PerTensor, MovingAverage, 8-bit features), in train mode."""
    return turn_quantize(model, bits=bits).train()


def ours_ptq(model: nn.Module, batches, bits: int = 8) -> nn.Module:
    """Our QAT copy calibrated on `batches` (no weight updates), in eval mode."""
    return calibrate(turn_quantize(model, bits=bits), batches)


def torch_ao_qat(state: dict[str, torch.Tensor] | None = None, seed: int = 0) -> nn.Module:
    """torch.ao eager QAT: quantizable MobileNetV2, fused, `prepare_qat` with the x86 qconfig."""
    torch.manual_seed(seed)
    model = torchvision.models.quantization.mobilenet_v2(weights=None, quantize=False, num_classes=NUM_CLASSES)
    if state is not None:
        model.load_state_dict(state)
    model.train()
    model.fuse_model(is_qat=True)
    with warnings.catch_warnings():  # torch.ao's deprecation and reduce_range notices
        warnings.simplefilter("ignore")
        model.qconfig = torch.ao.quantization.get_default_qat_qconfig(TORCH_AO_QCONFIG)
        torch.ao.quantization.prepare_qat(model, inplace=True)
    return model


@torch.no_grad()
def torch_ao_observe(model: nn.Module, batches) -> nn.Module:
    """torch.ao's PTQ-style calibration: observers see `batches` with BN in eval mode."""
    model.eval()
    for batch in batches:
        model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    return model


def torch_ao_convert(model: nn.Module) -> nn.Module:
    """The int8 model torch.ao ships (x86 backend), from a copy of the prepared model."""
    torch.backends.quantized.engine = TORCH_AO_QCONFIG
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.convert(copy.deepcopy(model).eval())


def state_dict_bytes(model: nn.Module) -> int:
    """Size of `torch.save(model.state_dict())`, torch.ao's shipped form."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
