"""`_target_` allowlist: a `_target_` may name only the callables on the list (qat_runner/targets.py:
our builders and callbacks, torch's optimizers and schedulers, torchvision's model builders) or a
package the config allows (`security.allowed_targets`), at the top of a node or nested inside it
(hydra.utils.instantiate builds nested `_target_` nodes recursively). Whole namespaces are not
enough: `torch.*` holds ways to run arbitrary code (the escapes below)."""
from __future__ import annotations

import pytest

from helpers.reliability import Job, assert_no_leftovers, assert_no_training, one_error_line, run_jobs
from helpers.runner import compose_config

from qat_runner.config import ConfigError, validate
from qat_runner.preflight import command_line_error

TOP_LEVEL = {"model": "os.system", "dataset": "builtins.eval", "optim": "subprocess.call"}
NEAR_MISSES = ["torchx.evil", "qat_runner_evil.build", "torchvision_extra.models.build", "os.path.join",
               "qat_runner.engine.files.write_atomically", "torchvision.io.write_file"]
# Callables inside the once-allowed torch namespace that run code from files or strings.
ESCAPES = {
    "torch.hub.load": ["+model.repo_or_dir=/tmp", "+model.model=lenet", "+model.source=local"],
    "torch.utils.cpp_extension.load_inline": ["+model.cpp_sources=int_x"],
    "torch.load": ["+model.f=/tmp/x.pt", "+model.weights_only=false"],
    "torch.jit.load": ["+model.f=/tmp/x.pt"],
    "torch.package.PackageImporter": ["+model.file_or_buffer=/tmp/x.pt"],
}
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


@pytest.mark.parametrize("overrides", [[], ["optim=adam"], ["model=torchvision", "dataset=fake"],
                                       ["optim._target_=torch.optim.AdamW"],
                                       ["model=torchvision", "model._target_=torchvision.models.resnet18"]],
                         ids=["default", "adam", "torchvision_fake", "adamw", "torchvision_builder"])
def test_validate_accepts_allowed_targets(overrides):
    validate(compose_config(overrides))


@pytest.mark.parametrize("target", list(ESCAPES))
def test_known_escapes_are_refused_in_one_line_before_anything_runs(target):
    """What Hydra's preflight sees for `python -m qat_runner model._target_=<escape> ...`."""
    line = command_line_error([f"model._target_={target}", *ESCAPES[target]])
    assert line is not None and "\n" not in line, line
    assert f"model._target_='{target}' is not accepted" in line, line
    assert "security.allowed_targets" in line, f"the line must say how to allow a package: {line}"


def test_allowed_targets_admit_a_named_package_only():
    cfg = compose_config(["model=module", "model._target_=my_pkg.nets.Net", "security.allowed_targets=[my_pkg]"])
    validate(cfg)
    cfg = compose_config(["model=module", "model._target_=my_pkgx.nets.Net", "security.allowed_targets=[my_pkg]"])
    with pytest.raises(ConfigError, match=r"my_pkgx\.nets\.Net"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"security\.allowed_targets entry 'my pkg'"):
        validate(compose_config(["security.allowed_targets=['my pkg']"]))


def test_hydra_logging_classes_are_checked_too():
    line = command_line_error(["hydra.job_logging.handlers.console.class=subprocess.Popen"])
    assert line is not None and "hydra.job_logging.handlers.console.class='subprocess.Popen'" in line, line


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


@pytest.mark.slow
def test_cli_refuses_torch_hub_load_without_running_hubconf(rel_cli, tmp_path):
    """The measured escape: torch.hub.load imported and ran DIR/hubconf.py (its marker appeared)."""
    repo, marker = tmp_path / "repo", tmp_path / "hubconf_ran"
    repo.mkdir()
    (repo / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef lenet(**kw):\n    raise SystemExit\n")
    result = rel_cli.run(["model._target_=torch.hub.load", f"+model.repo_or_dir={repo}", "+model.model=lenet",
                          "+model.source=local", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path / "store", timeout=180)
    assert not marker.exists(), f"hubconf.py ran\n{result.describe()}"
    assert result.returncode == 2, result.describe()
    assert "model._target_='torch.hub.load' is not accepted" in one_error_line(result)
    assert_no_leftovers(tmp_path / "store")


USER_PACKAGE = '''
from torch import nn


class Net(nn.Module):
    """A user's own model: its constructor takes num_classes and a key of its own."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(width * 16, num_classes))

    def forward(self, x):
        return self.body(x)
'''


@pytest.mark.slow
def test_model_module_runs_a_users_class_once_its_package_is_allowed(rel_cli, tmp_path):
    import json

    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "nets.py").write_text(USER_PACKAGE)
    args = ["model=module", "model._target_=my_pkg.nets.Net", "+model.width=4", "trainer.float_steps=30",
            "trainer.max_steps=5"]
    refused = rel_cli.run([*args, f"hydra.run.dir={tmp_path / 'refused'}"], tmp_path / "store0", cwd=tmp_path)
    assert refused.returncode == 2 and "security.allowed_targets" in one_error_line(refused), refused.describe()
    result = rel_cli.run([*args, "security.allowed_targets=[my_pkg]", f"hydra.run.dir={tmp_path / 'run'}"],
                         tmp_path / "store", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.describe()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["quantized_layers"] == 2 and summary["int8_agreement"] >= 0.99, summary
