"""Hydra multiruns end to end: a 2x2 sweep (bits x lr) on digits with the basic launcher, the same
sweep with the parallel launcher (joblib, 2 processes), submitit's local executor, and a sweep with
a failing job. One MLflow run per job, all under one parent run; a CSV and a PNG summary."""
from __future__ import annotations

import itertools
import json

import pytest
import yaml

from helpers.sweep import (SWEEP_2X2, Result, is_png, parent_and_children, read_csv, start_sweep)

pytestmark = pytest.mark.slow

SWEPT = {(b, lr) for b in ("2", "4") for lr in ("0.001", "0.0001")}
FIGURES = ("float_acc", "ptq_acc", "qat_acc", "int8_acc", "int8_agreement", "float_bytes", "int8_bytes")


def _joblib_installed() -> bool:
    try:
        import hydra_plugins.hydra_joblib_launcher  # noqa: F401
    except ImportError:
        return False
    return True


def _submitit_installed() -> bool:
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return False
    return True


needs_joblib = pytest.mark.skipif(not _joblib_installed(),
                                  reason="hydra-joblib-launcher missing: pip install -e '.[parallel]'")
needs_submitit = pytest.mark.skipif(not _submitit_installed(),
                                    reason="hydra-submitit-launcher missing: pip install -e '.[cluster]'")


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict[str, Result]:
    """The same 2x2 sweep with the basic launcher and (when installed) the parallel launcher,
    started side by side."""
    tmp = tmp_path_factory.mktemp("sweeps")
    jobs = {"basic": start_sweep(tmp, "basic", SWEEP_2X2)}
    if _joblib_installed():
        jobs["parallel"] = start_sweep(tmp, "parallel", ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
                                                         *SWEEP_2X2])
    return {name: job.wait() for name, job in jobs.items()}


def _check_sweep(result: Result) -> None:
    """4 child runs FINISHED under 1 FINISHED parent, swept values in params, summary files."""
    assert result.returncode == 0, result.describe()
    parent, children, runs = parent_and_children(result.uri)
    assert parent.info.status == "FINISHED", parent.info
    assert len(runs) == 5, [r.info.run_name for r in runs]  # nothing unparented, nothing extra
    assert len(children) == 4, [r.info.run_name for r in children]
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {(r.data.params["quant.bits"], r.data.params["optim.lr"]) for r in children} == SWEPT
    for run in children:
        bits, lr = run.data.params["quant.bits"], run.data.params["optim.lr"]
        assert run.info.run_name.endswith(f"bits={bits} lr={lr}"), run.info.run_name
        assert run.data.params["trainer.max_steps"] == "10"
        assert run.data.tags["sweep_dir"] == str(result.sweep_dir)
        for key in FIGURES:
            assert key in run.data.metrics, key
    assert parent.data.params["sweep.quant.bits"] == "2,4"
    assert parent.data.params["sweep.optim.lr"] == "0.001,0.0001"
    assert parent.data.metrics["jobs_finished"] == 4 and parent.data.metrics["jobs_failed"] == 0
    assert parent.data.metrics["best_int8_acc"] == pytest.approx(
        max(r.data.metrics["int8_acc"] for r in children))

    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient(tracking_uri=result.uri).list_artifacts(parent.info.run_id)}
    assert {"sweep_summary.csv", "sweep_summary.png"} <= artifacts, artifacts
    # the MLflow page: the parent's description holds the table of jobs, the best one and the plot
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("**Hydra sweep** over quant.bits, optim.lr: 4/4 jobs finished."), note
    assert f"**Best: job {parent.data.tags['best_job']}**" in note and parent.data.tags["best_run_id"] in note
    assert note.count("| FINISHED |") == 4, note
    assert f"get-artifact?path=sweep_summary.png&run_uuid={parent.info.run_id}" in note
    for run in children:
        assert f"**int8 artifact accuracy {run.data.metrics['int8_acc']:.4f}**" in run.data.tags["mlflow.note.content"]

    rows = read_csv(result.sweep_dir / "sweep_summary.csv")
    assert len(rows) == 4, rows
    by_run = {r.info.run_id: r for r in children}
    for row in rows:
        assert row["status"] == "FINISHED"
        run = by_run[row["mlflow_run_id"]]
        assert (row["quant.bits"], row["optim.lr"]) == (run.data.params["quant.bits"], run.data.params["optim.lr"])
        assert f"quant.bits={row['quant.bits']}" in row["overrides"]
        for key in FIGURES:
            assert float(row[key]) == pytest.approx(run.data.metrics[key]), key
    assert sorted(int(row["job"]) for row in rows) == [0, 1, 2, 3]
    assert is_png(result.sweep_dir / "sweep_summary.png")
    from PIL import Image

    with Image.open(result.sweep_dir / "sweep_summary.png") as image:
        image.verify()
    with Image.open(result.sweep_dir / "sweep_summary.png") as image:
        assert image.format == "PNG" and image.size[0] >= 400 and image.size[1] >= 200


def _summaries(result: Result) -> dict[tuple[str, str], dict]:
    out = {}
    for job_dir in sorted(p for p in result.sweep_dir.iterdir() if (p / "summary.json").is_file()):
        summary = json.loads((job_dir / "summary.json").read_text())
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()))
        out[(overrides["quant.bits"], overrides["optim.lr"])] = summary
    return out


# --------------------------------------------------------------------------------------------
# The basic launcher (every job in the launching process, one after another)


def test_basic_sweep_parent_children_and_summary(sweeps):
    _check_sweep(sweeps["basic"])


def test_basic_sweep_jobs_are_isolated(sweeps):
    """Jobs of the basic launcher share one process: each reseeds (the float phase, which neither
    bits nor lr touch, gives the same model in every job) and ends its run (nothing RUNNING)."""
    result = sweeps["basic"]
    assert result.returncode == 0, result.describe()
    summaries = _summaries(result)
    assert set(summaries) == {(b, lr) for b in ("2", "4") for lr in ("0.001", "0.0001")}
    assert len({s["float_acc"] for s in summaries.values()}) == 1, summaries
    assert len({s["mlflow_run_id"] for s in summaries.values()}) == 4
    _, _, runs = parent_and_children(result.uri)
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    assert "still active" not in result.stderr + result.stdout


# --------------------------------------------------------------------------------------------
# The parallel launcher (joblib, 2 worker processes)


@needs_joblib
def test_parallel_sweep_parent_children_and_summary(sweeps):
    result = sweeps["parallel"]
    _check_sweep(result)
    parent, children, _ = parent_and_children(result.uri)
    assert parent.data.tags["launcher"] == "JoblibLauncher"
    # two jobs ran at the same time: some pair of child runs overlaps in time
    spans = [(r.info.start_time, r.info.end_time) for r in children]
    assert any(a[0] < b[1] and b[0] < a[1] for a, b in itertools.combinations(spans, 2)), spans


@needs_joblib
def test_parallel_sweep_matches_basic(sweeps):
    """Separate processes or one shared process: the same job gives the same numbers."""
    basic, parallel = _summaries(sweeps["basic"]), _summaries(sweeps["parallel"])
    assert set(basic) == set(parallel)
    for key in basic:
        for figure in ("float_acc", "ptq_acc", "qat_acc", "int8_acc", "int8_bytes"):
            assert parallel[key][figure] == pytest.approx(basic[key][figure]), (key, figure)


# --------------------------------------------------------------------------------------------
# Submitit's local executor (the cluster launcher's code path, here) and a failing job


@pytest.fixture(scope="module")
def small_sweeps(tmp_path_factory, sweeps) -> dict[str, Result]:
    """After the 2x2 sweeps (2 cores): a 2-job submitit sweep and a sweep whose 2nd job fails."""
    tmp = tmp_path_factory.mktemp("small_sweeps")
    tiny = ["trainer.float_steps=20", "trainer.max_steps=4"]
    # a batch larger than the training set: known only once the job has loaded its data (a value
    # out of range, e.g. quant.bits=9, now stops the whole command before the sweep starts)
    jobs = {"failing": start_sweep(tmp, "failing", ["trainer.batch_size=16,5000", *tiny])}
    if _submitit_installed():
        jobs["submitit"] = start_sweep(tmp, "submitit", ["hydra/launcher=slurm_local", "quant.bits=4,8", *tiny])
    return {name: job.wait() for name, job in jobs.items()}


@needs_submitit
def test_submitit_local_sweep(small_sweeps):
    result = small_sweeps["submitit"]
    assert result.returncode == 0, result.describe()
    parent, children, runs = parent_and_children(result.uri)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["launcher"] == "LocalLauncher"
    assert len(runs) == 3 and len(children) == 2
    assert {r.info.status for r in children} == {"FINISHED"}
    assert sorted(r.data.params["quant.bits"] for r in children) == ["4", "8"]
    assert len(read_csv(result.sweep_dir / "sweep_summary.csv")) == 2
    assert is_png(result.sweep_dir / "sweep_summary.png")
    assert (result.sweep_dir / ".submitit").is_dir()


def test_failed_job_fails_parent_with_summary(small_sweeps):
    """trainer.batch_size=5000 is rejected in job 1 (digits has fewer training images): the sweep
    exits non-zero, the parent run ends FAILED (not RUNNING) and still carries the summary of the
    jobs there are."""
    result = small_sweeps["failing"]
    assert result.returncode != 0, result.describe()
    assert "trainer.batch_size=5000 is larger than the training set" in result.stderr, result.describe()
    parent, children, runs = parent_and_children(result.uri)
    assert parent.info.status == "FAILED"
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []
    assert [(r.data.params["trainer.batch_size"], r.info.status) for r in children] == [("16", "FINISHED")]
    rows = read_csv(result.sweep_dir / "sweep_summary.csv")
    assert [(row["trainer.batch_size"], row["status"]) for row in rows] == [("16", "FINISHED"), ("5000", "FAILED")]
    assert parent.data.metrics["jobs_failed"] == 1
    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient(tracking_uri=result.uri).list_artifacts(parent.info.run_id)}
    assert "sweep_summary.csv" in artifacts
