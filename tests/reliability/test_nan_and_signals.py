"""NaN loss and SIGTERM.

NaN/inf: the job stops at the step it happens with one `error:` line (exit 1), keeps the last
good checkpoint (finite weights, an earlier step), marks the MLflow run FAILED, ships nothing.
SIGTERM (as Ctrl-C): a checkpoint of the current step, the run KILLED, exit 130; resuming the
checkpoint finishes the job in that same MLflow run.
"""
from __future__ import annotations

import re
import signal

import pytest

from helpers.reliability import (INT8_FILE, assert_no_leftovers, load_checkpoint_file, mlflow_runs,
                                 one_error_line, run_status, summary, wait_for_log)

pytestmark = pytest.mark.slow


def _tensors(tree):
    import torch

    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


@pytest.fixture(scope="module")
def nan_job(rel_cli, tmp_path_factory):
    """The NaN job, started by the first test that asks for it (the SIGTERM test asks too, so both
    jobs run side by side); the NaN test waits for it."""
    base = tmp_path_factory.mktemp("nan")
    run_dir, outputs = base / "run", base / "store"
    job = rel_cli.start(["optim.lr=1e12", "trainer.checkpoint_every=1", f"hydra.run.dir={run_dir}"],
                        outputs, timeout=300)
    return job, run_dir, outputs


def test_sigterm_saves_checkpoint_marks_killed_and_resumes(rel_cli, tmp_path, nan_job):
    run_dir, resumed, outputs = tmp_path / "run", tmp_path / "resumed", tmp_path / "store"
    job = rel_cli.start(["trainer.max_steps=100000", "trainer.checkpoint_every=0", f"hydra.run.dir={run_dir}"],
                        outputs, timeout=300)
    wait_for_log(job, run_dir / "cli.log", r"QAT step 20/100000\b")
    job.proc.send_signal(signal.SIGTERM)
    result = job.wait()
    assert result.returncode == 130, result.describe()
    assert "interrupted" in result.stderr, result.describe()
    assert "Traceback" not in result.stderr + result.stdout, result.describe()
    checkpoint_file = run_dir / "checkpoints" / "last.pt"
    assert checkpoint_file.is_file(), "SIGTERM must save a checkpoint (checkpoint_every=0: only then)"
    checkpoint = load_checkpoint_file(checkpoint_file)
    step, run_id = checkpoint["step"], checkpoint["mlflow_run_id"]
    assert step >= 20, step
    assert run_status(outputs, run_id) == "KILLED"
    assert not (run_dir / INT8_FILE).exists()
    assert_no_leftovers(outputs, run_dir)

    result = rel_cli.run([f"trainer.max_steps={step + 20}", "trainer.checkpoint_every=0",
                          f"trainer.resume={run_dir}", f"hydra.run.dir={resumed}"], outputs, timeout=300)
    assert result.returncode == 0, result.describe()
    assert f"at QAT step {step}" in (resumed / "cli.log").read_text()
    assert summary(resumed)["mlflow_run_id"] == run_id
    assert mlflow_runs(outputs) == {run_id: "FINISHED"}, "the resumed job continues the killed run"


def test_nan_loss_stops_with_error_and_keeps_last_good_checkpoint(nan_job):
    job, run_dir, outputs = nan_job
    result = job.wait()
    assert result.returncode == 1, result.describe()
    line = one_error_line(result)
    assert re.search(r"\bnan\b", line, re.IGNORECASE), line
    match = re.search(r"\bstep (\d+)\b", line)
    assert match, f"the error must name the step: {line}"
    nan_step = int(match.group(1))
    assert 1 <= nan_step <= 10, f"lr=1e12 makes the loss NaN within a few QAT steps: {line}"
    assert "lower optim.lr" in line, f"the learning rate is the cause here: {line}"
    assert not (run_dir / INT8_FILE).exists()
    assert_no_leftovers(outputs, run_dir)

    checkpoint_file = run_dir / "checkpoints" / "last.pt"
    assert checkpoint_file.is_file(), "checkpoint_every=1 keeps the last good step"
    assert str(checkpoint_file) in line, f"the error should point at the last good checkpoint: {line}"
    checkpoint = load_checkpoint_file(checkpoint_file)  # weights_only=True
    assert checkpoint["step"] < nan_step, (checkpoint["step"], nan_step)
    for key in ("qat_model", "float_model"):
        tensors = [t for t in _tensors(checkpoint[key]) if t.is_floating_point()]
        assert tensors and all(bool(t.isfinite().all()) for t in tensors), f"{key} holds NaN/inf"
    assert run_status(outputs, checkpoint["mlflow_run_id"]) == "FAILED"
