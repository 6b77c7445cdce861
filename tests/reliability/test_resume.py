"""Kill and resume: a job killed with SIGKILL after a checkpoint and resumed with
`trainer.resume=<run dir>` ends exactly like an uninterrupted job with the same seed (same
accuracies, byte-identical int8 artifact), in the same MLflow run, which ends FINISHED."""
from __future__ import annotations

import signal

import pytest

from helpers.reliability import (COMPARED_SUMMARY_KEYS, INT8_FILE, assert_no_leftovers,
                                 load_checkpoint_file, mlflow_runs, run_status, sha256, summary,
                                 wait_for_log)

pytestmark = pytest.mark.slow

MAX_STEPS = 1500  # long enough for the poll to catch the checkpoint at step 200 well before the end
ARGS = [f"trainer.max_steps={MAX_STEPS}", "trainer.checkpoint_every=100"]
KILL_AFTER = r"checkpoint at step 200\b"


def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(rel_cli, tmp_path):
    full, killed, resumed = tmp_path / "full", tmp_path / "killed", tmp_path / "resumed"
    store_full, store = tmp_path / "store_full", tmp_path / "store"

    # A (uninterrupted) and B (to be killed) side by side
    job_a = rel_cli.start([*ARGS, f"hydra.run.dir={full}"], store_full, timeout=400)
    job_b = rel_cli.start([*ARGS, f"hydra.run.dir={killed}"], store, timeout=400)
    wait_for_log(job_b, killed / "cli.log", KILL_AFTER)
    job_b.proc.send_signal(signal.SIGKILL)
    result_b = job_b.wait()
    assert result_b.returncode == -signal.SIGKILL, (
        f"B must die by SIGKILL (if it finished first, raise MAX_STEPS)\n{result_b.describe()}")
    checkpoint_file = killed / "checkpoints" / "last.pt"
    assert checkpoint_file.is_file(), "no checkpoint after 'checkpoint at step 200' was logged"
    assert not (killed / INT8_FILE).exists(), "B was killed before the export"
    checkpoint = load_checkpoint_file(checkpoint_file)
    assert 200 <= checkpoint["step"] < MAX_STEPS, checkpoint["step"]
    run_id_b = checkpoint["mlflow_run_id"]
    assert run_status(store, run_id_b) == "RUNNING", "SIGKILL leaves no chance to end the run"

    # C resumes B, while A may still be running
    job_c = rel_cli.start([*ARGS, f"trainer.resume={killed}", f"hydra.run.dir={resumed}"], store,
                          timeout=400)
    result_c = job_c.wait()
    result_a = job_a.wait()
    assert result_a.returncode == 0, result_a.describe()
    assert result_c.returncode == 0, result_c.describe()
    assert f"at QAT step {checkpoint['step']}" in (resumed / "cli.log").read_text(), \
        "C must continue from B's checkpoint, not start over"

    summary_a, summary_c = summary(full), summary(resumed)
    differing = {k: (summary_a[k], summary_c[k]) for k in COMPARED_SUMMARY_KEYS if summary_a[k] != summary_c[k]}
    assert differing == {}, f"resumed != uninterrupted: {differing}"
    assert sha256(resumed / INT8_FILE) == sha256(full / INT8_FILE), "int8 artifacts differ"

    # the same MLflow run, continued and finished; no second run was opened
    assert summary_c["mlflow_run_id"] == run_id_b
    runs = mlflow_runs(store)
    assert runs == {run_id_b: "FINISHED"}, runs
    assert_no_leftovers(store)
