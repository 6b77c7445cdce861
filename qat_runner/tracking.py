"""MLflow tracking: one experiment per experiment config, one run per job, never left RUNNING."""
from __future__ import annotations

import json
import logging
import os
import random
import shlex
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import numpy as np
import onnx
from mlflow.entities import RunStatus
from mlflow.models import infer_signature
from mlflow.utils.mlflow_tags import (MLFLOW_EXPERIMENT_PRIMARY_METRIC_GREATER_IS_BETTER,
                                      MLFLOW_EXPERIMENT_PRIMARY_METRIC_NAME, MLFLOW_RUN_NOTE)
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

from .errors import ConfigError
from .paths import PROJECT_ROOT

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


def ensure_experiment(name: str, artifact_root: str | None, uri: str | None = None) -> str:
    """The experiment's id, creating it (with artifacts under `artifact_root`) when missing.

    Safe with several processes on one store: for SQLite, the store's first use (MLflow creates
    and migrates its tables then, which races between processes) and the experiment's creation
    happen under an exclusive lock on `<db>.lock`; "database is locked" is retried with backoff.
    `uri` defaults to the current tracking URI.
    """
    uri = uri or mlflow.get_tracking_uri()
    with store_lock(uri):
        client = mlflow.MlflowClient(tracking_uri=uri)
        return with_retries(lambda: _get_or_create_experiment(client, name, artifact_root),
                            f"MLflow experiment {name!r}")


def _get_or_create_experiment(client: mlflow.MlflowClient, name: str, artifact_root: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        _add_ui_tags(client, experiment)
        return experiment.experiment_id
    location = (Path(artifact_root) / name).resolve().as_uri() if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=ui_tags())
    except mlflow.exceptions.MlflowException:
        experiment = client.get_experiment_by_name(name)  # created meanwhile by a parallel job
        if experiment is None:
            raise
        return experiment.experiment_id


@contextmanager
def tracked_run(uri: str, experiment_name: str, artifact_root: str | None, run_name: str,
                tags: dict[str, str], resume_run_id: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run that ends FINISHED, FAILED on an exception, or KILLED on Ctrl-C/SIGTERM.

    `resume_run_id` continues an earlier run (a job resumed from its checkpoint) instead.
    """
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(experiment_name, artifact_root)
    if resume_run_id is not None:
        run = mlflow.start_run(run_id=resume_run_id)
        mlflow.set_tags(tags)
    else:
        run = _start_run(uri, experiment_id, run_name, tags)  # under the sweep's parent run, if any
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


def require_run(uri: str, run_id: str, what: str) -> None:
    """A resumed job continues its MLflow run: that run must be in this store."""
    check_server(uri)
    try:
        mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise ConfigError(f"{what}: its MLflow run {run_id} is not in tracking.uri={uri!r}: resume "
                          "with the tracking store (and paths.outputs) of the interrupted run") from None


def log_params(params: Mapping[str, Any]) -> None:
    """All params, in batches under MLflow's per-request limit, long values truncated."""
    items = [(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        mlflow.log_params(dict(items[i:i + MAX_PARAMS_TAGS_PER_BATCH]))


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Metrics of the active run (at `step`, when given)."""
    mlflow.log_metrics(dict(metrics), step=step)


def log_artifact(path: str | os.PathLike) -> None:
    """A file of the active run, as an artifact."""
    mlflow.log_artifact(str(path))


def set_description(markdown: str, run_id: str | None = None, uri: str | None = None) -> None:
    """The run's description in the MLflow UI (its `mlflow.note.content` tag, rendered as Markdown);
    the active run unless `run_id` is given. Cut to MLflow's tag length limit."""
    text = markdown if len(markdown) <= MAX_TAG_VAL_LENGTH else markdown[:MAX_TAG_VAL_LENGTH - 2] + " \u2026"
    if run_id is None:
        mlflow.set_tag(MLFLOW_RUN_NOTE, text)
    else:
        with_retries(lambda: mlflow.MlflowClient(tracking_uri=uri).set_tag(run_id, MLFLOW_RUN_NOTE, text),
                     "MLflow run description")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown (GFM) table, as the MLflow UI renders in a run's description."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def log_onnx_model(path: Path, example_input: np.ndarray, example_output: np.ndarray) -> str:
    """Log the int8 artifact with MLflow's onnx flavor and a signature; returns the model URI."""
    info = mlflow.onnx.log_model(onnx.load(str(path)), name="int8_model",
                                 signature=infer_signature(example_input, example_output),
                                 save_as_external_data=False)
    return info.model_uri


# ---------------------------------------------------------------------------------------------
# Several processes on one store: a lock for SQLite's first use, retries when it is locked

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock, the retries remain
    fcntl = None

T = TypeVar("T")
RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # s, jittered; on top of MLflow's 20 s SQLite busy timeout


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` tracking URI; None for any other store."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock across processes on a SQLite store (`<db>.lock` beside the database).

    MLflow creates and migrates the tables on a store's first use without a lock of its own:
    processes that open a fresh store together fail with "duplicate column" or alembic errors.
    A no-op for other stores (a server, PostgreSQL), which handle concurrency themselves.
    """
    path = sqlite_path(uri)
    if path is None or fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_transient(err: BaseException) -> bool:
    """SQLite's "database is locked" (and MLflow's TEMPORARILY_UNAVAILABLE wrapping of it)."""
    text = str(err).lower()
    return ("database is locked" in text or "database table is locked" in text
            or getattr(err, "error_code", None) == "TEMPORARILY_UNAVAILABLE")


def with_retries(fn: Callable[[], T], what: str, delays: tuple[float, ...] = RETRY_DELAYS) -> T:
    """fn(), retried with jittered exponential backoff while the error is transient."""
    for delay in (*delays, None):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - filtered by is_transient
            if delay is None or not is_transient(err):
                raise
            delay *= 1 + random.random()
            log.warning("%s: %s; retrying in %.1f s", what, str(err).splitlines()[0][:200], delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _start_run(uri: str, experiment_id: str, run_name: str, tags: dict[str, str]) -> mlflow.ActiveRun:
    """mlflow.start_run, as a child of the sweep's parent run inside a multirun job."""
    from .sweep import child_run  # the sweep's parent run, if this job is part of one

    run_name, tags, parent_run_id = child_run(uri, experiment_id, run_name, tags)
    kwargs: dict[str, Any] = {} if parent_run_id is None else {"parent_run_id": parent_run_id}
    return with_retries(lambda: mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                                                 tags=tags, **kwargs), "MLflow start_run")


# ---------------------------------------------------------------------------------------------
# The MLflow UI: what it opens on, which columns the runs table shows, and where to look
#
# MLflow 3 opens an experiment as a GenAI app (traces, token usage) unless told otherwise. Before
# 3.17 the UI reads the experiment's `mlflow.experimentKind` tag; 3.17 follows a global "GenAI /
# Model training" switch in its side bar instead (remembered by the browser, `genai` at first),
# which a page's `?workflowType=machine_learning` sets for that page. We set the tag and put the
# parameter in every URL we print. The runs table shows params and metrics only once picked as
# columns: a saved view (an experiment tag `mlflow.sharedViewState.<id>`, listed under "Views",
# opened with `?viewStateShareKey=<id>`) picks the QAT figures.

EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
RUNS_VIEW_ID, RUNS_VIEW_NAME = "qat_results", "QAT results"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_ID}"
RUNS_VIEW_COLUMNS = (*(f"params.`{p}`" for p in ("quant.bits", "optim.lr")), *(f"metrics.`{m}`" for m in (
    "int8_acc", "best_int8_acc", "qat_acc", "ptq_acc", "float_acc", "int8_agreement", "int8_bytes", "size_ratio")))
UI_WORKFLOW = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens by default


def ui_tags(now_ms: int | None = None) -> dict[str, str]:
    """Experiment tags for the MLflow UI: model training, int8 accuracy as the primary metric
    (greater is better), and the "QAT results" view of the runs table."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    state = {"selectedColumns": list(RUNS_VIEW_COLUMNS), "columnOrder": list(RUNS_VIEW_COLUMNS)}
    view = {"name": RUNS_VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)}
    return {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND,
            MLFLOW_EXPERIMENT_PRIMARY_METRIC_NAME: "int8_acc",
            MLFLOW_EXPERIMENT_PRIMARY_METRIC_GREATER_IS_BETTER: "True",
            RUNS_VIEW_TAG: json.dumps(view)}


def _add_ui_tags(client: mlflow.MlflowClient, experiment: Any) -> None:
    """The UI tags an existing experiment lacks (older stores); tags a user changed are kept.

    Only cosmetic: a store that refuses them (permissions, a deleted experiment) does not stop a run.
    """
    if experiment.lifecycle_stage != "active":
        return
    for key, value in ui_tags().items():
        if key in experiment.tags:
            continue
        try:
            client.set_experiment_tag(experiment.experiment_id, key, value)
        except mlflow.exceptions.MlflowException as err:
            if is_transient(err):
                raise
            log.warning("MLflow experiment %s: could not set tag %s: %s", experiment.name, key,
                        str(err).splitlines()[0][:200])
            return


def ui_base(uri: str) -> tuple[str | None, str]:
    """(the command that serves this tracking store in the MLflow UI, or None for a tracking server,
    the UI's address: the server's own, or `mlflow ui`'s default)."""
    if uri.startswith(("http://", "https://")):
        return None, uri.rstrip("/")
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}", LOCAL_UI


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI at `base`."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{UI_WORKFLOW}"


def runs_url(base: str, experiment_id: str) -> str:
    """An experiment's runs table in the MLflow UI at `base`, with the "QAT results" columns."""
    return f"{base}/#/experiments/{experiment_id}/runs?{UI_WORKFLOW}&viewStateShareKey={RUNS_VIEW_ID}"


def run_link(experiment_id: str, run_id: str, text: str) -> str:
    """A Markdown link to a run, relative to the UI that renders it (for run descriptions)."""
    return f"[{text}](#/experiments/{experiment_id}/runs/{run_id}?{UI_WORKFLOW})"


def artifact_image(run_id: str, path: str, alt: str) -> str:
    """Markdown for a run's PNG artifact, shown in a description by the UI that serves the run
    (its `get-artifact` endpoint, relative to the page, so any host or --static-prefix works)."""
    return f"![{alt}](get-artifact?path={path}&run_uuid={run_id})"


def open_hint(uri: str, experiment_id: str, run_id: str, what: str = "this run") -> str:
    """Where to look: the command that starts the UI (for a local store) and the run's URL, then
    the experiment's runs table. Printed at the end of every run and sweep."""
    command, base = ui_base(uri)
    lines = [f"open {what} in MLflow:"]
    if command is not None:
        lines.append(f"  {command}")
        lines.append(f"  then {run_url(base, experiment_id, run_id)}")
    else:
        lines.append(f"  {run_url(base, experiment_id, run_id)}")
    lines.append(f"  all runs of the experiment: {runs_url(base, experiment_id)}")
    return "\n".join(lines)
