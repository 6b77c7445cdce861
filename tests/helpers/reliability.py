"""Helpers for the reliability tests: a small job scheduler (at most two CLI processes at a time
on a 2-core machine), MLflow run states, leftover checks, the one-line error rule, log polling."""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from .runner import CliJob, CliResult, QatCli

INT8_FILE, SUMMARY_FILE = "model.int8.onnx", "summary.json"
COMPARED_SUMMARY_KEYS = ("float_acc", "ptq_acc", "qat_acc", "int8_acc", "int8_agreement", "int8_bytes")
CONCURRENCY = 2  # the machine has 2 cores; every job runs with one intra-op thread

# MLflow's own log lines on stderr when it creates a fresh SQLite store ("Creating initial MLflow
# database tables..."): tolerated around the one `error:` line, nothing else is.
_MLFLOW_LOG_LINE = re.compile(r"^\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} (INFO|WARNING) (mlflow|alembic)")
# Temporary names of the atomic writers (tempfile.mkstemp with a leading dot, or *.tmp)
_TEMP_NAME = re.compile(r"(\.tmp$)|(^\.(model\.|summary\.json\.|last\.pt\.|resolved_config))")
_TRAINING_LOG = re.compile(r"(float training|QAT) step \d+/\d+")


# --------------------------------------------------------------------------------------------
# Jobs, at most CONCURRENCY at a time, some waiting for another job to finish first


@dataclass
class Job:
    args: list[str]
    outputs: Path | None = None  # appended as paths.outputs=...
    needs: str | None = None  # key of a job that must have finished before this one starts
    before: Callable[[dict[str, CliResult]], None] | None = None  # called just before it starts
    timeout: float = 300.0


def run_jobs(cli: QatCli, jobs: dict[str, Job], concurrency: int = CONCURRENCY) -> dict[str, CliResult]:
    pending = dict(jobs)
    running: dict[str, CliJob] = {}
    results: dict[str, CliResult] = {}
    while pending or running:
        for key in list(pending):
            if len(running) >= concurrency:
                break
            job = pending[key]
            if job.needs is not None and job.needs not in results:
                continue
            del pending[key]
            if job.before is not None:
                job.before(results)
            running[key] = cli.start(job.args, job.outputs, timeout=job.timeout)
        if not running:
            raise AssertionError(f"jobs wait for jobs that never run: {list(pending)}")
        time.sleep(0.05)
        for key, started in list(running.items()):
            timed_out = time.monotonic() - started.start > started.timeout
            if started.proc.poll() is not None or timed_out:
                results[key] = started.wait()
                del running[key]
    return results


# --------------------------------------------------------------------------------------------
# MLflow


def mlflow_runs(outputs: Path) -> dict[str, str]:
    """{run_id: status} of every run in <outputs>/mlflow.db ({} when there is no store)."""
    db = outputs / "mlflow.db"
    if not db.exists():
        return {}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return {}
    return {r.info.run_id: r.info.status for r in client.search_runs(experiments)}


def run_status(outputs: Path, run_id: str) -> str:
    runs = mlflow_runs(outputs)
    assert run_id in runs, f"run {run_id} is not in {outputs / 'mlflow.db'}: {runs}"
    return runs[run_id]


# --------------------------------------------------------------------------------------------
# Assertions


def assert_no_leftovers(*roots: Path | None) -> None:
    """No int8 artifact, no temporary file of an atomic writer, no MLflow run left RUNNING."""
    for root in roots:
        if root is None or not root.exists():
            continue
        artifacts = sorted(root.rglob(INT8_FILE))
        assert artifacts == [], f"a failed job left an int8 artifact: {artifacts}"
        temps = sorted(p for p in root.rglob("*") if p.is_file() and _TEMP_NAME.search(p.name))
        assert temps == [], f"temporary files left behind: {temps}"
        running = [k for k, v in mlflow_runs(root).items() if v == "RUNNING"]
        assert running == [], f"MLflow runs left RUNNING in {root / 'mlflow.db'}: {running}"


def one_error_line(result: CliResult) -> str:
    """The job printed exactly one `error: ...` line on stderr and no traceback; the only other
    stderr lines allowed are MLflow's own store-creation log lines."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert "Traceback" not in result.stderr + result.stdout, result.describe()
    assert len(errors) == 1, f"expected one `error:` line\n{result.describe()}"
    others = [line for line in lines if not line.startswith("error: ") and not _MLFLOW_LOG_LINE.match(line)]
    assert others == [], f"stderr has more than the error line: {others}\n{result.describe()}"
    return errors[0]


def assert_no_training(result: CliResult) -> None:
    """Failed before any training step was logged."""
    found = _TRAINING_LOG.search(result.stdout + result.stderr)
    assert found is None, f"training started ({found.group(0)!r}) before the error\n{result.describe()}"


# --------------------------------------------------------------------------------------------
# Files


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / SUMMARY_FILE).read_text())


def load_checkpoint_file(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def wait_for_log(job: CliJob, log_file: Path, pattern: str, timeout: float = 240.0,
                 poll: float = 0.02) -> str:
    """Poll `log_file` until `pattern` (a regex) appears; fails if the job exits first."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        if regex.search(text):
            return text
        if job.proc.poll() is not None:
            result = job.wait()
            pytest.fail(f"the job ended (rc {result.returncode}) before its log showed {pattern!r}; "
                        f"make it run longer\n{result.describe()}")
        time.sleep(poll)
    job.proc.kill()
    result = job.wait()
    pytest.fail(f"{pattern!r} not in {log_file} after {timeout} s\n{result.describe()}")
