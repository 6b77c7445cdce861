"""The sweep pieces without training: what is swept, the CSV and the plot from job directories,
the config (callback registered, launcher presets, tracking=server) and the parent-run record."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from qat_runner import config as qat_config
from qat_runner import sweep
from helpers.processes import clean_env
from helpers.sweep import is_png, read_csv

CONF_DIR = qat_config.PROJECT_ROOT / "conf"


def compose(overrides=(), hydra=False):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    qat_config.register()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test_sweep"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def _fake_sweep(sweep_dir: Path, jobs: list[tuple[int, str, str, dict | None]]) -> Path:
    """Job directories as Hydra and the runner leave them: .hydra/{hydra,overrides,config}.yaml and
    summary.json (None: a job that failed before writing it)."""
    for num, bits, lr, summary in jobs:
        job = sweep_dir / str(num)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
        (job / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"quant.bits={bits}", f"optim.lr={lr}", "trainer.max_steps=5"]))
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": float(lr)}}))
        if summary is not None:
            (job / "summary.json").write_text(json.dumps(summary))
    return sweep_dir


def _summary(bits: int, acc: float, run_id: str) -> dict:
    return {"float_acc": 0.95, "ptq_acc": acc - 0.1, "qat_acc": acc, "int8_acc": acc,
            "int8_agreement": 1.0, "float_bytes": 165657, "int8_bytes": 30000 if bits <= 4 else 50000,
            "size_ratio": 0.2, "bits": bits, "feature_bits": 8, "mlflow_run_id": run_id,
            "train_seconds": 0.1}


# --------------------------------------------------------------------------------------------
# What is swept


def test_sweep_spec_from_overrides_and_sweeper_params():
    cfg = OmegaConf.create({"hydra": {
        "overrides": {"task": ["+experiment=lenet_digits", "quant.bits=2,4,8", "optim.lr=1e-3,1e-4",
                               "trainer.max_steps=10", "hydra/launcher=parallel"]},
        "sweeper": {"params": {"seed": "range(0,2)"}}}})
    swept, values, fixed, jobs = sweep.sweep_spec(cfg)
    assert swept == ["seed", "quant.bits", "optim.lr"]
    assert values["quant.bits"] == ["2", "4", "8"] and values["optim.lr"] == ["0.001", "0.0001"]
    assert values["seed"] == ["0", "1"]
    assert jobs == 12
    assert fixed == {"experiment": "lenet_digits", "trainer.max_steps": "10", "hydra/launcher": "parallel"}


def test_sweep_spec_keeps_an_interval_as_written():
    """An Optuna search space cannot be listed: its text goes to the parent's params, jobs unknown."""
    cfg = OmegaConf.create({"hydra": {"overrides": {"task": [
        "quant.bits=choice(4,8)", "optim.lr=tag(log, interval(1e-5, 1e-2))"]}}})
    swept, values, _, jobs = sweep.sweep_spec(cfg)
    assert swept == ["quant.bits", "optim.lr"] and jobs is None
    assert values == {"quant.bits": ["4", "8"], "optim.lr": ["tag(log, interval(1e-5, 1e-2))"]}


def test_labels_and_swept_values():
    assert sweep.short_names(["quant.bits", "optim.lr"]) == {"quant.bits": "bits", "optim.lr": "lr"}
    assert sweep.short_names(["optim.lr", "trainer.float_lr", "a.lr"]) == {
        "optim.lr": "optim.lr", "trainer.float_lr": "float_lr", "a.lr": "a.lr"}
    overrides = ["+experiment=x", "quant.bits=4", "optim.lr=0.001", "trainer.max_steps=5"]
    assert sweep.swept_values(overrides, ["quant.bits", "optim.lr"]) == {"quant.bits": "4", "optim.lr": "0.001"}
    assert sweep.swept_values(overrides, ["experiment"]) == {"experiment": "x"}
    assert sweep.short_value("0.0003860866271460546") == "0.0003861"
    assert sweep.short_value("0.001") == "0.001" and sweep.short_value("PerChannel") == "PerChannel"


# --------------------------------------------------------------------------------------------
# The summary of a sweep directory


def test_csv_and_plot_from_job_dirs(tmp_path):
    sweep_dir = _fake_sweep(tmp_path / "sweep", [
        (0, "2", "0.001", _summary(2, 0.89, "a" * 32)), (1, "2", "0.0001", _summary(2, 0.83, "b" * 32)),
        (2, "8", "0.001", _summary(8, 0.97, "c" * 32)), (3, "8", "0.0001", None)])
    rows, csv_path, png_path = sweep.summarize(sweep_dir, ["quant.bits", "optim.lr"], title="t")
    assert csv_path == sweep_dir / "sweep_summary.csv" and png_path == sweep_dir / "sweep_summary.png"
    table = read_csv(csv_path)
    assert [r["job"] for r in table] == ["0", "1", "2", "3"]
    assert [(r["quant.bits"], r["optim.lr"], r["status"]) for r in table] == [
        ("2", "0.001", "FINISHED"), ("2", "0.0001", "FINISHED"), ("8", "0.001", "FINISHED"), ("8", "0.0001", "FAILED")]
    assert float(table[2]["int8_acc"]) == 0.97 and table[3]["int8_acc"] == ""
    assert table[0]["lr"] == "0.001" and table[0]["mlflow_run_id"] == "a" * 32
    assert "trainer.max_steps=5" in table[0]["overrides"]
    assert list(table[0])[:4] == ["job", "quant.bits", "optim.lr", "status"]
    assert is_png(png_path)
    # MLflow's view of a job's status wins over "wrote summary.json"
    rows = sweep.collect_rows(sweep_dir, ["quant.bits", "optim.lr"], {str(sweep_dir / "1"): "KILLED"})
    assert rows[1]["status"] == "KILLED"


def test_per_layer_runs_are_summarised_and_plotted_by_size(tmp_path, monkeypatch):
    """Budget runs: the CSV says how many layers got which width; the plot puts size on the x axis."""
    mixed = {**_summary(8, 0.95, "b" * 32), "size_ratio": 0.18,
             "layer_bits": {"features.0": 8, "features.3": 4, "features.7": 4, "classifier.3": None}}
    sweep_dir = _fake_sweep(tmp_path / "sweep", [(0, "8", "0.001", _summary(8, 0.97, "a" * 32)),
                                                 (1, "8", "0.001", mixed)])
    calls = []
    monkeypatch.setattr(sweep, "plot_by_size", lambda *a, **k: calls.append(a) or a[1])
    rows, csv_path, png_path = sweep.summarize(sweep_dir, ["quant.bits"], title="t")
    assert [r["layer_bits"] for r in read_csv(csv_path)] == ["", "8:1 4:2 float:1"]
    assert len(calls) == 1 and png_path == sweep_dir / "sweep_summary.png"
    monkeypatch.undo()
    assert is_png(sweep.plot_by_size(rows, tmp_path / "by_size.png", ["quant.bits"], "t"))


def test_best_job_and_parent_description(tmp_path):
    """The best job is the first with the highest int8 accuracy (Optuna's best trial on a tie); the
    description links it, lists the jobs and shows the plot, within MLflow's tag length."""
    sweep_dir = _fake_sweep(tmp_path / "sweep", [
        (0, "2", "0.001", _summary(2, 0.89, "a" * 32)), (1, "8", "0.001", _summary(8, 0.97, "b" * 32)),
        (2, "8", "0.0001", _summary(8, 0.97, "c" * 32)), (3, "4", "0.0001", None)])
    rows = sweep.collect_rows(sweep_dir, ["quant.bits", "optim.lr"])
    assert sweep.best_row(rows)["job"] == 1 and [r["best"] for r in rows] == ["", "yes", "", ""]
    parent = {"run_id": "p" * 32, "experiment_id": "7", "swept": ["quant.bits", "optim.lr"],
              "sweep_dir": str(sweep_dir)}
    note = sweep.sweep_description(rows, parent, plot_logged=True)
    assert note.startswith("**Hydra sweep** over quant.bits, optim.lr: 3/4 jobs finished.")
    assert "**Best: job 1** (bits=8 lr=0.001): int8 accuracy **0.9700**" in note
    assert f"(#/experiments/7/runs/{'b' * 32}?workflowType=machine_learning)" in note
    assert "| **1** (best) | 8 | 0.001 | FINISHED |" in note and "| 3 | 4 | 0.0001 | FAILED |" in note
    assert f"![sweep summary](get-artifact?path=sweep_summary.png&run_uuid={'p' * 32})" in note
    short = sweep.sweep_description(rows, parent, plot_logged=False, limit=len(note) - 200)
    assert len(short) <= len(note) - 200 and "(first " in short and "get-artifact" not in short
    assert sweep.best_row(sweep.collect_rows(_fake_sweep(tmp_path / "none", [(0, "4", "0.1", None)]),
                                             ["quant.bits"])) is None


def test_optuna_plot(tmp_path):
    """Trials of an Optuna search: accuracy by trial and against lr (log scale), by bit width."""
    sweep_dir = _fake_sweep(tmp_path / "sweep", [
        (0, "4", "0.00012345678", _summary(4, 0.90, "a" * 32)), (1, "8", "0.0034567891", _summary(8, 0.95, "b" * 32)),
        (2, "8", "0.00056789", _summary(8, 0.93, "c" * 32))])
    rows, _, png_path = sweep.summarize(sweep_dir, ["quant.bits", "optim.lr"], kind="optuna", title="t")
    assert is_png(png_path) and [r["best"] for r in rows] == ["", "yes", ""]
    from PIL import Image

    with Image.open(png_path) as image:
        assert image.size == (1000, 400)


def test_plot_needs_a_finished_job(tmp_path):
    sweep_dir = _fake_sweep(tmp_path / "sweep", [(0, "4", "0.001", None)])
    _, csv_path, png_path = sweep.summarize(sweep_dir, ["quant.bits"])
    assert png_path is None and not (sweep_dir / "sweep_summary.png").exists()
    assert len(read_csv(csv_path)) == 1


def test_summary_command(tmp_path):
    """`python -m qat_runner.sweep SWEEP_DIR` rewrites the CSV and plot (swept keys from multirun.yaml)."""
    sweep_dir = _fake_sweep(tmp_path / "sweep", [(0, "4", "0.001", _summary(4, 0.9, "a" * 32)),
                                                 (1, "8", "0.001", _summary(8, 0.95, "b" * 32))])
    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": ["quant.bits=4,8", "optim.lr=0.001"]}}}),
                   sweep_dir / "multirun.yaml")
    out = subprocess.run([sys.executable, "-m", "qat_runner.sweep", str(sweep_dir)], capture_output=True,
                         text=True, env=clean_env(tmp_path), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "2 jobs" in out.stdout
    table = read_csv(sweep_dir / "sweep_summary.csv")
    assert [r["quant.bits"] for r in table] == ["4", "8"] and "optim.lr" not in table[0]
    assert is_png(sweep_dir / "sweep_summary.png")
    bad = subprocess.run([sys.executable, "-m", "qat_runner.sweep", str(tmp_path / "nowhere")],
                         capture_output=True, text=True, env=clean_env(tmp_path), timeout=120)
    assert bad.returncode == 2 and "not a directory" in bad.stderr


# --------------------------------------------------------------------------------------------
# The parent-run record and who attaches to it


def test_parent_record_round_trip(tmp_path):
    record = {"run_id": "r" * 32, "tracking_uri": "sqlite:///x.db", "experiment_id": "1",
              "swept": ["quant.bits"], "sweep_dir": str(tmp_path)}
    path = sweep.write_sweep_parent(tmp_path / "sweep", record)
    assert path.name == sweep.SWEEP_PARENT_FILE
    assert sweep.read_sweep_parent(tmp_path / "sweep") == record
    assert sweep.read_sweep_parent(tmp_path / "elsewhere") is None
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == [sweep.SWEEP_PARENT_FILE]


def test_single_run_has_no_parent():
    """Outside a Hydra multirun job (a plain run, a library call) nothing is attached."""
    assert sweep.sweep_parent("sqlite:///x.db", "1") is None


# --------------------------------------------------------------------------------------------
# Config


def test_callback_registered():
    cfg = compose(["paths.outputs=/tmp/q"], hydra=True)
    callback = cfg.hydra.callbacks.sweep_parent_run
    assert callback._target_ == "qat_runner.sweep.SweepParentRun"
    from hydra.utils import instantiate

    instance = instantiate(callback)
    assert isinstance(instance, sweep.SweepParentRun) and instance.enabled and instance.plot
    import pickle

    assert pickle.loads(pickle.dumps(instance)).enabled  # Hydra ships callbacks to workers


def test_tracking_server_config(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose(["tracking=server", "paths.outputs=/tmp/q"])
    assert cfg.tracking.uri == "http://127.0.0.1:5000"
    assert cfg.tracking.experiment_name == "lenet_digits" and cfg.tracking.artifact_root is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.org:5000")
    assert compose(["tracking=server"]).tracking.uri == "http://mlflow.example.org:5000"
    assert compose(["tracking=server", "tracking.uri=http://h:1"]).tracking.uri == "http://h:1"


@pytest.mark.parametrize("preset, plugin, target", [
    ("parallel", "hydra_plugins.hydra_joblib_launcher", "JoblibLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher", "SlurmLauncher"),
    ("slurm_local", "hydra_plugins.hydra_submitit_launcher", "LocalLauncher"),
])
def test_launcher_presets(preset, plugin, target):
    pytest.importorskip(plugin, reason=f"{plugin} not installed: pip install -e '.[parallel,cluster]'")
    launcher = compose([f"hydra/launcher={preset}", "paths.outputs=/tmp/q"], hydra=True).hydra.launcher
    assert launcher._target_.endswith(target)
    if preset == "parallel":
        assert launcher.n_jobs == 2
    else:
        assert launcher.submitit_folder.startswith("/tmp/q/multirun/lenet_digits/")
        assert launcher.timeout_min > 0
