"""Fashion-MNIST as in-memory tensors for the benchmark: 3 channels (grey repeated), any size.

The images go through the runner's own transform (`qat_runner.data.fashion_mnist`), applied once
to the whole subset instead of per sample, so the benchmark sees the runner's preprocessing
without its per-sample cost.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..data import FASHION_MNIST_ROOT, fashion_mnist

CHANNELS, NUM_CLASSES = 3, 10


@dataclass(frozen=True)
class Images:
    x: torch.Tensor  # N x 3 x S x S, normalised float32
    y: torch.Tensor  # N, int64 labels

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """In order, the last batch possibly smaller (evaluation)."""
        for i in range(0, len(self), batch_size):
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]


@lru_cache(maxsize=8)
def load(split: str, image_size: int, limit: int | None = None, root: str = FASHION_MNIST_ROOT) -> Images:
    """The first `limit` images of `split` ("train" or "test"), transformed for a 3-channel model."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not accepted: use train or test")
    data = fashion_mnist(root, channels=CHANNELS, image_size=image_size,
                         train_limit=limit if split == "train" else 1,
                         test_limit=limit if split == "test" else 1)
    dataset = data.train if split == "train" else data.test
    x = dataset.transform(dataset.images).contiguous()
    return Images(x, dataset.labels.clone())


def sample(images: Images, count: int, seed: int) -> Images:
    """`count` images drawn without replacement by a seeded generator (calibration sets)."""
    index = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    return Images(images.x[index], images.y[index])


class SeededBatches:
    """An endless stream of training batches; the batch at step k depends only on (seed, k).

    Both QAT tools iterate the same stream, so they train on the same images in the same order.
    """

    def __init__(self, images: Images, batch_size: int, seed: int) -> None:
        if batch_size > len(images):
            raise ValueError(f"batch_size={batch_size} is larger than the {len(images)} images")
        self.images, self.batch_size, self.seed = images, batch_size, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, epoch = len(self.images), 0
        while True:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
            for i in range(0, n - self.batch_size + 1, self.batch_size):
                index = order[i:i + self.batch_size]
                yield self.images.x[index], self.images.y[index]
            epoch += 1
