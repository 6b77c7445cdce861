"""Fixtures for the sweep tests (helpers in tests/helpers/sweep.py)."""
from __future__ import annotations

import pytest

from helpers.sweep import MlflowServer


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite behind it, proxied artifacts), stopped after."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
