"""What the subprocesses of the sweep and UI tests share: a clean environment, a free port, and
waiting for an MLflow server to answer."""
from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
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


def wait_for_health(proc: subprocess.Popen, url: str, log: Path, timeout: float, what: str) -> None:
    """Until an MLflow server's /health answers; raises with the log's tail if it exits or stays
    silent (imports take a while on a busy 2-core machine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer in {timeout} s:\n{log.read_text()[-3000:]}")
