"""What a user sees in the MLflow UI after a run: the run's last lines say how to open it; the
printed command (`mlflow ui --backend-store-uri ...`, here on a free loopback port) serves the
store, and headless Chromium opens the printed URLs: the experiment's runs table with the QAT
columns, and the run's page with its result table as description. One small run, one server."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.processes import clean_env
from helpers.ui import MlflowUi, Page, find_chromium, render

CHROMIUM = find_chromium()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium")]

JOB_ARGS = ["trainer.float_steps=50", "trainer.max_steps=10"]  # the default LeNet/digits job, short
LOCAL_UI = "http://127.0.0.1:5000"


@dataclass
class Ui:
    base: Path
    outputs: Path
    stdout: str
    summary: dict
    run_name: str
    server: MlflowUi

    def printed(self, pattern: str) -> str:
        """The first match of `pattern` in what the run printed."""
        found = re.search(pattern, self.stdout)
        assert found, f"{pattern!r} not in the run's output:\n{self.stdout[-3000:]}"
        return found.group(0)

    def open(self, printed_url: str, name: str) -> Page:
        """A printed URL (for `mlflow ui`'s default port) opened on the test's server."""
        assert printed_url.startswith(LOCAL_UI), printed_url
        return render(CHROMIUM, self.server.url + printed_url[len(LOCAL_UI):], self.base / f"{name}.png")


@pytest.fixture(scope="module")
def ui(tmp_path_factory) -> Ui:
    """The run and the server start together (the store is created first, so neither of them
    migrates it while the other reads it)."""
    from mlflow.tracking import MlflowClient

    base = tmp_path_factory.mktemp("mlflow_ui")
    outputs = base / "outputs"
    outputs.mkdir()
    uri = f"sqlite:///{outputs}/mlflow.db"
    MlflowClient(tracking_uri=uri).search_experiments()
    (base / "cwd").mkdir()
    with open(base / "run.out", "w") as out:
        job = subprocess.Popen([sys.executable, "-m", "qat_runner", *JOB_ARGS, f"paths.outputs={outputs}"],
                               cwd=base / "cwd", stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=clean_env(base))
        server = MlflowUi(uri, base).start()
        try:
            rc = job.wait(timeout=300)
            server.wait_ready()
        except BaseException:
            job.kill()
            server.stop()
            raise
    stdout = (base / "run.out").read_text()
    if rc != 0:
        server.stop()
        pytest.fail(f"the run failed (exit {rc}):\n{stdout[-4000:]}")
    run_dir, = (outputs / "runs" / "lenet_digits").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    try:
        yield Ui(base, outputs, stdout, summary, run_dir.name, server)
    finally:
        server.stop()


def test_run_prints_how_to_open_it(ui):
    """The last lines name the command for this store and the run's page."""
    uri = f"sqlite:///{ui.outputs}/mlflow.db"
    assert ui.printed(r"mlflow ui --backend-store-uri \S+") == f"mlflow ui --backend-store-uri {uri}"
    run_url = ui.printed(rf"{LOCAL_UI}/#/experiments/\d+/runs/[0-9a-f]{{32}}\S*")
    assert f"/runs/{ui.summary['mlflow_run_id']}" in run_url
    assert "workflowType=machine_learning" in run_url


def test_experiment_opens_as_model_training(ui):
    """Tags read by the UI: the experiment kind, int8_acc as primary metric, the "QAT results" view."""
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(tracking_uri=f"sqlite:///{ui.outputs}/mlflow.db").get_experiment_by_name("lenet_digits").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.experiment.primaryMetric.name"] == "int8_acc"
    view = json.loads(tags["mlflow.sharedViewState.qat_results"])
    assert "metrics.`int8_acc`" in json.loads(view["state"])["selectedColumns"]


def test_runs_table_shows_the_run_and_int8_accuracy(ui):
    """The printed "all runs" URL: the Runs table (not the GenAI overview), the saved view's
    columns, this run's name and its int8 accuracy."""
    started = time.monotonic()
    page = ui.open(ui.printed(rf"{LOCAL_UI}/#/experiments/\d+/runs\?\S*viewStateShareKey=\S+"), "runs_table")
    where = f"(screenshot {page.screenshot}, {time.monotonic() - started:.0f} s)"
    assert page.text_shows(ui.run_name), f"run {ui.run_name} not in the runs table {where}"
    assert page.text_shows(">int8_acc<"), f"no int8_acc column {where}"
    assert page.text_shows(f">{ui.summary['int8_acc']!r}<"), f"int8_acc={ui.summary['int8_acc']!r} not shown {where}"
    assert page.text_shows("QAT results"), f"the saved view is not active {where}"
    assert page.screenshot.stat().st_size > 10_000, where


def test_run_page_shows_result_table(ui):
    """The printed run URL: the run's name, its description (the result table) and its metrics."""
    page = ui.open(ui.printed(rf"{LOCAL_UI}/#/experiments/\d+/runs/[0-9a-f]{{32}}\S*"), "run_page")
    where = f"(screenshot {page.screenshot})"
    int8 = f"{ui.summary['int8_acc']:.4f}"
    assert page.text_shows(ui.run_name), f"run {ui.run_name} not on its page {where}"
    assert page.text_shows(f"int8 artifact accuracy {int8}"), f"no description headline {where}"
    assert page.text_shows("agreement artifact vs test phase"), f"no result table in the description {where}"
    assert page.text_shows(">int8_acc<") and page.text_shows(f">{ui.summary['int8_acc']!r}<"), \
        f"int8_acc metric not shown {where}"
    assert page.screenshot.stat().st_size > 10_000, where
