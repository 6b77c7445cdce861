"""Hydra sweeps in MLflow: one parent run per multirun, and a summary of the jobs at its end.

`SweepParentRun` is a Hydra callback (registered in conf/config.yaml under `hydra.callbacks`):

- `on_multirun_start` (the launching process, before any job): opens the tracking store, creates
  the experiment once (so parallel jobs never race to create it or the SQLite tables), creates the
  parent run and writes its record to `<sweep dir>/mlflow_parent_run.json`. Every job, whatever
  the launcher (in process, joblib workers, submitit jobs on other nodes), reads that file in
  `tracking.tracked_run` and starts its own run with `parent_run_id`.
- `on_multirun_end` (all jobs done): writes `sweep_summary.csv` (one row per job: overrides,
  status, summary figures) and `sweep_summary.png` (int8 accuracy and artifact size against bits,
  one line per lr) into the sweep directory, logs both to the parent run and ends it FINISHED.
- When a job fails, Hydra raises after the launcher returns and never calls `on_multirun_end`;
  an exit handler then writes the same summary for the jobs there are and ends the parent run
  FAILED (KILLED when a job was interrupted). A job that raises is recorded FAILED and the
  launcher goes on with the others; a job that exits (the CLI's sys.exit on a config error or
  Ctrl-C) ends a basic-launcher sweep there, and the jobs not started have no row.
- Each job's end also checks that no MLflow run is left active in its process (jobs of the basic
  launcher share one process), so nothing leaks into the next job.

With `hydra/sweeper=optuna` (hydra-optuna-sweeper) the jobs are the trials of an Optuna study that
maximises what each job returns, the int8 artifact accuracy: `on_multirun_start` makes the plugin's
default (minimise, an unseeded sampler) maximise and seeds the sampler with the config's `seed`,
unless the command line sets `hydra.sweeper.direction` or `hydra.sweeper.sampler.seed`. The plot
then shows the accuracy by trial and against the searched key (lr), one colour per bit width.

At the end the parent run's description (Markdown in the MLflow UI) holds the table of jobs, the
best one (also in the tags `best_run_id`, `best_job`, `best_overrides` and the CSV's `best` column)
and the plot; the log says how to open it.

`python -m qat_runner.sweep SWEEP_DIR` rewrites the CSV and the plot from a sweep directory.
"""
from __future__ import annotations

import atexit
import collections
import csv
import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)

CSV_FILE, PLOT_FILE = "sweep_summary.csv", "sweep_summary.png"
FIGURES = ("float_acc", "ptq_acc", "qat_acc", "int8_acc", "int8_agreement", "float_bytes",
           "int8_bytes", "size_ratio", "train_seconds")
BITS_KEY, LR_KEY = "quant.bits", "optim.lr"
OBJECTIVE = "int8_acc"  # what a job returns (cli.hydra_main), what an Optuna study maximises
OPTUNA = "optuna"


# ---------------------------------------------------------------------------------------------
# The parent run's record, and the jobs that attach to it (tracking.tracked_run asks child_run)

SWEEP_PARENT_FILE = "mlflow_parent_run.json"  # in the sweep directory, written before jobs start


def write_sweep_parent(sweep_dir: Path, info: Mapping[str, Any]) -> Path:
    """Atomically write the parent run's record (run_id, tracking_uri, experiment_id, swept)."""
    from .engine.files import write_text_atomically

    return write_text_atomically(sweep_dir / SWEEP_PARENT_FILE, json.dumps(dict(info), indent=2, sort_keys=True))


def read_sweep_parent(sweep_dir: Path) -> dict[str, Any] | None:
    path = sweep_dir / SWEEP_PARENT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def sweep_parent(uri: str, experiment_id: str) -> dict[str, Any] | None:
    """Inside a Hydra multirun job, the sweep's parent run record; None for a single run.

    Read from the sweep directory (shared by every launcher: in-process, joblib workers, submitit
    jobs on other nodes), not from the environment, so nothing leaks into unrelated runs. A job
    whose tracking store or experiment differs from the parent's is not attached.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return None
        output_dir = Path(hydra_cfg.runtime.output_dir)
        folders = [Path(hydra_cfg.sweep.dir), *list(output_dir.parents)[:3]]
    except Exception as err:  # noqa: BLE001 - no Hydra context: a plain run
        log.debug("no Hydra sweep context: %s", err)
        return None
    for folder in folders:
        info = read_sweep_parent(folder)
        if info is None:
            continue
        if info.get("tracking_uri") != uri or str(info.get("experiment_id")) != str(experiment_id):
            log.warning("not attaching to the sweep's parent run %s: it is in %s (experiment %s), "
                        "this job logs to %s (experiment %s)", info.get("run_id"),
                        info.get("tracking_uri"), info.get("experiment_id"), uri, experiment_id)
            return None
        return info
    return None


def short_names(keys: list[str]) -> dict[str, str]:
    """Column/run-name labels for override keys: the last dotted part where it is unambiguous."""
    last = [k.lstrip("+~").rsplit(".", 1)[-1].rsplit("/", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k.lstrip("+~")) for k, s in zip(keys, last)}


def swept_values(overrides: list[str], swept: list[str]) -> dict[str, str]:
    """{key: value} of a job's overrides for the swept keys (in the sweep's order)."""
    values = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.lstrip("+~") in {k.lstrip("+~") for k in swept}:
            values[key.lstrip("+~")] = value
    return {k.lstrip("+~"): values[k.lstrip("+~")] for k in swept if k.lstrip("+~") in values}


def short_value(value: str) -> str:
    """A swept value for labels: Optuna's 0.00012345678901234 as 0.0001235; anything else as is."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if len(value) > 8 else value


def _child_run_name(run_name: str, parent: Mapping[str, Any]) -> str:
    """`<job num>: bits=4 lr=0.001` from the job's overrides of the swept keys."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001
        return run_name
    swept = list(parent.get("swept", []))
    labels = short_names(swept)
    values = swept_values(overrides, swept)
    described = " ".join(f"{labels.get(k, k)}={short_value(v)}" for k, v in values.items())
    return f"{run_name}: {described}" if described else run_name


def _job_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().runtime.output_dir)


def child_run(uri: str, experiment_id: str, run_name: str,
              tags: dict[str, str]) -> tuple[str, dict[str, str], str | None]:
    """(run name, tags, parent run id) for a job's MLflow run: inside a multirun job whose sweep has
    a parent run in the same store and experiment, the child's; otherwise the inputs and None."""
    parent = sweep_parent(uri, experiment_id)
    if parent is None:
        return run_name, tags, None
    tags = {**tags, "sweep_dir": str(parent.get("sweep_dir", "")), "job_dir": _job_dir()}
    return _child_run_name(run_name, parent), tags, parent["run_id"]


# ---------------------------------------------------------------------------------------------
# What is swept


def sweep_spec(config: DictConfig) -> tuple[list[str], dict[str, list[str]], dict[str, str], int | None]:
    """(swept keys, their values, fixed overrides, number of jobs or None) from the sweep's overrides
    (command line and `hydra.sweeper.params`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [str(o) for o in config.hydra.overrides.task]
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    if params:
        lines = [f"{k}={v}" for k, v in params.items()] + lines
    swept, values, fixed = [], {}, {}
    jobs: int | None = 1
    for override in OverridesParser.create().parse_overrides(lines):
        key = override.key_or_group
        if override.is_sweep_override():
            try:
                choices = list(override.sweep_string_iterator())
            except Exception:  # noqa: BLE001 - interval() (Optuna), glob() (needs the config loader)
                choices, jobs = [override.input_line.partition("=")[2]], None
            if key not in values:
                swept.append(key)
            values[key] = choices
        else:
            fixed[key] = override.input_line.partition("=")[2]
    if jobs is not None:
        for key in swept:
            jobs *= len(values[key])
    return swept, values, fixed, jobs


def sweeper_kind(config: DictConfig) -> str:
    """"optuna" for hydra-optuna-sweeper, else "grid" (Hydra's basic sweeper: every combination)."""
    target = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    return OPTUNA if target.rsplit(".", 1)[-1] == "OptunaSweeper" else "grid"


def _given_on_command_line(config: DictConfig) -> set[str]:
    return {str(o).partition("=")[0].lstrip("+~") for o in
            OmegaConf.select(config, "hydra.overrides.hydra", default=None) or []}


def _name(value: Any) -> str:
    """An enum's or a string's name: Direction.minimize -> "minimize"."""
    return str(getattr(value, "name", value))


def steer_optuna(config: DictConfig) -> dict[str, Any] | None:
    """Make an Optuna study maximise the int8 accuracy the jobs return, with a seeded sampler.

    The plugin's defaults are to minimise and to draw new trials on every run. Set on the command
    line (`hydra.sweeper.direction=...`, `hydra.sweeper.sampler.seed=...`), they are kept. Runs in
    `on_multirun_start`, before Hydra builds the sweeper from this same config. Returns the study's
    settings for the parent run, None for other sweepers.
    """
    if sweeper_kind(config) != OPTUNA:
        return None
    node, given = config.hydra.sweeper, _given_on_command_line(config)
    with read_write(node), open_dict(node):
        if "hydra.sweeper.direction" not in given and _name(node.direction) == "minimize":
            node.direction = "maximize"
        sampler = node.get("sampler")
        if (sampler is not None and "seed" in sampler and sampler.seed is None
                and "hydra.sweeper.sampler.seed" not in given):
            sampler.seed = int(OmegaConf.select(config, "seed", default=0) or 0)
    sampler = node.get("sampler")
    study = {"direction": _name(node.direction),
             "sampler": str(OmegaConf.select(node, "sampler._target_", default="") or "").rsplit(".", 1)[-1],
             "seed": OmegaConf.select(node, "sampler.seed", default=None), "n_trials": int(node.n_trials)}
    if study["direction"] != "maximize":
        log.warning("Optuna: hydra.sweeper.direction=%s: the jobs return the int8 artifact accuracy",
                    study["direction"])
    log.info("Optuna: %s %s, %d trials, %s (seed %s)", study["direction"], OBJECTIVE, study["n_trials"],
             study["sampler"], study["seed"])
    return study


# ---------------------------------------------------------------------------------------------
# The summary of a sweep directory


def _job_dirs(sweep_dir: Path) -> list[tuple[int, Path]]:
    """(job number, job directory) of every job Hydra started under `sweep_dir`."""
    jobs = []
    for hydra_yaml in sweep_dir.glob("**/.hydra/hydra.yaml"):
        job_dir = hydra_yaml.parent.parent
        try:
            num = int(OmegaConf.load(hydra_yaml).hydra.job.num)
        except Exception:  # noqa: BLE001 - unreadable: order by folder name
            num = int(job_dir.name) if job_dir.name.isdigit() else 10**6
        jobs.append((num, job_dir))
    return sorted(jobs)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _job_lr(job_dir: Path) -> Any:
    try:
        return OmegaConf.select(OmegaConf.load(job_dir / ".hydra" / "config.yaml"), LR_KEY)
    except Exception:  # noqa: BLE001 - an interpolation we cannot resolve here
        return None


def collect_rows(sweep_dir: Path, swept: Sequence[str],
                 run_status: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per job: its number, swept values, status, summary figures and overrides.

    `run_status` maps a job directory (as logged in the child run's `job_dir` tag) to its
    MLflow run status; without it a job is FINISHED when it wrote summary.json.
    """
    rows = []
    for num, job_dir in _job_dirs(sweep_dir):
        try:
            overrides = [str(o) for o in OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")]
        except Exception:  # noqa: BLE001
            overrides = []
        summary = _read_json(job_dir / "summary.json") or {}
        status = (run_status or {}).get(str(job_dir))
        if status is None:
            status = "FINISHED" if summary else "FAILED"
        row: dict[str, Any] = {"job": num}
        values = swept_values(overrides, list(swept))
        row.update({key: values.get(key, "") for key in swept})
        row["status"] = status
        row["bits"] = summary.get("bits", "")
        row["feature_bits"] = summary.get("feature_bits", "")
        lr = _job_lr(job_dir)
        row["lr"] = "" if lr is None else lr
        row.update({key: summary.get(key, "") for key in FIGURES})
        row["layer_bits"] = layer_bits_counts(summary.get("layer_bits"))
        row["mlflow_run_id"] = summary.get("mlflow_run_id", "")
        row["overrides"] = " ".join(overrides)
        row["job_dir"] = str(job_dir)
        rows.append(row)
    best = best_row(rows)
    for row in rows:
        row["best"] = "yes" if row is best else ""
    return rows


def layer_bits_counts(layer_bits: Mapping[str, int | None] | None) -> str:
    """A per-layer-bits run in one cell: "8:3 4:50 float:1" (layers per width); "" for uniform bits."""
    if not layer_bits:
        return ""
    counts = collections.Counter("float" if b is None else str(b) for b in layer_bits.values())
    order = sorted(counts, key=lambda k: (k == "float", -int(k) if k != "float" else 0))
    return " ".join(f"{k}:{counts[k]}" for k in order)


def best_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The finished job with the highest int8 accuracy; the first one on a tie (as Optuna's
    best trial). None when no job finished."""
    done = [row for row in rows if row.get("status") == "FINISHED" and _number(row.get(OBJECTIVE)) is not None]
    if not done:
        return None
    return max(done, key=lambda row: (_number(row[OBJECTIVE]), -int(row.get("job", 0))))


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path, swept: Sequence[str] = ()) -> Path:
    columns = ["job", *swept, "status", "best", "bits", "layer_bits", "feature_bits", "lr", *FIGURES, "mlflow_run_id",
               "overrides", "job_dir"]
    for row in rows:  # keep whatever else a row has, after the known columns
        columns += [k for k in row if k not in columns]
    from .engine.files import write_atomically

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)

    return write_atomically(path, write)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def plot_summary(rows: Sequence[Mapping[str, Any]], path: Path, swept: Sequence[str] = (),
                 title: str = "") -> Path | None:
    """int8 accuracy and int8 artifact size against bits, one line per lr (or per combination of
    the swept keys other than quant.bits). None when there is nothing to plot or no matplotlib.

    Sweeps with per-layer bits (quant.layers, quant.size_budget) plot accuracy against size instead:
    there, bits no longer say how big the artifact is.
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
        return None
    if any(row.get("layer_bits") for row in rows) or set(swept) & set(SIZE_KEYS):
        return plot_by_size(rows, path, swept, title)
    others = [k for k in swept if k != BITS_KEY]
    labels = short_names(list(others))
    groups: dict[str, list[tuple[float, float, float]]] = {}
    float_acc, float_kib = set(), set()
    for row in rows:
        bits, acc, size = _number(row.get("bits")), _number(row.get("int8_acc")), _number(row.get("int8_bytes"))
        if bits is None or acc is None or size is None:
            continue
        if others:
            label = " ".join(f"{labels[k]}={row.get(k, '')}" for k in others)
        else:
            label = f"lr={row.get('lr', '')}"
        groups.setdefault(label, []).append((bits, acc, size / 1024))
        if _number(row.get("float_acc")) is not None:
            float_acc.add(round(float(row["float_acc"]), 6))
        if _number(row.get("float_bytes")) is not None:
            float_kib.add(float(row["float_bytes"]) / 1024)
    if not groups:
        log.warning("no finished job to plot in %s", path.parent)
        return None

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_acc, ax_size = fig.subplots(1, 2)
    markers = "osD^v<>ph*"
    all_bits = sorted({b for points in groups.values() for b, _, _ in points})
    for i, (label, points) in enumerate(sorted(groups.items())):
        points.sort()
        xs = [p[0] for p in points]
        ax_acc.plot(xs, [p[1] for p in points], marker=markers[i % len(markers)], label=label)
        ax_size.plot(xs, [p[2] for p in points], marker=markers[i % len(markers)], label=label, alpha=0.8)
    if len(float_acc) == 1:
        ax_acc.axhline(next(iter(float_acc)), color="grey", linestyle="--", label="float model")
    if len(float_kib) == 1:
        ax_size.axhline(next(iter(float_kib)), color="grey", linestyle="--", label="float ONNX")
    ax_acc.set(xlabel="weight bits (quant.bits)", ylabel="int8 artifact accuracy (onnxruntime)",
               title="accuracy")
    ax_size.set(xlabel="weight bits (quant.bits)", ylabel="artifact size (KiB)", title="size")
    ax_size.set_ylim(bottom=0)
    for ax in (ax_acc, ax_size):
        ax.set_xticks(all_bits)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)


SIZE_KEYS = ("quant.layers", "quant.size_budget")


def plot_by_size(rows: Sequence[Mapping[str, Any]], path: Path, swept: Sequence[str] = (),
                 title: str = "") -> Path | None:
    """int8 accuracy against artifact size (% of the float ONNX), a labelled point per job."""
    from matplotlib.figure import Figure

    labels = short_names(list(swept))
    points = []
    for row in rows:
        ratio, acc = _number(row.get("size_ratio")), _number(row.get("int8_acc"))
        if ratio is None or acc is None:
            continue
        text = " ".join(f"{labels[k]}={row.get(k, '')}" for k in swept if row.get(k, "") != "")
        points.append((100 * ratio, acc, text or f"job {row.get('job')}", bool(row.get("layer_bits"))))
    if not points:
        log.warning("no finished job to plot in %s", path.parent)
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for mixed, style in ((False, {"marker": "o", "label": "uniform bits"}),
                         (True, {"marker": "D", "label": "per-layer bits"})):
        chosen = sorted(p for p in points if p[3] == mixed)
        if chosen:
            ax.plot([p[0] for p in chosen], [p[1] for p in chosen], linestyle="none", **style)
    for x, y, text, _ in points:
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    float_acc = {round(float(row["float_acc"]), 6) for row in rows if _number(row.get("float_acc")) is not None}
    if len(float_acc) == 1:
        ax.axhline(next(iter(float_acc)), color="grey", linestyle="--", label="float model")
    ax.set(xlabel="int8 artifact size (% of the float ONNX)", ylabel="int8 artifact accuracy (onnxruntime)",
           title="accuracy against size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)


def plot_trials(rows: Sequence[Mapping[str, Any]], path: Path, swept: Sequence[str] = (),
                title: str = "") -> Path | None:
    """An Optuna search: int8 accuracy by trial with the best so far, and against the searched
    numeric key (lr on a log scale), one colour per bit width; the best trial starred. None when
    no trial finished or there is no matplotlib."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator, NullFormatter
    except ImportError:
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", path.name)
        return None
    points = [row for row in rows if _number(row.get(OBJECTIVE)) is not None and row.get("status") == "FINISHED"]
    if not points:
        log.warning("no finished trial to plot in %s", path.parent)
        return None
    numeric = [k for k in swept if k != BITS_KEY and all(_number(row.get(k)) is not None for row in points)]
    x_key = numeric[0] if numeric else None
    best = best_row(rows)
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_trial, ax_key = fig.subplots(1, 2) if x_key else (fig.subplots(1, 1), None)
    for i, bits in enumerate(sorted({_number(row.get("bits")) or 0 for row in points})):
        group = [row for row in points if (_number(row.get("bits")) or 0) == bits]
        style = {"marker": "osD^v<>ph*"[i % 10], "linestyle": "none", "label": f"{bits:g}-bit weights"}
        ax_trial.plot([int(r["job"]) for r in group], [float(r[OBJECTIVE]) for r in group], **style)
        if ax_key is not None:
            ax_key.plot([float(r[x_key]) for r in group], [float(r[OBJECTIVE]) for r in group], **style)
    ordered = sorted(points, key=lambda row: int(row["job"]))
    so_far = [max(float(r[OBJECTIVE]) for r in ordered[:i + 1]) for i in range(len(ordered))]
    ax_trial.step([int(r["job"]) for r in ordered], so_far, where="post", color="grey", label="best so far")
    ax_trial.set(xlabel="trial (job number)", ylabel="int8 artifact accuracy (onnxruntime)", title="search")
    ax_trial.xaxis.set_major_locator(MaxNLocator(integer=True))
    if best is not None:
        ax_trial.plot([int(best["job"])], [float(best[OBJECTIVE])], marker="*", markersize=16, color="gold",
                      markeredgecolor="black", linestyle="none", label=f"best: job {best['job']}")
    if ax_key is not None:
        values = [float(r[x_key]) for r in points]
        if min(values) > 0 and (x_key.endswith("lr") or max(values) / min(values) >= 100):
            ax_key.set_xscale("log")
            ax_key.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap
        if best is not None:
            ax_key.plot([float(best[x_key])], [float(best[OBJECTIVE])], marker="*", markersize=16,
                        color="gold", markeredgecolor="black", linestyle="none")
        ax_key.set(xlabel=f"{short_names([x_key])[x_key]} ({x_key})",
                   ylabel="int8 artifact accuracy (onnxruntime)", title=f"accuracy against {x_key}")
    for ax in (ax_trial, ax_key):
        if ax is not None:
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)


def _save_png(fig: Any, path: Path) -> Path:
    from .engine.files import write_atomically

    return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def summarize(sweep_dir: Path, swept: Sequence[str] | None = None,
              run_status: Mapping[str, str] | None = None, plot: bool = True,
              title: str = "", kind: str | None = None) -> tuple[list[dict[str, Any]], Path, Path | None]:
    """Write sweep_summary.csv (and .png) into `sweep_dir`; returns (rows, csv path, png path).

    `kind` ("grid" or "optuna", which plot) defaults to what the sweep directory says."""
    if swept is None or kind is None:
        record = _read_json(sweep_dir / "mlflow_parent_run.json") or {}
        if swept is None:
            swept = record.get("swept") or _swept_from_multirun_yaml(sweep_dir)
        if kind is None:
            kind = record.get("sweeper") or _kind_from_multirun_yaml(sweep_dir)
    rows = collect_rows(sweep_dir, swept, run_status)
    csv_path = write_csv(rows, sweep_dir / CSV_FILE, swept)
    png_path = None
    if plot:
        draw = plot_trials if kind == OPTUNA else plot_summary
        png_path = draw(rows, sweep_dir / PLOT_FILE, swept, title)
    return rows, csv_path, png_path


def _swept_from_multirun_yaml(sweep_dir: Path) -> list[str]:
    try:
        return sweep_spec(OmegaConf.load(sweep_dir / "multirun.yaml"))[0]
    except Exception:  # noqa: BLE001
        return []


def _kind_from_multirun_yaml(sweep_dir: Path) -> str:
    try:
        return sweeper_kind(OmegaConf.load(sweep_dir / "multirun.yaml"))
    except Exception:  # noqa: BLE001
        return "grid"


# ---------------------------------------------------------------------------------------------
# The parent run's description (Markdown, rendered by the MLflow UI)


def _label_values(row: Mapping[str, Any], swept: Sequence[str]) -> str:
    labels = short_names(list(swept))
    return " ".join(f"{labels[k]}={short_value(str(row.get(k, '')))}" for k in swept)


def _fmt(value: Any, spec: str) -> str:
    number = _number(value)
    return "" if number is None else format(number, spec)


def sweep_description(rows: Sequence[Mapping[str, Any]], parent: Mapping[str, Any],
                      plot_logged: bool, limit: int = 7000) -> str:
    """Markdown for the parent run: what was searched, the best job (linked), the table of jobs
    (as many as fit MLflow's tag limit; all of them are in the CSV) and the plot."""
    from .tracking import artifact_image, markdown_table, run_link

    swept = list(parent.get("swept", []))
    finished = sum(row["status"] == "FINISHED" for row in rows)
    keys = ", ".join(swept) or "nothing"
    study = parent.get("study")
    if study:
        head = (f"**Optuna search** over {keys} ({study['direction']} the int8 artifact accuracy; "
                f"{study['sampler']}, seed {study['seed']}): {finished}/{len(rows)} trials finished")
    else:
        head = f"**Hydra sweep** over {keys}: {finished}/{len(rows)} jobs finished"
    lines = [head + "."]
    best = best_row(rows)
    if best is not None:
        link = run_link(str(parent["experiment_id"]), str(best["mlflow_run_id"]), "open its run")
        lines.append(f"**Best: job {best['job']}** ({_label_values(best, swept)}): int8 accuracy "
                     f"**{_fmt(best[OBJECTIVE], '.4f')}**, {_fmt(best['int8_bytes'], ',.0f')} B ({link})")
    labels = short_names(swept)
    header = ["job", *(labels[k] for k in swept), "status", "PTQ acc", "QAT acc", "int8 acc", "agreement",
              "int8 size (B)"]
    table_rows = []
    for row in rows:
        job = f"**{row['job']}** (best)" if row is best else str(row["job"])
        table_rows.append([job, *(short_value(str(row.get(k, ""))) for k in swept), row["status"],
                           _fmt(row["ptq_acc"], ".4f"), _fmt(row["qat_acc"], ".4f"),
                           _fmt(row[OBJECTIVE], ".4f"), _fmt(row["int8_agreement"], ".3f"),
                           _fmt(row["int8_bytes"], ",.0f")])
    image = artifact_image(str(parent["run_id"]), PLOT_FILE, "sweep summary") if plot_logged else ""
    footer = f"Sweep directory: `{parent.get('sweep_dir', '')}` (`{CSV_FILE}`, `{PLOT_FILE}`)"
    shown = len(table_rows)
    while True:
        table = markdown_table(header, table_rows[:shown])
        if shown < len(table_rows):
            table += f"\n\n(first {shown} of {len(table_rows)} jobs: all of them in `{CSV_FILE}`)"
        text = "\n\n".join([*lines, table, *([image] if image else []), footer]) + "\n"
        if len(text) <= limit or shown == 0:
            return text
        shown -= 1


# ---------------------------------------------------------------------------------------------
# The callback


class SweepParentRun(Callback):
    """One MLflow parent run per Hydra multirun; see the module docstring.

    Attributes are plain data: Hydra pickles callbacks to joblib and submitit workers.
    """

    def __init__(self, enabled: bool = True, plot: bool = True) -> None:
        self.enabled = enabled
        self.plot = plot
        self.parent: dict[str, Any] | None = None  # set in the launching process only

    # -- the launching process

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        study = steer_optuna(config)  # before Hydra builds the sweeper from this config
        if not self.enabled:
            return
        try:
            self.parent = self._start_parent(config, study)
        except Exception as err:  # the jobs will meet the same problem and say so
            log.error("no MLflow parent run for this sweep: %s", err, exc_info=not isinstance(err, ValueError))
            return
        atexit.register(self._at_exit)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish(completed=True)

    def _at_exit(self) -> None:  # the sweep raised (a failed job, Ctrl-C) or the process exits early
        self._finish(completed=False)

    def _start_parent(self, config: DictConfig, study: dict[str, Any] | None = None) -> dict[str, Any]:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        from . import tracking

        uri = str(config.tracking.uri)
        experiment_name = str(config.tracking.experiment_name)
        artifact_root = config.tracking.artifact_root
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        tracking.check_server(uri)
        experiment_id = tracking.ensure_experiment(experiment_name, artifact_root, uri=uri)
        swept, values, fixed, jobs = sweep_spec(config)
        if study is not None:
            jobs = study["n_trials"]
            what = f"Optuna search over {', '.join(swept) or 'nothing'} ({study['direction']} {OBJECTIVE})"
        else:
            what = f"Hydra sweep over {', '.join(swept) or 'nothing'}"

        client = MlflowClient(tracking_uri=uri)
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
        sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
        tags = {"qat_sweep": "parent", "sweep_dir": str(sweep_dir),
                "hydra_overrides": " ".join(str(o) for o in config.hydra.overrides.task) or "(none)",
                "launcher": launcher.rsplit(".", 1)[-1], "sweeper": sweeper.rsplit(".", 1)[-1],
                "git_commit": tracking.git_commit() or "unknown",
                "mlflow.note.content": f"{what}: {jobs if jobs is not None else '?'} jobs; summary in "
                                       f"{CSV_FILE} when it ends"}
        run = tracking.with_retries(
            lambda: client.create_run(experiment_id, run_name=f"sweep {sweep_dir.name}", tags=tags),
            "MLflow parent run")
        params = {f"sweep.{k}": ",".join(v) for k, v in values.items()}
        params.update({k: v for k, v in fixed.items() if not k.startswith(("hydra", "paths"))})
        params["sweep.jobs"] = "?" if jobs is None else str(jobs)
        if study is not None:
            params.update({f"sweep.{k}": v for k, v in study.items() if k != "n_trials"})
        params = {_param_key(k): str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in params.items()}
        tracking.with_retries(lambda: client.log_batch(
            run.info.run_id, params=[Param(k, v) for k, v in params.items()]), "MLflow parent params")
        record = {"run_id": run.info.run_id, "tracking_uri": uri, "experiment_id": experiment_id,
                  "experiment_name": experiment_name, "sweep_dir": str(sweep_dir), "swept": swept,
                  "jobs": jobs, "sweeper": OPTUNA if study is not None else "grid", "study": study}
        write_sweep_parent(sweep_dir, record)
        log.info("MLflow parent run %s for the sweep in %s (%s jobs)", run.info.run_id, sweep_dir,
                 "?" if jobs is None else jobs)
        return record

    def _finish(self, completed: bool) -> None:
        parent, self.parent = self.parent, None
        if parent is None:
            return
        atexit.unregister(self._at_exit)
        from mlflow.entities import Metric, RunStatus
        from mlflow.tracking import MlflowClient

        from . import tracking

        client = MlflowClient(tracking_uri=parent["tracking_uri"])
        run_id, sweep_dir = parent["run_id"], Path(parent["sweep_dir"])
        status = RunStatus.to_string(RunStatus.FAILED)
        try:
            children = tracking.with_retries(lambda: client.search_runs(
                [parent["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
                max_results=50000), "MLflow child runs")
            run_status = {r.data.tags.get("job_dir", ""): r.info.status for r in children}
            rows, csv_path, png_path = summarize(
                sweep_dir, parent.get("swept", []), run_status, plot=self.plot,
                title=f"{parent['experiment_name']}: sweep {sweep_dir.name}", kind=parent.get("sweeper", "grid"))
            for path in (csv_path, png_path):
                if path is not None:
                    tracking.with_retries(lambda p=path: client.log_artifact(run_id, str(p)),
                                          f"MLflow artifact {path.name}")
            statuses = [row["status"] for row in rows] + [r.info.status for r in children
                                                          if r.data.tags.get("job_dir", "") not in
                                                          {row["job_dir"] for row in rows}]
            finished = sum(s == "FINISHED" for s in statuses)
            best = best_row(rows)
            metrics = {"jobs_total": float(len(statuses)), "jobs_finished": float(finished),
                       "jobs_failed": float(len(statuses) - finished)}
            expected = parent.get("jobs")
            if expected is not None:
                metrics["jobs_expected"] = float(expected)
            if best is not None:
                metrics["best_int8_acc"] = float(best[OBJECTIVE])
                best_tags = {"best_run_id": str(best["mlflow_run_id"]), "best_job": str(best["job"]),
                             "best_overrides": " ".join(f"{k}={best.get(k, '')}" for k in parent.get("swept", []))}
                for key, value in best_tags.items():
                    tracking.with_retries(lambda k=key, v=value: client.set_tag(run_id, k, v), "MLflow parent tags")
            tracking.set_description(sweep_description(rows, parent, png_path is not None), run_id,
                                     parent["tracking_uri"])
            now = int(time.time() * 1000)
            tracking.with_retries(lambda: client.log_batch(
                run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()]), "MLflow parent metrics")
            if completed and finished == len(statuses) and (expected is None or finished >= expected):
                status = RunStatus.to_string(RunStatus.FINISHED)
            elif "KILLED" in statuses:
                status = RunStatus.to_string(RunStatus.KILLED)
            log.info("sweep summary: %d/%d jobs finished%s; %s%s", finished, len(statuses),
                     f", best: job {best['job']} ({_label_values(best, parent.get('swept', []))}) int8 "
                     f"accuracy {_fmt(best[OBJECTIVE], '.4f')}" if best is not None else "", csv_path,
                     f", {png_path}" if png_path else "")
        except Exception:
            log.exception("could not summarise the sweep in %s", sweep_dir)
        finally:
            tracking.with_retries(lambda: client.set_terminated(run_id, status), "MLflow end parent run")
            log.info("MLflow parent run %s ended %s", run_id, status)
            log.info("%s", tracking.open_hint(parent["tracking_uri"], str(parent["experiment_id"]), run_id,
                                              "the sweep"))

    # -- every job's process (the launching one for the basic launcher, workers otherwise)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        mlflow = sys.modules.get("mlflow")
        if mlflow is None:
            return
        while (active := mlflow.active_run()) is not None:  # never carried into the next job
            log.warning("MLflow run %s was still active at the end of the job: ended FAILED",
                        active.info.run_id)
            mlflow.end_run("FAILED")


def _param_key(key: str) -> str:
    """MLflow param names allow alphanumerics, _ - . / and spaces."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key.lstrip("+~"))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m qat_runner.sweep SWEEP_DIR`: rewrite the sweep's CSV and plot from its job dirs."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m qat_runner.sweep SWEEP_DIR", file=sys.stderr)
        return 2
    sweep_dir = Path(args[0])
    if not sweep_dir.is_dir():
        print(f"error: {sweep_dir} is not a directory", file=sys.stderr)
        return 2
    rows, csv_path, png_path = summarize(sweep_dir, title=f"sweep {sweep_dir.name}")
    print(f"{len(rows)} jobs: {csv_path}" + (f", {png_path}" if png_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
