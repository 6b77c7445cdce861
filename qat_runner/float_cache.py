"""The float stage, trained once and reused (`trainer.float_cache=true`).

Experiments that start from a converged float model trained here (no pretrained weights can be
downloaded) spend most of their time in the float stage; every job of a sweep over QAT settings
would train the same float model again. The cache key is a hash of everything the float stage
depends on: the model and dataset nodes, the float-stage trainer keys, the optimizer (but its lr:
the float stage runs at trainer.float_lr, so a sweep over optim.lr shares one float model) and
the seed. A cached file is written atomically, so a run killed mid-save leaves no broken entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .engine.files import write_atomically

log = logging.getLogger(__name__)
FLOAT_TRAINER_KEYS = ("float_steps", "float_lr", "float_schedule", "batch_size")
IGNORED_DATASET_KEYS = ("num_workers", "test_limit")  # not what the float model learns from


def recipe(cfg: DictConfig) -> dict:
    """What the float stage's result depends on, as plain data."""
    data = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    dataset = {k: v for k, v in data["dataset"].items() if k not in IGNORED_DATASET_KEYS}
    optim = {k: v for k, v in data["optim"].items() if k != "lr"}  # the float stage runs at float_lr
    return {"model": data["model"], "dataset": dataset, "optim": optim, "seed": data["seed"],
            "trainer": {k: data["trainer"][k] for k in FLOAT_TRAINER_KEYS}}


def cache_file(cfg: DictConfig) -> Path:
    key = hashlib.sha256(json.dumps(recipe(cfg), sort_keys=True).encode()).hexdigest()[:16]
    name = f"{cfg.model.name}-{cfg.dataset.name}-{cfg.trainer.float_steps}steps-{key}.pt"
    return Path(cfg.paths.outputs) / "float_cache" / name


def load(cfg: DictConfig, model: torch.nn.Module) -> Path | None:
    """Load the cached float stage into `model`; its path, or None when there is none."""
    path = cache_file(cfg)
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("recipe") != recipe(cfg):  # a hash collision, or a file copied by hand
        log.warning("%s holds another float recipe: training the float stage again", path)
        return None
    model.load_state_dict(payload["state_dict"])
    log.info("float stage loaded from %s (trainer.float_cache=true)", path)
    return path


def save(cfg: DictConfig, model: torch.nn.Module) -> Path:
    path = cache_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomically(path, lambda tmp: torch.save({"recipe": recipe(cfg), "state_dict": state}, tmp))
    log.info("float stage cached at %s", path)
    return path
