"""Several processes logging to one SQLite store: no lost runs, no "database is locked".

Without the lock in tracking.ensure_experiment, processes that open a fresh store together race in
MLflow's table creation/migration ("duplicate column name", alembic "expected to match one row")."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from qat_runner import tracking
from helpers.processes import clean_env

PROCESSES, RUNS_EACH = 4, 5

WORKER = textwrap.dedent('''
    import sys
    import mlflow
    from qat_runner import tracking

    uri, worker, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for i in range(runs):
        with tracking.tracked_run(uri, "stress", None, run_name=f"w{worker}-{i}",
                                  tags={"worker": worker}) as run:
            tracking.log_params({f"p{k}": k for k in range(30)})
            for step in range(10):
                mlflow.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 10}, step=step)
            mlflow.log_metric("int8_acc", 0.5)
    print("done", worker)
''')


@pytest.mark.slow
def test_processes_share_a_fresh_sqlite_store(tmp_path):
    db = tmp_path / "store" / "mlflow.db"  # not there yet: the workers create it together
    uri = f"sqlite:///{db}"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = clean_env(tmp_path)
    procs = []
    for w in range(PROCESSES):
        log = open(tmp_path / f"worker{w}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(script), uri, str(w), str(RUNS_EACH)],
                                       stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path), log))
    for proc, log in procs:
        try:
            proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = "\n".join((tmp_path / f"worker{w}.log").read_text() for w in range(PROCESSES))
    assert all(proc.returncode == 0 for proc, _ in procs), logs
    assert "database is locked" not in logs

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = [e for e in client.search_experiments() if e.name == "stress"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id], max_results=1000)
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(f"w{w}-{i}" for w in range(PROCESSES) for i in range(RUNS_EACH))
    assert {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        assert len(run.data.params) == 30 and run.data.metrics["int8_acc"] == 0.5
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 10


# --------------------------------------------------------------------------------------------
# The pieces


def test_sqlite_path():
    assert tracking.sqlite_path("sqlite:////tmp/x/mlflow.db") == Path("/tmp/x/mlflow.db")
    assert tracking.sqlite_path("sqlite:///rel/mlflow.db") == Path("rel/mlflow.db")
    assert tracking.sqlite_path("sqlite://") is None
    assert tracking.sqlite_path("http://127.0.0.1:5000") is None
    assert tracking.sqlite_path("postgresql://u:p@h/db") is None


def test_store_lock_is_exclusive(tmp_path):
    uri = f"sqlite:///{tmp_path}/db/mlflow.db"
    inside, overlaps = [], []

    def hold():
        with tracking.store_lock(uri):
            inside.append(1)
            overlaps.append(len(inside))
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(4)]  # flock: one open file each
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1, 1, 1, 1]
    assert (tmp_path / "db" / "mlflow.db.lock").is_file()
    with tracking.store_lock("http://127.0.0.1:5000"):  # no lock, no file, for servers
        pass


def test_retries_only_transient_errors():
    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    assert tracking.with_retries(locked_twice, "test", delays=(0.01,) * 5) == "ok"
    assert len(calls) == 3

    def broken():
        calls.append(1)
        raise ValueError("not transient")

    calls.clear()
    with pytest.raises(ValueError):
        tracking.with_retries(broken, "test", delays=(0.01,) * 5)
    assert len(calls) == 1

    calls.clear()

    def always_locked():
        calls.append(1)
        raise sqlite3.OperationalError("database is locked")

    with pytest.raises(sqlite3.OperationalError):
        tracking.with_retries(always_locked, "test", delays=(0.01, 0.01))
    assert len(calls) == 3
