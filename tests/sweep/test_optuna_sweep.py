"""hydra/sweeper=optuna: an Optuna study over the bit width (choice) and lr (log interval) that
maximises the int8 artifact accuracy the jobs return. One MLflow parent run, one child run per
trial; the best trial is named in the parent's tags, metrics and description, the CSV, and agrees
with the sweeper's own optimization_results.yaml."""
from __future__ import annotations

import math

import pytest
import yaml

from helpers.sweep import Result, is_png, parent_and_children, read_csv, start_sweep

try:
    import hydra_plugins.hydra_optuna_sweeper  # noqa: F401
    OPTUNA = True
except ImportError:
    OPTUNA = False

pytestmark = pytest.mark.skipif(not OPTUNA, reason="hydra-optuna-sweeper missing: pip install -e '.[sweep]'")

LR_LOW, LR_HIGH = 1e-4, 1e-1
TRIALS = ["hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "quant.bits=choice(4,8)",
          f"optim.lr=tag(log, interval({LR_LOW}, {LR_HIGH}))", "dataset=digits",
          "trainer.float_steps=30", "trainer.max_steps=5"]


def compose(overrides):
    """The config as Hydra composes it for a multirun with these overrides (hydra node included)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from qat_runner import config as qat_config

    qat_config.register()
    with initialize_config_dir(version_base="1.3", config_dir=str(qat_config.PROJECT_ROOT / "conf"),
                               job_name="test_optuna"):
        return hydra_compose(config_name="config", overrides=[*overrides, "paths.outputs=/tmp/q"],
                             return_hydra_config=True)


def test_optuna_maximises_with_a_seeded_sampler():
    """The plugin minimises and draws new trials each time by default; the jobs return accuracy."""
    from qat_runner import sweep

    cfg = compose(["hydra/sweeper=optuna", "seed=5"])
    assert sweep.steer_optuna(cfg) == {"direction": "maximize", "sampler": "TPESampler", "seed": 5, "n_trials": 20}
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.hydra.sweeper.sampler.seed == 5
    given = compose(["hydra/sweeper=optuna", "hydra.sweeper.direction=minimize", "hydra.sweeper.sampler.seed=3"])
    assert sweep.steer_optuna(given)["direction"] == "minimize" and given.hydra.sweeper.sampler.seed == 3
    assert sweep.steer_optuna(compose([])) is None  # the basic sweeper is left alone


def test_bad_choice_value_stops_before_the_sweep(tmp_path):
    """The preflight composes each choice() value (intervals are the sweeper's): one line, exit 2."""
    result = start_sweep(tmp_path, "bad", ["hydra/sweeper=optuna", "quant.bits=choice(4,9)",
                                           f"optim.lr=tag(log, interval({LR_LOW}, {LR_HIGH}))"], timeout=120).wait()
    assert result.returncode == 2, result.describe()
    assert "quant.bits=9 is not accepted" in result.stderr, result.describe()
    assert not (result.outputs / "multirun").exists()


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Result:
    return start_sweep(tmp_path_factory.mktemp("optuna"), "optuna", TRIALS).wait()


@pytest.mark.slow
def test_one_parent_one_child_per_trial(study):
    assert study.returncode == 0, study.describe()
    parent, children, runs = parent_and_children(study.uri)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweeper"] == "OptunaSweeper"
    assert len(runs) == 4 and len(children) == 3, [r.info.run_name for r in runs]
    assert {r.info.status for r in children} == {"FINISHED"}
    for run in children:
        assert run.data.params["quant.bits"] in ("4", "8")
        assert LR_LOW <= float(run.data.params["optim.lr"]) <= LR_HIGH
        assert run.data.params["trainer.max_steps"] == "5"
        assert f"bits={run.data.params['quant.bits']} lr=" in run.info.run_name
    assert parent.data.params["sweep.jobs"] == "3" and parent.data.params["sweep.direction"] == "maximize"
    assert parent.data.params["sweep.seed"] == "0"  # the config's seed: the same trials each time
    assert parent.data.params["sweep.optim.lr"] == f"tag(log, interval({LR_LOW}, {LR_HIGH}))"
    assert parent.data.metrics["jobs_finished"] == 3 and parent.data.metrics["jobs_expected"] == 3
    assert len(read_csv(study.sweep_dir / "sweep_summary.csv")) == 3
    assert is_png(study.sweep_dir / "sweep_summary.png")


@pytest.mark.slow
def test_best_trial_is_named(study):
    """The best trial (the first one with the highest int8 accuracy, as Optuna counts it) in the
    parent's tags and metrics, its description, the CSV, and Optuna's own result file."""
    assert study.returncode == 0, study.describe()
    parent, children, _ = parent_and_children(study.uri)
    best_acc = max(r.data.metrics["int8_acc"] for r in children)
    best = next(r for r in children if r.data.metrics["int8_acc"] == best_acc)  # sorted by job number
    job = best.info.run_name.split(":")[0]
    assert parent.data.metrics["best_int8_acc"] == pytest.approx(best_acc)
    assert parent.data.tags["best_run_id"] == best.info.run_id and parent.data.tags["best_job"] == job
    assert parent.data.tags["best_overrides"] == (f"quant.bits={best.data.params['quant.bits']} "
                                                 f"optim.lr={best.data.params['optim.lr']}")
    optuna = yaml.safe_load((study.sweep_dir / "optimization_results.yaml").read_text())
    assert optuna["best_value"] == pytest.approx(best_acc)
    assert optuna["best_params"]["quant.bits"] == int(best.data.params["quant.bits"])
    assert math.isclose(optuna["best_params"]["optim.lr"], float(best.data.params["optim.lr"]), rel_tol=1e-12)
    rows = read_csv(study.sweep_dir / "sweep_summary.csv")
    assert [row["job"] for row in rows if row["best"] == "yes"] == [job]

    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("**Optuna search** over quant.bits, optim.lr (maximize"), note
    assert f"**Best: job {job}**" in note and f"**{best_acc:.4f}**" in note and best.info.run_id in note
    assert note.count("| FINISHED |") == 3, note
    assert f"get-artifact?path=sweep_summary.png&run_uuid={parent.info.run_id}" in note
