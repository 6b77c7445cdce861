"""What the subprocesses of the sweep and UI tests share: a clean environment and a free port."""
from __future__ import annotations

import os
import socket
from pathlib import Path


def clean_env(base: Path) -> dict[str, str]:
    """One intra-op thread per process (2-core machine), no weights, no MLflow/Hydra settings
    inherited from the caller."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TORCH_HOME=str(base / "torch_home"), PYTHONUNBUFFERED="1")
    for key in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
                "MLFLOW_RUN_ID"):
        env.pop(key, None)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
