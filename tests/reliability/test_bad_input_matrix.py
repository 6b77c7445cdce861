"""The bad-input matrix: every row fails with a non-zero exit code and one line that names the
bad value and what is accepted, before training where that can be known early; it leaves no
MLflow run RUNNING, no int8 artifact and no temporary file behind.

Every row exits 2 with `error: <key>=<value> ...`, Hydra's own schema and composition errors
(a float or a word for an int, an unknown enum name, key or config option, a bad sweep value)
included: the command line is composed once before Hydra runs (qat_runner/preflight.py).
"""
from __future__ import annotations

import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from qat_runner.preflight import command_line_error

from helpers.reliability import (Job, assert_no_leftovers, assert_no_training, load_checkpoint_file,
                                 mlflow_runs, one_error_line, run_jobs)

pytestmark = pytest.mark.slow

# Hang detectors, not speed targets (a loaded machine made a 6 s row take 36 s): that every row
# fails before training is asserted by assert_no_training, and the server row's message proves our
# health check answered, not MLflow's retries (which go on for minutes).
FAIL_FAST_SECONDS = 120.0


@dataclass(frozen=True)
class Row:
    args: tuple[str, ...]
    value: str  # regex the error line must match: the key and the bad value
    accepted: str | None  # regex for the "what is accepted" part of the line
    prereq: bool = False  # needs the finished LeNet run (its checkpoint and MLflow store)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# {placeholders} are filled in by the fixture: files and folders made for the rows
OUR_ROWS: dict[str, Row] = {
    "bits=0": Row(("quant.bits=0",), r"quant\.bits=0\b", r"2 to 8"),
    "unknown_model": Row(("model=torchvision", "model.name=nope"), r"model\.name='?nope'?",
                         r"one of .*\bresnet18\b"),
    "missing_dataset_root": Row(("dataset=fashion_mnist", "dataset.root={missing}"),
                                r"dataset\.root='?{missing}'?", r"IDX"),
    "unset_imagefolder_root": Row(("dataset=imagefolder",), r"dataset\.root\b", r"dataset\.root=/"),
    "empty_imagefolder": Row(("dataset=imagefolder", "dataset.root={empty_tree}", "dataset.num_classes=2"),
                             r"dataset\.root='?{empty_tree}'?", r"class folder"),
    "corrupt_weights": Row(("model=torchvision", "model.name=resnet18", "model.weights={corrupt}"),
                           r"model\.weights='?{corrupt}'?", r"checkpoint"),
    "mismatched_weights": Row(("model=torchvision", "model.name=resnet18", "model.weights={other_model}"),
                              r"model\.weights='?{other_model}'?", r"resnet18"),
    "corrupt_resume": Row(("trainer.resume={corrupt}",), r"trainer\.resume='?{corrupt}'?", r"checkpoint"),
    "resume_not_a_checkpoint": Row(("trainer.resume={other_model}",), r"trainer\.resume='?{other_model}'?",
                                   r"lacks .*\bstep\b"),
    # a real QAT checkpoint (LeNet on digits) resumed as another model: known once the model is
    # built, before the MLflow run is reopened; the finished run it came from must stay FINISHED
    "resume_other_model": Row(("trainer.resume={lenet_ckpt}", "model=torchvision", "model.name=resnet18",
                               "dataset=fake", "dataset.image_size=16"),
                              r"trainer\.resume='?{lenet_ckpt}'?", None, prereq=True),
    # the checkpoint's MLflow run is not in this job's store (another paths.outputs)
    "resume_foreign_store": Row(("trainer.resume={lenet_ckpt}",), r"{lenet_run_id}", None, prereq=True),
    "unwritable_outputs": Row((), r"paths\.outputs='?{unwritable}'?", r"writable"),
    "tracking_server_down": Row(("tracking.uri=http://127.0.0.1:{port}",),
                                r"tracking\.uri='?http://127\.0\.0\.1:{port}'?", r"tracking=sqlite"),
    "batch_size_too_large": Row(("trainer.batch_size=5000",), r"trainer\.batch_size=5000\b",
                                r"at most \d+"),
    "image_too_small": Row(("model=torchvision", "model.name=alexnet", "dataset=fake", "dataset.image_size=16"),
                           r"dataset\.image_size=16\b.*\balexnet\b", r"dataset\.image_size=63 or more"),
    # Hydra's schema and composition errors, raised while composing the command line
    "bits=3.5": Row(("quant.bits=3.5",), r"quant\.bits='?3\.5'?", r"integer"),
    "bad_sweep_value": Row(("-m", "quant.bits=4,x"), r"quant\.bits='?x'?", r"integer"),
}

# Rows refused by the command-line check that runs before Hydra (qat_runner/preflight.py):
# checked in-process, through the function `python -m qat_runner` calls first; the rows
# above keep a few of the same kind (bits=0, bits=3.5, a sweep value) as real processes.
PREFLIGHT_ROWS: dict[str, Row] = {
    "bits=1": Row(("quant.bits=1",), r"quant\.bits=1\b", r"2 to 8"),
    "bits=9": Row(("quant.bits=9",), r"quant\.bits=9\b", r"2 to 8"),
    "feature_bits=9": Row(("quant.feature_bits=9",), r"quant\.feature_bits=9\b", r"2 to 8"),
    "momentum=0": Row(("quant.momentum=0",), r"quant\.momentum=0(\.0)?\b", r"between 0 and 1"),
    "momentum=1.5": Row(("quant.momentum=1.5",), r"quant\.momentum=1\.5\b", r"between 0 and 1"),
    "model.num_classes=0": Row(("model.num_classes=0",), r"model\.num_classes=0\b", r">= ?1"),
    "dataset.num_classes=0": Row(("dataset.num_classes=0",), r"num_classes=0\b", r">= ?1"),
    "device_unavailable": Row(("trainer.device=cuda:99",), r"trainer\.device='cuda:99'", r"auto or cpu"),
    "optim.lr=abc": Row(("optim.lr=abc",), r"optim\.lr='abc'", r"number > 0"),
    "bits=eight": Row(("quant.bits=eight",), r"quant\.bits='?eight'?", r"integer"),
    "feature_scale_stat_method=Foo": Row(("quant.feature_scale_stat_method=Foo",),
                                         r"quant\.feature_scale_stat_method='?Foo'?", r"PerTensor, PerChannel"),
    "scale_update_method=Foo": Row(("quant.scale_update_method=Foo",), r"quant\.scale_update_method='?Foo'?",
                                   r"(Maximum, MovingAverage|MovingAverage, Maximum)"),
    "symmetric_features=maybe": Row(("quant.symmetric_features=maybe",),
                                    r"quant\.symmetric_features='?maybe'?", r"true or false"),
    "unknown_key": Row(("quant.bitz=4",), r"quant\.bitz\b", r"\+quant\.bitz="),
    "unknown_group_option": Row(("quant=foo",), r"quant=foo\b", r"one of default"),
    "unknown_experiment": Row(("+experiment=nope",), r"experiment=nope\b", r"one of .*\blenet_digits\b"),
    "bad_override_syntax": Row(("quant.bits=[1",), r"quant\.bits=\[1", r"grammar"),
}

PREREQ = "_finished_lenet_run"


@dataclass
class Matrix:
    results: dict
    places: dict[str, str]
    outputs: dict[str, Path]
    run_dirs: dict[str, Path]


def _fill(text: str, places: dict[str, str], regex: bool = False) -> str:
    return text.format(**{k: re.escape(v) if regex else v for k, v in places.items()})


@pytest.fixture(scope="module")
def matrix(rel_cli, tmp_path_factory) -> Matrix:
    import torch
    import torchvision

    base = tmp_path_factory.mktemp("bad_input")
    empty_tree = base / "empty_imagefolder"
    (empty_tree / "train").mkdir(parents=True)
    (empty_tree / "val").mkdir(parents=True)
    corrupt = base / "corrupt.pth"
    corrupt.write_bytes(b"this is not a PyTorch checkpoint\x00\x01\x02" * 10)
    other_model = base / "mobilenet_v2_state.pth"
    torch.save(torchvision.models.get_model("mobilenet_v2", weights=None, num_classes=10).state_dict(),
               other_model)
    a_file = base / "a_file"
    a_file.write_text("a regular file, not a folder\n")
    prereq_outputs, prereq_run = base / "prereq_store", base / "prereq_run"
    places = {"missing": str(base / "no_such_folder"), "empty_tree": str(empty_tree),
              "corrupt": str(corrupt), "other_model": str(other_model),
              "unwritable": str(a_file / "out"), "port": str(_closed_port()),
              "lenet_ckpt": str(prereq_run / "checkpoints" / "last.pt"), "lenet_run_id": "?"}

    jobs: dict[str, Job] = {
        PREREQ: Job([f"hydra.run.dir={prereq_run}", "trainer.float_steps=20", "trainer.max_steps=20",
                     "trainer.checkpoint_every=10"], prereq_outputs)}
    outputs: dict[str, Path] = {}
    run_dirs: dict[str, Path] = {}
    for i, (key, row) in enumerate(OUR_ROWS.items()):
        args = [_fill(a, places) for a in row.args]
        run_dirs[key] = base / f"row{i:02d}_run"
        if key == "unwritable_outputs":
            outputs[key] = Path(places["unwritable"])  # the default hydra.run.dir is under it
        else:
            outputs[key] = base / f"row{i:02d}_outputs"
            args.append(f"hydra.run.dir={run_dirs[key]}")
        before = None
        if key == "resume_other_model":  # the same store as the checkpoint's run: a copy of it
            def before(results, dest=outputs[key]):
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(prereq_outputs / "mlflow.db", dest / "mlflow.db")
        jobs[key] = Job(args, outputs[key], needs=PREREQ if row.prereq else None, before=before,
                        timeout=180)
    # the prerequisite first, then the rows that need it as soon as it is done
    order = [PREREQ] + [k for k in jobs if k != PREREQ and not (k in OUR_ROWS and OUR_ROWS[k].prereq)]
    order[2:2] = [k for k in OUR_ROWS if OUR_ROWS[k].prereq]
    results = run_jobs(rel_cli, {k: jobs[k] for k in order})
    prereq = results[PREREQ]
    assert prereq.returncode == 0, prereq.describe()
    places["lenet_run_id"] = load_checkpoint_file(Path(places["lenet_ckpt"]))["mlflow_run_id"]
    return Matrix(results, places, outputs, run_dirs)


@pytest.mark.parametrize("key", list(OUR_ROWS))
def test_bad_input_row(matrix, key):
    row, result = OUR_ROWS[key], matrix.results[key]
    assert result.returncode == 2, result.describe()
    line = one_error_line(result)
    assert re.search(_fill(row.value, matrix.places, regex=True), line), \
        f"the error line must name the bad value ({_fill(row.value, matrix.places)}): {line}"
    if row.accepted is not None:
        assert re.search(row.accepted, line), f"the error line must say what is accepted: {line}"
    assert_no_training(result)
    assert result.seconds < FAIL_FAST_SECONDS, f"took {result.seconds:.1f} s to fail"
    assert_no_leftovers(matrix.outputs[key], matrix.run_dirs[key])


def test_resume_other_model_keeps_the_finished_run_finished(matrix):
    """A mismatched checkpoint is refused before its MLflow run is reopened: the finished run it
    came from is not turned FAILED (nor RUNNING) by a job that could never have resumed it."""
    runs = mlflow_runs(matrix.outputs["resume_other_model"])
    run_id = matrix.places["lenet_run_id"]
    assert runs.get(run_id) == "FINISHED", (
        f"the checkpoint's run {run_id} was FINISHED before the bad resume; now {runs.get(run_id)}")


def test_resume_foreign_store_leaves_no_run(matrix):
    runs = mlflow_runs(matrix.outputs["resume_foreign_store"])
    assert all(status != "RUNNING" for status in runs.values()), runs


@pytest.mark.parametrize("key", list(PREFLIGHT_ROWS))
def test_preflight_row(key):
    row = PREFLIGHT_ROWS[key]
    line = command_line_error(list(row.args))
    assert line is not None and "\n" not in line, line
    assert re.search(row.value, line), f"the error line must name the bad value ({row.value}): {line}"
    if row.accepted is not None:
        assert re.search(row.accepted, line), f"the error line must say what is accepted: {line}"
