"""The float MobileNetV2 every accuracy figure starts from: trained once by a fixed recipe, cached.

The cache file name holds a hash of the recipe, so a changed recipe trains a new checkpoint and
an unchanged one is reused across runs (the float stage dominates a cold run's time).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..engine.files import write_atomically
from ..train import train
from . import fashion
from .contenders import float_model
from .settings import FloatRecipe

log = logging.getLogger(__name__)


def recipe_key(recipe: FloatRecipe) -> str:
    text = json.dumps({"dataset": "fashion_mnist", **asdict(recipe)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_path(recipe: FloatRecipe, cache_dir: Path) -> Path:
    return cache_dir / f"{recipe.model}-fashion{recipe.image_size}-{recipe.steps}steps-{recipe_key(recipe)}.pt"


def _save_atomically(payload: dict, path: Path) -> None:
    write_atomically(path, lambda tmp: torch.save(payload, tmp))


def train_float(recipe: FloatRecipe, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Train MobileNetV2 from scratch on Fashion-MNIST by `recipe` on `device`; returns (CPU
    state_dict, info)."""
    device = torch.device(device)
    images = fashion.load("train", recipe.image_size, recipe.train_images)
    model = float_model(seed=recipe.seed).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.steps)
                 if recipe.lr_schedule == "cosine" else None)
    batches = fashion.SeededBatches(images, recipe.batch_size, recipe.seed)
    result = train(model, batches, optimizer, recipe.steps, device, "bench float training", scheduler=scheduler)
    info = {"recipe": asdict(recipe), "train_seconds": result.seconds, "final_loss": result.final_loss,
            "final_lr": optimizer.param_groups[0]["lr"], "device": device.type}
    return {k: v.cpu() for k, v in model.state_dict().items()}, info


def load_or_train(recipe: FloatRecipe, cache_dir: Path, device: torch.device | str = "cpu"
                  ) -> tuple[dict[str, torch.Tensor], dict]:
    """The cached state_dict for `recipe`, training it on `device` and caching it first when absent
    (the cache does not depend on the device it was trained on)."""
    path = cache_path(recipe, cache_dir)
    if path.is_file():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("recipe") == asdict(recipe):
            return payload["state_dict"], {**payload["info"], "cached": True, "path": str(path)}
        log.warning("%s holds another recipe; training again", path)
    log.info("training the float checkpoint (%d steps); cached at %s", recipe.steps, path)
    started = time.perf_counter()
    state, info = train_float(recipe, device)
    info["train_seconds"] = time.perf_counter() - started
    _save_atomically({"recipe": asdict(recipe), "state_dict": state, "info": info}, path)
    return state, {**info, "cached": False, "path": str(path)}
