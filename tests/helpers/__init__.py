"""Helpers shared by the test suites (importable as `helpers`: pyproject.toml puts tests/ on the
path): `runner` (config composition, tiny datasets, `python -m qat_runner` in subprocesses),
`reliability` (a job scheduler, MLflow run states, leftover checks), `sweep` (sweeps in
subprocesses, a real `mlflow server`), `ui` (`mlflow ui` and headless Chromium) and `processes`
(the environment and ports those subprocesses get)."""
