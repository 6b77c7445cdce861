"""Fashion-MNIST smoke run from Debian's dataset-fashion-mnist IDX files (skipped without them)."""
from __future__ import annotations

import json

import pytest

from helpers.runner import (FASHION_ROOT, FASHION_TRAIN_IMAGES, RUN_FILES_INT8, SUMMARY,
                            SUMMARY_KEYS, fashion_available, run_dirs, running_mlflow_runs)

pytestmark = pytest.mark.slow


def test_fashion_mnist_smoke(qat_cli, tmp_path):
    if not fashion_available():
        pytest.skip(f"{FASHION_TRAIN_IMAGES} is missing: apt-get install dataset-fashion-mnist "
                    f"(IDX files in {FASHION_ROOT})")
    outputs = tmp_path / "out"
    # float_lr 0.01: at the default 0.05 this LeNet's 100-300 float steps land anywhere from 38% to
    # 77% depending on seed and CPU (measured on AMD EPYC); 200 steps at 0.01 gave 81-83%.
    result = qat_cli.run(["dataset=fashion_mnist", "dataset.train_limit=2000", "dataset.test_limit=500",
                          "trainer.float_steps=200", "trainer.float_lr=0.01", "trainer.max_steps=10"],
                         outputs, timeout=300)
    assert result.returncode == 0, result.describe()
    dirs = run_dirs(outputs)
    assert len(dirs) == 1, dirs
    run_dir = dirs[0]
    summary = json.loads((run_dir / SUMMARY).read_text())
    assert SUMMARY_KEYS <= summary.keys(), SUMMARY_KEYS - summary.keys()
    assert summary["float_acc"] > 0.5, summary
    assert summary["int8_agreement"] >= 0.99, summary
    assert 0.0 <= summary["int8_acc"] <= 1.0
    assert summary["test_samples"] == 500, "dataset.test_limit bounds the evaluation"
    assert summary["bits"] == 8
    assert summary["int8_bytes"] < summary["float_bytes"]
    assert (run_dir / RUN_FILES_INT8).is_file()
    assert running_mlflow_runs(outputs) == []
