"""Helpers for the Hydra runner tests (imported by tests/runner/conftest.py and the test modules):
config paths, tiny ImageFolder trees, and `python -m qat_runner` in subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from qat_runner import config as qat_config

CONF_DIR = qat_config.PROJECT_ROOT / "conf"
EXPERIMENT_FILES = sorted((CONF_DIR / "experiment").glob("*.yaml"))
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_TRAIN_IMAGES = FASHION_ROOT / "train-images-idx3-ubyte.gz"

RUN_FILES_INT8, RUN_FILES_FLOAT, SUMMARY = "model.int8.onnx", "model.float.onnx", "summary.json"
SUMMARY_KEYS = {"float_acc", "ptq_acc", "qat_acc", "int8_acc", "int8_agreement", "float_bytes",
                "int8_bytes", "bits", "feature_bits", "mlflow_run_id", "train_seconds"}


def fashion_available() -> bool:
    return FASHION_TRAIN_IMAGES.is_file()


# --------------------------------------------------------------------------------------------
# Config composition (Hydra's compose API, as in lightning-hydra-template's tests)


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False):
    """The composed DictConfig, through Hydra's compose API (schema registered first)."""
    from hydra import compose, initialize_config_dir

    qat_config.register()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test_runner"):
        return compose(config_name="config", overrides=list(overrides),
                       return_hydra_config=return_hydra_config)


# --------------------------------------------------------------------------------------------
# Tiny ImageFolder trees


def make_imagefolder(root: Path, classes: Sequence[str] = ("a", "b"), per_class: int = 2,
                     size: int = 12) -> Path:
    """root/train/<class>/*.png and root/val/<class>/*.png with small RGB PNGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.png")
    return root


# --------------------------------------------------------------------------------------------
# IDX files (the MNIST family's format)


def write_idx(path: Path, array) -> Path:
    """Write a uint8 array as an IDX file; gzip-compressed when the name ends in .gz."""
    import gzip

    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_fashion_root(root: Path, n_train: int = 12, n_test: int = 6, gz: bool = True):
    """A Fashion-MNIST-shaped folder: the four IDX files with random 28x28 images."""
    import numpy as np

    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 10)
    return root


# --------------------------------------------------------------------------------------------
# The CLI in a subprocess


@dataclass
class CliResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    outputs: Path | None

    def describe(self) -> str:
        """For assertion messages: the command and the tail of its output."""
        return (f"`python -m qat_runner {' '.join(self.args)}` -> rc {self.returncode} in "
                f"{self.seconds:.1f} s\n--- stderr (tail) ---\n{self.stderr[-3000:]}\n"
                f"--- stdout (tail) ---\n{self.stdout[-2000:]}")


class CliJob:
    """A started `python -m qat_runner` subprocess, output captured to files (no pipe stalls)."""

    def __init__(self, args: Sequence[str], cwd: Path, log_dir: Path, env: dict[str, str],
                 outputs: Path | None, timeout: float) -> None:
        self.args, self.outputs, self.timeout = list(args), outputs, timeout
        log_dir.mkdir(parents=True, exist_ok=True)
        self._out_path, self._err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
        self._out, self._err = open(self._out_path, "w"), open(self._err_path, "w")
        self.start = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "qat_runner", *self.args], cwd=cwd,
                                     stdout=self._out, stderr=self._err, env=env,
                                     stdin=subprocess.DEVNULL)

    def wait(self) -> CliResult:
        try:
            remaining = max(1.0, self.timeout - (time.monotonic() - self.start))
            returncode = self.proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            returncode = None
        seconds = time.monotonic() - self.start
        self._out.close()
        self._err.close()
        result = CliResult(self.args, returncode if returncode is not None else -999,
                           self._out_path.read_text(errors="replace"),
                           self._err_path.read_text(errors="replace"), seconds, self.outputs)
        if returncode is None:
            pytest.fail(f"timed out after {self.timeout} s\n{result.describe()}")
        return result


class QatCli:
    """Start/run the CLI with a clean environment: one intra-op thread (tiny models on a 2-core
    machine run several times faster), an empty TORCH_HOME (no weights can be found by accident),
    no HYDRA_FULL_ERROR (Hydra's short error) and no MLFLOW_TRACKING_URI from the caller."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.torch_home = base / "torch_home"
        self.torch_home.mkdir(parents=True, exist_ok=True)
        self._count = 0

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        env["TORCH_HOME"] = str(self.torch_home)
        env["PYTHONUNBUFFERED"] = "1"
        for key in ("HYDRA_FULL_ERROR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME",
                    "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
            env.pop(key, None)
        return env

    def start(self, args: Sequence[str], outputs: Path | None = None, cwd: Path | None = None,
              timeout: float = 300.0) -> CliJob:
        """`outputs` (when given) is appended as paths.outputs=...; cwd defaults to a fresh folder."""
        self._count += 1
        job_dir = self.base / f"job{self._count:03d}"
        if cwd is None:
            cwd = job_dir / "cwd"
            cwd.mkdir(parents=True, exist_ok=True)
        full = list(args) + ([f"paths.outputs={outputs}"] if outputs is not None else [])
        return CliJob(full, cwd, job_dir / "logs", self.env(), outputs, timeout)

    def run(self, args: Sequence[str], outputs: Path | None = None, cwd: Path | None = None,
            timeout: float = 300.0) -> CliResult:
        return self.start(args, outputs, cwd, timeout).wait()


def run_dirs(outputs: Path, experiment: str = "*") -> list[Path]:
    return sorted(p for p in (outputs / "runs").glob(f"{experiment}/*") if p.is_dir())


def running_mlflow_runs(outputs: Path) -> list[str]:
    """Ids of runs left RUNNING in the job's MLflow store (none when the store was never made)."""
    db = outputs / "mlflow.db"
    if not db.exists():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    return [r.info.run_id for r in client.search_runs(experiments)
            if r.info.status == "RUNNING"]


def run_many(cli: QatCli, jobs: dict[str, tuple[Sequence[str], Path | None]], concurrency: int = 3,
             timeout: float = 300.0) -> dict[str, CliResult]:
    """Run several CLI jobs, at most `concurrency` at a time; results by key."""
    pending, running, results = list(jobs.items()), [], {}
    while pending or running:
        while pending and len(running) < concurrency:
            key, (args, outputs) = pending.pop(0)
            running.append((key, cli.start(args, outputs, timeout=timeout)))
        key, job = running.pop(0)
        results[key] = job.wait()
    return results
