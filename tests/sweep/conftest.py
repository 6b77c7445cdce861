"""Fixtures for the sweep tests (helpers in sweep_support.py)."""
from __future__ import annotations

import pytest

from sweep_support import MlflowServer


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (SQLite behind it, proxied artifacts), stopped after."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
