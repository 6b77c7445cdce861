"""tracking=server against a real `mlflow server` started on 127.0.0.1 (SQLite behind it): the run,
its metrics and its int8 model are readable through the server's REST API."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers.sweep import Job

pytestmark = pytest.mark.slow


def test_run_and_model_through_server(mlflow_server, tmp_path):
    outputs = tmp_path / "outputs"
    job = Job(["tracking=server", f"tracking.uri={mlflow_server.url}", "trainer.float_steps=100",
               "trainer.max_steps=10", f"paths.outputs={outputs}"], outputs, tmp_path / "work", timeout=240)
    result = job.wait()
    assert result.returncode == 0, result.describe() + "\n--- server ---\n" + mlflow_server.log.read_text()[-3000:]
    assert not (outputs / "mlflow.db").exists(), "the run went to the server, not to a local store"
    run_dirs = list((outputs / "runs" / "lenet_digits").iterdir())
    assert len(run_dirs) == 1
    summary = json.loads((run_dirs[0] / "summary.json").read_text())

    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("lenet_digits")
    assert experiment is not None
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["quant.bits"] == "8"
    assert run.data.params["tracking.uri"] == mlflow_server.url
    for key in ("float_acc", "qat_acc", "int8_acc", "int8_agreement", "int8_bytes"):
        assert run.data.metrics[key] == pytest.approx(float(summary[key])), key
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "summary.json" in artifacts, artifacts
    assert json.loads(open(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))).read()) == summary
    # the artifacts went through the server into its --artifacts-destination
    assert any(mlflow_server.base.joinpath("artifacts").rglob("summary.json"))

    logged = [m for m in client.search_logged_models(experiment_ids=[experiment.experiment_id])
              if m.source_run_id == run.info.run_id]
    assert len(logged) == 1, logged
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server.url)
    try:
        model = mlflow.pyfunc.load_model(logged[0].model_uri)
    finally:
        mlflow.set_tracking_uri(previous)
    x = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    prediction = model.predict(x)
    if isinstance(prediction, dict):
        prediction = next(iter(prediction.values()))
    scores = np.asarray(prediction.to_numpy() if hasattr(prediction, "to_numpy") else prediction)
    assert scores.shape == (3, 10) and np.isfinite(scores).all()


def test_dead_server_fails_fast(tmp_path):
    """tracking=server with nothing listening: one line naming tracking.uri, within seconds."""
    from helpers.processes import free_port

    outputs = tmp_path / "outputs"
    job = Job(["tracking=server", f"tracking.uri=http://127.0.0.1:{free_port()}", f"paths.outputs={outputs}"],
              outputs, tmp_path / "work", timeout=120)
    result = job.wait()
    assert result.returncode == 2, result.describe()
    assert "tracking.uri=" in result.stderr and "does not answer" in result.stderr
    assert result.seconds < 60
