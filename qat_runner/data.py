"""Datasets and transforms: digits (embedded), Fashion-MNIST (Debian IDX files), ImageFolder, FakeData.

Each builder returns `DataSplits` (train and test `Dataset`s of (CHW float tensor, int label)).
Transforms follow torchvision's conventions; images are brought to the channel count the model
expects (grey repeated to 3 channels, or RGB to grey) and to `image_size`.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

from .errors import ConfigError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


@dataclass
class DataSplits:
    train: Dataset
    test: Dataset
    num_classes: int


class MatchChannels(torch.nn.Module):
    """Repeat a grey image to 3 channels, or average RGB to grey, to fit the model's input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-3] == self.channels:
            return image
        if image.shape[-3] == 1:
            return image.expand(*image.shape[:-3], self.channels, *image.shape[-2:])
        if self.channels == 1:
            return image.mean(dim=-3, keepdim=True)
        raise ConfigError(f"cannot turn {image.shape[-3]}-channel images into {self.channels} channels")


def _normalize(channels: int, mean: float | None, std: float | None) -> v2.Normalize:
    """Per-dataset grey statistics, or ImageNet's (averaged over RGB for a grey model)."""
    if mean is None or std is None:
        if channels == 3:
            return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        mean, std = sum(IMAGENET_MEAN) / 3, sum(IMAGENET_STD) / 3
    return v2.Normalize([mean] * channels, [std] * channels)


def tensor_transform(channels: int, image_size: int, native_size: int, mean: float, std: float) -> v2.Compose:
    """For images already held as uint8 tensors (digits, Fashion-MNIST)."""
    steps = [v2.ToDtype(torch.float32, scale=True)]
    if image_size != native_size:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
    steps += [MatchChannels(channels), _normalize(channels, mean, std)]
    return v2.Compose(steps)


class TensorImages(Dataset):
    """uint8 images (N x C x H x W) and labels held in memory, with a per-sample transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), int(self.labels[index])


def digits(num_classes: int = 10, channels: int = 1, image_size: int = 8, test_fraction: float = 0.2,
           seed: int = 0, **_: object) -> DataSplits:
    """scikit-learn's bundled 8x8 digits (1,797 images): offline, the embedded default."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.from_numpy((data.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(data.target.astype(np.int64))
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           random_state=seed, stratify=data.target)
    transform = tensor_transform(channels, image_size, 8, mean=0.3, std=0.4)
    return DataSplits(TensorImages(images[train_idx], labels[train_idx], transform),
                      TensorImages(images[test_idx], labels[test_idx], transform), num_classes)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip or plain), the MNIST family's format.

    Written here because torchvision's FashionMNIST insists on its own folder layout and on
    downloading into it; Debian ships the bare .gz files.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned bytes, the only type the MNIST family uses
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x})")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise ConfigError(f"dataset.root={str(root)!r} has no {stem}[.gz]: install Debian's "
                      f"dataset-fashion-mnist (files in {FASHION_MNIST_ROOT}) or point dataset.root "
                      "at a folder with the four Fashion-MNIST IDX files")


def fashion_mnist(root: str | None = FASHION_MNIST_ROOT, num_classes: int = 10, channels: int = 1,
                  image_size: int = 28, train_limit: int | None = None, test_limit: int | None = None,
                  **_: object) -> DataSplits:
    """Fashion-MNIST from IDX files (60k train / 10k test, 28x28 grey)."""
    root_path = Path(root or FASHION_MNIST_ROOT)
    if not root_path.is_dir():
        raise ConfigError(f"dataset.root={str(root_path)!r} does not exist: apt-get install "
                          "dataset-fashion-mnist, or set dataset.root to a folder with the IDX files")
    transform = tensor_transform(channels, image_size, 28, mean=0.286, std=0.353)
    splits = []
    for prefix, limit in (("train", train_limit), ("t10k", test_limit)):
        images = torch.from_numpy(read_idx(_find_idx(root_path, f"{prefix}-images-idx3-ubyte")).copy())
        labels = torch.from_numpy(read_idx(_find_idx(root_path, f"{prefix}-labels-idx1-ubyte")).astype(np.int64))
        images, labels = images[:limit].unsqueeze(1), labels[:limit]
        splits.append(TensorImages(images, labels, transform))
    return DataSplits(splits[0], splits[1], num_classes)


def imagefolder(root: str | None, num_classes: int, channels: int = 3, image_size: int = 224,
                eval_transform=None, augment: bool = True, **_: object) -> DataSplits:
    """torchvision ImageFolder in ImageNet layout: `root/train/<class>/*`, `root/val/<class>/*`.

    `augment`: RandomResizedCrop + flip for training (torchvision's recipes); false: MNN's recipe,
    one fixed transform for train and test (centre 0.875 of each side, aspect not kept, resized
    to `image_size`).
    """
    if not root:
        raise ConfigError("dataset.root is not set: point it at an ImageNet-layout folder with "
                          "train/ and val/ (dataset.root=/path/to/imagenet)")
    for split in ("train", "val"):
        if not (Path(root) / split).is_dir():
            raise ConfigError(f"dataset.root={root!r} has no {split}/ folder: an ImageNet-layout "
                              "folder with train/<class>/*.jpg and val/<class>/*.jpg is expected")
    resize = int(round(image_size * 256 / 224))
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    tail = [*to_float, MatchChannels(channels), _normalize(channels, None, None)]
    if augment:
        train_t = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *tail])
        test_t = eval_transform or v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size), *tail])
    else:  # MNN: resize both sides to 256/224 of the size, keep the centre 224/256 = 0.875
        train_t = test_t = v2.Compose([v2.Resize((resize, resize), antialias=True), v2.CenterCrop(image_size), *tail])
    try:
        train = datasets.ImageFolder(str(Path(root) / "train"), transform=train_t)
        test = datasets.ImageFolder(str(Path(root) / "val"), transform=test_t)
    except (FileNotFoundError, RuntimeError) as err:  # ImageFolder's error for an empty class tree
        raise ConfigError(f"dataset.root={root!r}: {err}") from None
    if len(train.classes) != num_classes:
        raise ConfigError(f"dataset.num_classes={num_classes} but {root}/train has "
                          f"{len(train.classes)} class folders: set dataset.num_classes={len(train.classes)}")
    return DataSplits(train, test, num_classes)


def fake(num_classes: int = 10, channels: int = 3, image_size: int = 32, train_size: int = 256,
         test_size: int = 64, seed: int = 0, **_: object) -> DataSplits:
    """torchvision FakeData: random images, for smoke runs of big models."""
    t = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    shape = (channels, image_size, image_size)
    return DataSplits(
        datasets.FakeData(train_size, shape, num_classes, transform=t, random_offset=seed),
        datasets.FakeData(test_size, shape, num_classes, transform=t, random_offset=seed + train_size),
        num_classes)
