"""Helpers for the sweep tests: `python -m qat_runner -m ...` in subprocesses, MLflow queries, and a
real `mlflow server` on 127.0.0.1 for the team-store test."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from .processes import clean_env, free_port, wait_for_health

SWEEP_2X2 = ["+experiment=lenet_digits", "quant.bits=2,4", "optim.lr=1e-3,1e-4",
             "trainer.float_steps=100", "trainer.max_steps=10"]


@dataclass
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    outputs: Path

    def describe(self) -> str:
        return (f"`{' '.join(self.args)}` -> rc {self.returncode} in {self.seconds:.1f} s\n"
                f"--- stderr (tail) ---\n{self.stderr[-4000:]}\n--- stdout (tail) ---\n{self.stdout[-2000:]}")

    @property
    def sweep_dirs(self) -> list[Path]:
        return sorted(p for p in (self.outputs / "multirun").glob("*/*") if p.is_dir())

    @property
    def sweep_dir(self) -> Path:
        dirs = self.sweep_dirs
        assert len(dirs) == 1, (dirs, self.describe())
        return dirs[0]

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.outputs}/mlflow.db"


class Job:
    """A started `python -m qat_runner ...` (or any module) with output captured to files."""

    def __init__(self, args: Sequence[str], outputs: Path, work: Path, timeout: float,
                 module: str = "qat_runner", env: dict[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", module, *args]
        self.outputs, self.timeout = outputs, timeout
        work.mkdir(parents=True, exist_ok=True)
        (work / "cwd").mkdir(exist_ok=True)
        self._out_path, self._err_path = work / "stdout.txt", work / "stderr.txt"
        self._out, self._err = open(self._out_path, "w"), open(self._err_path, "w")
        self.start = time.monotonic()
        self.proc = subprocess.Popen(self.args, cwd=work / "cwd", stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL, env=env or clean_env(work),
                                     start_new_session=True)

    def wait(self) -> Result:
        try:
            rc = self.proc.wait(timeout=max(1.0, self.timeout - (time.monotonic() - self.start)))
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the job and the workers it started
            self.proc.wait()
            rc = None
        seconds = time.monotonic() - self.start
        self._out.close()
        self._err.close()
        result = Result(self.args, -999 if rc is None else rc, self._out_path.read_text(errors="replace"),
                        self._err_path.read_text(errors="replace"), seconds, self.outputs)
        if rc is None:
            pytest.fail(f"timed out after {self.timeout} s\n{result.describe()}")
        return result


def start_sweep(tmp: Path, name: str, args: Sequence[str], timeout: float = 240.0) -> Job:
    outputs = tmp / name / "outputs"
    return Job(["-m", *args, f"paths.outputs={outputs}"], outputs, tmp / name / "work", timeout)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def parent_and_children(uri: str, experiment: str = "lenet_digits"):
    """(the one parent run, its child runs sorted by job number, every run in the experiment)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment} in {uri}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("qat_sweep") == "parent"]
    assert len(parents) == 1, [(r.info.run_name, r.data.tags) for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    children.sort(key=lambda r: int(r.info.run_name.split(":")[0]))
    return parent, children, runs


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# A real `mlflow server`, on 127.0.0.1 only


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<free port>, SQLite backend store, proxied artifacts."""

    def __init__(self, base: Path) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> MlflowServer:
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.base}/srv.db",
               "--artifacts-destination", str(self.base / "artifacts"), "--workers", "1"]
        env = clean_env(self.base)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job consumers (7 processes) for a test
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.base, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            wait_for_health(self.proc, self.url, self.log, timeout, "mlflow server")
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its workers (its own session)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of its process group is left (uvicorn/gunicorn workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()
        self.proc = None
