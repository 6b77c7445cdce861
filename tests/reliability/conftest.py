"""Fixtures for the reliability tests (bad input, interruption and resume, determinism, safe
loading). The subprocess helpers come from tests/helpers/runner.py."""
from __future__ import annotations

import pytest

from helpers.runner import QatCli


@pytest.fixture(scope="session")
def rel_cli(tmp_path_factory: pytest.TempPathFactory) -> QatCli:
    """Starts `python -m qat_runner` subprocesses: OMP_NUM_THREADS=1, an empty TORCH_HOME, no
    MLFLOW_* or HYDRA_FULL_ERROR from the caller (see helpers.runner.QatCli)."""
    return QatCli(tmp_path_factory.mktemp("reliability_cli"))
