"""Fixtures for the Hydra runner tests; the helpers themselves live in tests/helpers/runner.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers.runner import QatCli, compose_config, make_imagefolder


@pytest.fixture
def compose_cfg():
    """compose_cfg(overrides, return_hydra_config=False) -> the composed DictConfig."""
    return compose_config


@pytest.fixture
def tiny_imagefolder(tmp_path: Path) -> Path:
    """Two classes (a, b), two 12x12 RGB PNGs per class and split."""
    return make_imagefolder(tmp_path / "imagefolder")


@pytest.fixture(scope="session")
def qat_cli(tmp_path_factory: pytest.TempPathFactory) -> QatCli:
    """Starts `python -m qat_runner` subprocesses (see QatCli for the environment they get)."""
    return QatCli(tmp_path_factory.mktemp("qat_cli"))
