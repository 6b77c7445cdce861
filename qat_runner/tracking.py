"""MLflow tracking: one experiment per experiment config, one run per job, never left RUNNING."""
from __future__ import annotations

import logging
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnx
from mlflow.entities import RunStatus
from mlflow.models import infer_signature
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from .config import PROJECT_ROOT, ConfigError

log = logging.getLogger(__name__)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'quant': {'bits': 8}} -> {'quant.bits': 8}; lists stay one value."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def check_server(uri: str, timeout: float = 5.0) -> None:
    """Fail within seconds when an HTTP tracking server does not answer (MLflow would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            pass
    except (urllib.error.URLError, OSError) as err:
        raise ConfigError(f"tracking.uri={uri!r} does not answer ({getattr(err, 'reason', err)}): start "
                          "the server, or use the default SQLite store (tracking=sqlite)") from None


def ensure_experiment(name: str, artifact_root: str | None) -> str:
    """The experiment's id, creating it (with artifacts under `artifact_root`) when missing."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = (Path(artifact_root) / name).resolve().as_uri() if artifact_root else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        experiment = mlflow.get_experiment_by_name(name)  # created meanwhile by a parallel job
        if experiment is None:
            raise
        return experiment.experiment_id


@contextmanager
def tracked_run(uri: str, experiment_name: str, artifact_root: str | None, run_name: str,
                tags: dict[str, str]) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that ends FINISHED, FAILED on an exception, or KILLED on Ctrl-C/SIGTERM."""
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(experiment_name, artifact_root)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags)
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        yield run
        status = RunStatus.to_string(RunStatus.FINISHED)
    except KeyboardInterrupt:
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    finally:
        mlflow.end_run(status)
        log.info("MLflow run %s ended %s", run.info.run_id, status)


def log_params(params: Mapping[str, Any]) -> None:
    """All params, in batches under MLflow's per-request limit, long values truncated."""
    items = [(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        mlflow.log_params(dict(items[i:i + MAX_PARAMS_TAGS_PER_BATCH]))


def log_onnx_model(path: Path, example_input: np.ndarray, example_output: np.ndarray) -> str:
    """Log the int8 artifact with MLflow's onnx flavor and a signature; returns the model URI."""
    info = mlflow.onnx.log_model(onnx.load(str(path)), name="int8_model",
                                 signature=infer_signature(example_input, example_output),
                                 save_as_external_data=False)
    return info.model_uri
