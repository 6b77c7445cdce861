"""Model sources: our small LeNet, and any torchvision classifier by name.

torchvision weights come from a weights name (needs a network or a populated TORCH_HOME) or a
local checkpoint path (loaded with `weights_only=True`). `num_classes` replaces the head when
it differs from the weights' classes.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from .errors import ConfigError, first_sentence


class LeNet(nn.Module):
    """A small conv net for 8x8 to 32x32 images: three Conv+BN+ReLU blocks and a two-layer head.

    Pooling is MaxPool on purpose: it keeps values on the quantization grid, so the int8
    artifact needs no requantization between the convolutions and the head.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU6(inplace=True),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def lenet(name: str = "lenet", num_classes: int = 10, in_channels: int = 1, image_size: int = 8,
          weights: str | None = None, **_: object) -> nn.Module:
    if name != "lenet":
        raise ConfigError(f"model.name={name!r} is not accepted by model=lenet: use model=torchvision "
                          f"model.name={name} for a torchvision classifier")
    if weights is not None:
        raise ConfigError(f"model.weights={weights!r} is not accepted by model=lenet: it trains from scratch "
                          "(trainer.float_steps); use null")
    if image_size < 4:
        raise ConfigError(f"dataset.image_size={image_size} is too small for lenet: use 4 or more")
    return LeNet(num_classes, in_channels, image_size)


def classifier_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no Linear head to resize")
    return linears[-1]


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the last Linear for a new one with `num_classes` outputs (no-op when equal)."""
    name, head = _last_linear(model)
    if head.out_features != num_classes:
        model.set_submodule(name, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))
    return model


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; the user needs the path
        raise ConfigError(f"model.weights={str(path)!r} is not a readable PyTorch checkpoint "
                          f"({type(err).__name__}: {first_sentence(err)})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.weights={str(path)!r} holds no state_dict of tensors")
    return state


def load_weights(model: nn.Module, weights: str) -> nn.Module:
    """A local checkpoint (a state_dict saved with torch.save) into a user's own model."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.weights={weights!r} does not exist: give a checkpoint file (a state_dict "
                          "saved with torch.save) or null")
    try:
        model.load_state_dict(_load_checkpoint(path))
    except RuntimeError as err:
        raise ConfigError(f"model.weights={weights!r} does not match {type(model).__name__}: "
                          f"{str(err).splitlines()[0][:300]}") from None
    return model


def _weights_enum(name: str, weights: str):
    try:
        return torchvision.models.get_model_weights(name)[weights.split(".")[-1]]
    except (KeyError, ValueError):
        accepted = [w.name for w in torchvision.models.get_model_weights(name)] + ["DEFAULT"]
        raise ConfigError(f"model.weights={weights!r} is neither a file nor a {name} weights name: "
                          f"use a checkpoint path or one of {', '.join(accepted)}") from None


def _cached_weights_file(weights) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def _runs_at(model: nn.Module, size: int, in_channels: int) -> bool:
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, size, size))
    except (RuntimeError, ValueError, AssertionError):  # torchvision's size checks raise all three
        return False
    return True


def smallest_working_size(model: nn.Module, above: int, in_channels: int = 3, limit: int = 512) -> int | None:
    """The smallest square input size > `above` the model runs at; for a model made for one size
    only (ViT), that size if it is 224 or 299; None if nothing up to `limit` works.

    Binary search, as conv nets that run at a size also run at every larger one.
    """
    if not _runs_at(model, limit, in_channels):
        return next((s for s in (224, 299) if _runs_at(model, s, in_channels)), None)
    lo, hi = above, limit  # lo fails, hi works
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _runs_at(model, mid, in_channels) else (mid, hi)
    return hi


def check_input_size(model: nn.Module, name: str, image_size: int, in_channels: int = 3) -> None:
    """Refuse, before any training, an image size the architecture cannot take (pooling or a fixed
    input size): PyTorch would fail later with a shape error deep in the forward pass."""
    was_training = model.training
    model.eval()
    try:
        if _runs_at(model, image_size, in_channels):
            return
        smallest = smallest_working_size(model, image_size, in_channels)
        fixed = smallest is not None and not _runs_at(model, smallest + 1, in_channels)
    finally:
        model.train(was_training)
    if smallest is None:
        raise ConfigError(f"dataset.image_size={image_size} does not work with {name}, nor any size "
                          "up to 512: choose another model.name")
    if fixed:
        raise ConfigError(f"dataset.image_size={image_size} does not work with {name}: use "
                          f"dataset.image_size={smallest}, the one size it is built for")
    raise ConfigError(f"dataset.image_size={image_size} is too small for {name}: use "
                      f"dataset.image_size={smallest} or more")


def torchvision_classifier(name: str, num_classes: int, weights: str | None = None, image_size: int | None = None,
                           in_channels: int = 3, **_: object) -> nn.Module:
    """A torchvision classifier; `weights`: None, a weights name, or a local checkpoint path.

    With `image_size` given, a size the architecture cannot take is refused (ConfigError).
    """
    model = _torchvision_classifier(name, num_classes, weights)
    if image_size is not None:
        check_input_size(model, name, image_size, in_channels)
    return model


def _torchvision_classifier(name: str, num_classes: int, weights: str | None) -> nn.Module:
    if name not in classifier_names():
        raise ConfigError(f"model.name={name!r} is not a torchvision classifier: use one of "
                          f"{', '.join(classifier_names())}")
    if weights is None:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    path = Path(weights).expanduser()
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt") or path.exists():
        if not path.is_file():
            raise ConfigError(f"model.weights={weights!r} does not exist: give a checkpoint file "
                              "(a state_dict saved with torch.save) or a torchvision weights name")
        state = _load_checkpoint(path)
        head_name, _head = _last_linear(torchvision.models.get_model(name, weights=None))
        head_weight = state.get(f"{head_name}.weight")
        model = torchvision.models.get_model(
            name, weights=None, num_classes=head_weight.shape[0] if head_weight is not None else num_classes)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ConfigError(f"model.weights={weights!r} does not match {name}: "
                              f"{str(err).splitlines()[0][:300]}") from None
        return replace_head(model, num_classes)
    enum = _weights_enum(name, weights)
    cached = _cached_weights_file(enum)
    if not cached.is_file():
        raise ConfigError(f"model.weights={weights!r}: {cached} is missing and nothing can be downloaded "
                          f"here; copy {os.path.basename(enum.url)} there (or set TORCH_HOME), or pass "
                          "model.weights=/path/to/checkpoint.pth")
    model = torchvision.models.get_model(name, weights=enum)
    return replace_head(model, num_classes)


def weights_eval_transform(name: str, weights: str | None):
    """The named torchvision weights' own preprocessing (None for no or local weights)."""
    if weights is None or Path(weights).expanduser().exists() or Path(weights).suffix in (".pt", ".pth"):
        return None
    try:
        return torchvision.models.get_model_weights(name)[weights.split(".")[-1]].transforms()
    except (KeyError, ValueError):
        return None
