"""The package works installed from a wheel, not only from a checkout: the config tree ships inside
the wheel and outputs go to ./outputs of the working directory."""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from qat_runner import config as qat_config
from helpers.runner import QatCli, SUMMARY, run_dirs, running_mlflow_runs

ROOT = qat_config.PROJECT_ROOT


def test_pyproject_lists_every_package_and_the_config_tree():
    """`packages` is listed by hand (the conf/ mapping needs it): a new subpackage must be added."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "qat_runner").rglob("__init__.py")}
    assert on_disk | {"qat_runner.conf"} == set(setuptools["packages"])
    assert setuptools["package-dir"] == {"qat_runner.conf": "conf"}


def test_checkout_finds_its_own_config_tree_and_outputs():
    assert qat_config.in_checkout()
    assert qat_config.config_dir() == ROOT / "conf"
    assert qat_config.default_outputs() == ROOT / "outputs"


@pytest.mark.slow
def test_wheel_installs_and_runs_the_default_from_an_empty_directory(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-index", "-q", "-w", str(wheels), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("qat_runner-*.whl")

    # A fresh environment with the wheel installed (not editable); the dependencies come from this
    # environment's site-packages through a .pth line, which does not run this checkout's
    # editable-install hook, so only the wheel's copy of qat_runner can be imported.
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_qat_runner_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                              "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]

    workdir = tmp_path / "empty"
    workdir.mkdir()
    env = QatCli(tmp_path / "cli").env()
    env.pop("PYTHONPATH", None)
    where = subprocess.run([str(python), "-c", "import qat_runner.config as c; print(c.__file__); "
                            "print(c.in_checkout()); print(c.config_dir())"],
                           cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    module_file, in_checkout, conf = where.stdout.split()
    assert Path(module_file).is_relative_to(site), "the wheel's copy must be the one imported"
    assert in_checkout == "False"
    assert Path(conf) == site / "qat_runner" / "conf" and (Path(conf) / "config.yaml").is_file()

    result = subprocess.run([str(python), "-m", "qat_runner"], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = workdir / "outputs"
    (run_dir,) = run_dirs(outputs)
    summary = json.loads((run_dir / SUMMARY).read_text())
    assert summary["int8_agreement"] >= 0.99 and summary["int8_acc"] > 0.5, summary
    assert (outputs / "mlflow.db").is_file() and running_mlflow_runs(outputs) == []
    assert not (site / "outputs").exists(), "nothing may be written into site-packages"
