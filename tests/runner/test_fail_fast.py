"""Fail fast: a job that cannot succeed stops within seconds, before training, with one line
on stderr that names the bad value and says how to fix it; it leaves no artifact and no MLflow
run in RUNNING state."""
from __future__ import annotations

import re

import pytest

from helpers.runner import RUN_FILES_INT8, CliResult, make_imagefolder, running_mlflow_runs


def _assert_nothing_left_running(result: CliResult) -> None:
    outputs = result.outputs
    assert list(outputs.rglob(RUN_FILES_INT8)) == [], "a failed job must not ship an artifact"
    assert list(outputs.rglob("summary.json")) == []
    assert running_mlflow_runs(outputs) == [], "a failed job left an MLflow run RUNNING"


def _one_error_line(result: CliResult) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.describe()
    assert lines[0].startswith("error: "), result.describe()
    return lines[0]


# --------------------------------------------------------------------------------------------
# The MobileNetV2 recipe without ImageNet or its weights


def test_mobilenetv2_without_dataset_root(qat_cli, tmp_path):
    outputs = tmp_path / "out"
    result = qat_cli.run(["+experiment=mobilenetv2"], outputs, timeout=120)
    assert result.returncode != 0, result.describe()
    assert result.seconds < 60, f"took {result.seconds:.1f} s to fail"
    assert "dataset.root" in result.stderr, result.describe()
    assert re.search(r"dataset\.root=\S", result.stderr), "must say how to provide it: dataset.root=..."
    assert result.returncode == 2
    _one_error_line(result)
    _assert_nothing_left_running(result)


def test_mobilenetv2_without_weights(qat_cli, tmp_path):
    root = make_imagefolder(tmp_path / "imagenet", classes=("only",), per_class=1, size=8)
    outputs = tmp_path / "out"
    result = qat_cli.run(["+experiment=mobilenetv2", f"dataset.root={root}", "dataset.num_classes=1"],
                         outputs, timeout=120)
    assert result.returncode != 0, result.describe()
    assert result.seconds < 60, f"took {result.seconds:.1f} s to fail"
    err = result.stderr
    assert "dataset.root" not in err, "the dataset is fine now: " + err
    assert "model.weights" in err, result.describe()
    # names the missing weights file (TORCH_HOME is an empty folder for these jobs)
    assert re.search(r"mobilenet_v2-\w+\.pth", err), err
    assert str(qat_cli.torch_home) in err, err
    # and says how to provide it
    assert re.search(r"model\.weights=(/|PATH)", err), err
    assert result.returncode == 2
    _one_error_line(result)
    _assert_nothing_left_running(result)


# Bad values (bits, momentum, model names, batch size, Hydra's schema errors, targets, ...) are rows
# of the bad-input matrix in tests/reliability/test_bad_input_matrix.py: one place for all of them.
