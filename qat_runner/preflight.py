"""Checks that must run before Hydra creates the run directory (a Hydra callback)."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def outputs_problem(outputs: str) -> str | None:
    """Why `outputs` cannot hold runs, or None when a file can be created there."""
    try:
        Path(outputs).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=outputs):
            pass
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    return None


class OutputsWritable(Callback):
    """Stop with one line, exit 2, when `paths.outputs` is not writable.

    Hydra would otherwise fail later with a traceback while creating the run directory.
    """

    def _check(self, config: DictConfig) -> None:
        outputs = config.paths.outputs
        problem = outputs_problem(outputs)
        if problem is not None:
            print(f"error: paths.outputs={outputs!r} is not writable ({problem}): "
                  "choose another folder with paths.outputs=DIR", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config)
