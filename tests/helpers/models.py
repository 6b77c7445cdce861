"""Test models shared by the artifact tests."""
from __future__ import annotations

import torch
from torch import nn


def torchvision_with_bn_statistics(name: str, num_classes: int = 10) -> nn.Module:
    """A torchvision classifier (seed 0) with non-trivial BatchNorm statistics and affine
    parameters, in eval mode: folding then changes the weights, as it does for a trained model."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.1)
    return model.eval()
