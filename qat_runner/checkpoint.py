"""Training checkpoints: written atomically, read with `torch.load(weights_only=True)`.

A checkpoint holds what a resumed QAT run needs to finish exactly as an uninterrupted one:
float and QAT model states, optimizer, completed step, RNG states, the figures measured before
QAT, and the MLflow run id to continue.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, first_sentence
from .engine.files import write_atomically

CHECKPOINT_FILE = "last.pt"
log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain tensors and tuples (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """torch.save to a temporary name in the same folder, then rename over `path`."""
    return write_atomically(path, lambda tmp: torch.save(state, tmp))


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint file, or a run directory holding checkpoints/last.pt."""
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        candidate = candidate / "checkpoints" / CHECKPOINT_FILE
    if not candidate.is_file():
        raise ConfigError(f"trainer.resume={path!r} is neither a checkpoint file nor a run directory "
                          f"with checkpoints/{CHECKPOINT_FILE}")
    return candidate


def load_checkpoint(path: str) -> dict[str, Any]:
    file = resolve_checkpoint(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling fails in many ways; the user needs the path
        raise ConfigError(f"trainer.resume={path!r}: {file} is not a readable checkpoint "
                          f"({type(err).__name__}: {first_sentence(err)})") from None
    missing = {"step", "float_model", "qat_model", "optimizer", "rng", "mlflow_run_id"} - set(state)
    if missing:
        raise ConfigError(f"trainer.resume={path!r}: {file} lacks {', '.join(sorted(missing))}")
    return state


def _snapshot(tree: Any) -> Any:
    """A deep copy whose tensors are cloned to the CPU (the live ones keep training)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _snapshot(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_snapshot(v) for v in tree)
    return tree


class Checkpointer:
    """Periodic checkpoints that are only written once known to be good.

    The state after step N is snapshotted in memory and written when step N+1's loss comes out
    finite, so a NaN never overwrites the last good checkpoint on disk.
    """

    def __init__(self, path: Path, state: Callable[[int], dict[str, Any]], every: int) -> None:
        self.path, self.state, self.every = path, state, every
        self.pending: dict[str, Any] | None = None

    def after_step(self, step: int) -> None:
        if self.every and step % self.every == 0:
            self.pending = _snapshot(self.state(step))

    def loss_is_finite(self) -> None:
        if self.pending is not None:
            self._write(self.pending)

    def save_now(self, step: int) -> None:
        """On an interrupt: the current state, whatever the schedule."""
        self._write(self.state(step))

    def _write(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.path, state)
        self.pending = None
        log.info("checkpoint at step %d: %s", state["step"], self.path)
