"""Helpers for the MLflow UI tests: a real `mlflow ui` on 127.0.0.1 and headless Chromium (Debian's
`chromium` package) that renders its pages to a DOM dump and a screenshot."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .processes import clean_env, free_port, wait_for_health

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# No network beyond the page's own host, no first-run or background work, a throw-away profile.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1920,1080")


def find_chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def _stop_group(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group we started (its own session), then SIGKILL what is left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class MlflowUi:
    """`mlflow ui --backend-store-uri URI` on 127.0.0.1:<free port>: the command a run prints."""

    def __init__(self, uri: str, base: Path) -> None:
        self.uri, self.base, self.port = uri, base, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = base / "mlflow_ui.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowUi:
        env = clean_env(self.base)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job consumer processes for a test
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", self.uri, "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            cwd=self.base, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 150.0) -> None:
        """Until /health answers (imports take a while on a busy 2-core machine)."""
        wait_for_health(self.proc, self.url, self.log, timeout, "mlflow ui")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_group(self.proc)
            self._log.close()
            self.proc = None


@dataclass
class Page:
    url: str
    dom: str
    screenshot: Path

    def text_shows(self, text: str) -> bool:
        return text in self.dom


def render(chromium: str, url: str, screenshot: Path, budget_ms: int = 20000, timeout: float = 120.0) -> Page:
    """The page after its scripts ran (virtual time: network fetches hold the clock, so the data is
    in), as a DOM dump, and a screenshot of the 1920x1080 window at `screenshot`."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
               f"--screenshot={screenshot}", "--dump-dom", url]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            dom, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc, grace=5)
            raise RuntimeError(f"chromium did not finish {url} in {timeout} s") from None
    if proc.returncode != 0 or not dom.strip():
        raise RuntimeError(f"chromium failed on {url} (exit {proc.returncode}):\n{err[-3000:]}")
    return Page(url, dom, screenshot)
