"""Determinism: the same config and seed twice gives identical summary accuracies and a
byte-identical int8 artifact; another seed gives another artifact (the check can fail)."""
from __future__ import annotations

import pytest

from helpers.reliability import COMPARED_SUMMARY_KEYS, INT8_FILE, Job, run_jobs, sha256, summary

pytestmark = pytest.mark.slow

ARGS = ["trainer.max_steps=50"]


@pytest.fixture(scope="module")
def runs(rel_cli, tmp_path_factory):
    base = tmp_path_factory.mktemp("determinism")
    jobs = {name: Job([*ARGS, *extra, f"hydra.run.dir={base / name}"], base / f"store_{name}")
            for name, extra in (("first", ["seed=0"]), ("second", ["seed=0"]), ("other_seed", ["seed=1"]))}
    results = run_jobs(rel_cli, jobs)
    for result in results.values():
        assert result.returncode == 0, result.describe()
    return {name: base / name for name in jobs}


def test_same_seed_same_summary_and_artifact(runs):
    first, second = summary(runs["first"]), summary(runs["second"])
    assert {k: first[k] for k in COMPARED_SUMMARY_KEYS} == {k: second[k] for k in COMPARED_SUMMARY_KEYS}
    assert first["mlflow_run_id"] != second["mlflow_run_id"], "two jobs, two MLflow runs"
    assert sha256(runs["first"] / INT8_FILE) == sha256(runs["second"] / INT8_FILE), \
        "the same config and seed must give a byte-identical int8 artifact"


def test_other_seed_other_artifact(runs):
    assert sha256(runs["first"] / INT8_FILE) != sha256(runs["other_seed"] / INT8_FILE), \
        "seed=1 gave the same artifact as seed=0: the determinism check could never fail"
