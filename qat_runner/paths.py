"""Where the project keeps its files (config tree, outputs): no Hydra here, so the benchmark and
the tracking code find them without it (`config.py` re-exports these names)."""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent  # the checkout, when running from one


def in_checkout() -> bool:
    """True when the package runs from a source checkout (editable install or PYTHONPATH)."""
    return (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "conf" / "config.yaml").is_file()


def config_dir() -> Path:
    """The config tree: the checkout's top-level conf/, or the copy a wheel ships in the package."""
    return PROJECT_ROOT / "conf" if in_checkout() else PACKAGE_DIR / "conf"


def default_outputs() -> Path:
    """The checkout's outputs/ (whatever the working directory), else ./outputs of the working
    directory: an installed package must not write into site-packages."""
    return PROJECT_ROOT / "outputs" if in_checkout() else Path.cwd() / "outputs"
