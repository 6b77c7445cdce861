"""Fixtures for the reliability tests (bad input, interruption and resume, determinism, safe
loading). The subprocess helpers come from tests/runner/runner_support.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

_RUNNER_TESTS = Path(__file__).resolve().parent.parent / "runner"
if str(_RUNNER_TESTS) not in sys.path:  # runner_support lives beside the runner tests
    sys.path.insert(0, str(_RUNNER_TESTS))

from runner_support import QatCli  # noqa: E402


@pytest.fixture(scope="session")
def rel_cli(tmp_path_factory: pytest.TempPathFactory) -> QatCli:
    """Starts `python -m qat_runner` subprocesses: OMP_NUM_THREADS=1, an empty TORCH_HOME, no
    MLFLOW_* or HYDRA_FULL_ERROR from the caller (see runner_support.QatCli)."""
    return QatCli(tmp_path_factory.mktemp("reliability_cli"))
