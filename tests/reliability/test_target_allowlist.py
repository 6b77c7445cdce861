"""`_target_` allowlist: no `_target_` given on the command line reaches anything but the
project's (qat_runner.), torch's and torchvision's namespaces, at the top of a node or nested
inside it (hydra.utils.instantiate builds nested `_target_` nodes recursively)."""
from __future__ import annotations

import pytest

from reliability_support import Job, assert_no_leftovers, assert_no_training, one_error_line, run_jobs
from runner_support import compose_config

from qat_runner.config import ConfigError, validate

TOP_LEVEL = {"model": "os.system", "dataset": "builtins.eval", "optim": "subprocess.call"}
NEAR_MISSES = ["torchx.evil", "qat_runner_evil.build", "torchvision_extra.models.build", "os.path.join"]
FAIL_FAST_SECONDS = 60.0
# Nested targets that would run if they were instantiated: os.makedirs leaves a canary folder.
# While the bypass exists, a job that is not refused stops cheaply: batch_size=5000 is refused
# right after the dataset and the model are built (the canary is made by then), with an error
# line that does not name os.makedirs; Hydra makes its callbacks before the job starts, and
# quant.bits=9 ends the job right then.
CHEAP = {"model": ["trainer.batch_size=5000"], "dataset": ["trainer.batch_size=5000"],
         "optim": ["trainer.float_steps=0", "trainer.max_steps=1"],
         "hydra.callbacks": ["quant.bits=9"]}


# --------------------------------------------------------------------------------------------
# validate() on composed configs (no subprocess)


@pytest.mark.parametrize("node", list(TOP_LEVEL))
def test_validate_refuses_top_level_target(node):
    target = TOP_LEVEL[node]
    cfg = compose_config([f"{node}._target_={target}"])
    with pytest.raises(ConfigError, match=rf"{node}\._target_='?{target}"):
        validate(cfg)


@pytest.mark.parametrize("target", NEAR_MISSES)
def test_validate_refuses_lookalike_prefixes(target):
    with pytest.raises(ConfigError, match=target):
        validate(compose_config([f"model._target_={target}"]))


@pytest.mark.parametrize("node", ["model", "dataset", "optim"])
def test_validate_refuses_nested_target(node, tmp_path):
    cfg = compose_config([f"+{node}.canary._target_=os.makedirs", f"+{node}.canary.name={tmp_path / 'x'}"])
    with pytest.raises(ConfigError, match=r"os\.makedirs"):
        validate(cfg)


@pytest.mark.parametrize("overrides", [[], ["optim=adam"], ["model=torchvision", "dataset=fake"]],
                         ids=["default", "adam", "torchvision_fake"])
def test_validate_accepts_allowed_targets(overrides):
    validate(compose_config(overrides))


# --------------------------------------------------------------------------------------------
# The CLI


@pytest.fixture(scope="module")
def cli_results(rel_cli, tmp_path_factory):
    base = tmp_path_factory.mktemp("targets")
    jobs, canaries = {}, {}
    for node, target in TOP_LEVEL.items():
        jobs[f"top:{node}"] = Job([f"{node}._target_={target}", f"hydra.run.dir={base / node / 'run'}"],
                                  base / node / "store", timeout=180)
    for node in ("model", "dataset", "optim", "hydra.callbacks"):
        canaries[node] = base / f"canary_{node}"
        jobs[f"nested:{node}"] = Job(
            [f"+{node}.canary._target_=os.makedirs", f"+{node}.canary.name={canaries[node]}", *CHEAP[node],
             f"hydra.run.dir={base / ('nested_' + node) / 'run'}"], base / f"nested_{node}" / "store",
            timeout=240)
    return run_jobs(rel_cli, jobs), canaries, base


@pytest.mark.slow
@pytest.mark.parametrize("node", list(TOP_LEVEL))
def test_cli_refuses_top_level_target(cli_results, node):
    results, _canaries, base = cli_results
    result, target = results[f"top:{node}"], TOP_LEVEL[node]
    assert result.returncode == 2, result.describe()
    line = one_error_line(result)
    assert f"{node}._target_" in line and target in line, line
    assert all(ns in line for ns in ("qat_runner", "torch", "torchvision")), \
        f"the error should say which namespaces are accepted: {line}"
    assert_no_training(result)
    assert result.seconds < FAIL_FAST_SECONDS, f"took {result.seconds:.1f} s"
    assert_no_leftovers(base / node)


@pytest.mark.slow
@pytest.mark.parametrize("node", ["model", "dataset", "optim"])
def test_cli_refuses_nested_target(cli_results, node):
    results, canaries, base = cli_results
    result = results[f"nested:{node}"]
    assert not canaries[node].exists(), \
        f"+{node}.canary._target_=os.makedirs was called (it made {canaries[node]})\n{result.describe()}"
    assert result.returncode == 2, result.describe()
    line = one_error_line(result)
    assert "os.makedirs" in line, line
    assert_no_training(result)
    assert_no_leftovers(base / f"nested_{node}")


@pytest.mark.slow
def test_cli_refuses_hydra_callback_target(cli_results):
    """hydra.callbacks.<name>._target_ is instantiated by Hydra itself, before the job."""
    results, canaries, _base = cli_results
    result = results["nested:hydra.callbacks"]
    assert not canaries["hydra.callbacks"].exists(), \
        f"+hydra.callbacks.canary._target_=os.makedirs was called\n{result.describe()}"
    assert result.returncode != 0, result.describe()
    assert "os.makedirs" in result.stderr, result.describe()
