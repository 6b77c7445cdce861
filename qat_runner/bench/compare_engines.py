"""This checkout's QAT engine against the engine of an earlier git revision, side by side.

    python -m qat_runner.bench.compare_engines --against 8f14b17 [--shapes 224x8 32x32]
        [--rounds 11] [--threads 2] [--feature-scale PerChannel] [--update Maximum]
        [--accuracy-seeds 1,2,3]

Time: one MobileNetV2 SGD step of the float model, ours now and ours at the revision, alternating
round by round in one process (`timing.alternate`), with medians and the median of the per-round
ratios to the float step. Accuracy (optional): the bench's QAT recipe (section 3's float checkpoint,
calibration and batches) once per seed with each engine, scored in PyTorch's test phase.
The revision's `qat_runner/engine` is taken with `git archive` into a temporary folder and
imported under another name, so this needs a git checkout, not an installed wheel.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import torch

from ..engine import QuantConfig, calibrate, turn_quantize  # this checkout's engine
from . import contenders, settings as bench_settings, training_cost
from .accuracy import torch_accuracy
from .run import CACHE_DIR
from .timing import alternate
from .workspace import Workspace

REPO = Path(__file__).resolve().parents[2]


def load_engine(revision: str, folder: Path):
    """`qat_runner.engine` as it was at `revision`, imported as a package of its own."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "qat_runner/engine"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    name = f"engine_{revision.replace('-', '_').replace('.', '_')}"
    (folder / "qat_runner" / "engine").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def time_steps(old_engine, shapes: list[tuple[int, int]], rounds: int, config: dict) -> list[dict]:
    rows = []
    for size, batch in shapes:
        x, y = training_cost.batch(size, batch)
        float_model = contenders.float_model(seed=0)
        models = {"float": float_model,
                  "new": turn_quantize(float_model, QuantConfig(**config)).train(),
                  "old": old_engine.turn_quantize(float_model, old_engine.QuantConfig(**config)).train()}
        steps = {name: training_cost.step_fn(model, x, y) for name, model in models.items()}
        timings = alternate(steps, rounds, warmup=2)
        row = {"image_size": size, "batch": batch}
        for name, timing in timings.items():
            row[f"{name}_ms"] = timing.median_s * 1e3
            if name != "float":
                row[f"{name}_over_float"] = timing.median_s / timings["float"].median_s
                row[f"{name}_over_float_paired"] = statistics.median(
                    a / f for a, f in zip(timing.samples, timings["float"].samples))
        rows.append(row)
    return rows


def accuracy(old_engine, seeds: list[int], config: dict) -> dict[str, list[float]]:
    scores: dict[str, list[float]] = {"new": [], "old": []}
    for seed in seeds:
        recipe = dataclasses.replace(bench_settings.QatRecipe(), seeds=(seed,))
        ws = Workspace(dataclasses.replace(bench_settings.FULL, qat_recipe=recipe),
                       Path(tempfile.mkdtemp()), Path(CACHE_DIR))
        batches = ws.calibration(ws.train_size)
        for name in scores:
            if name == "new":
                model = calibrate(turn_quantize(ws.float_model(), QuantConfig(**config)), batches)
            else:
                model = old_engine.calibrate(old_engine.turn_quantize(ws.float_model(),
                                                                      old_engine.QuantConfig(**config)), batches)
            ws._qat_train(model, f"{name} engine, seed {seed}", seed)
            scores[name].append(torch_accuracy(model.eval(), ws.test_images(), 256))
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="git revision of the engine to compare with")
    parser.add_argument("--shapes", nargs="*", default=["224x8", "32x32"], help="SIZExBATCH (none: no timing)")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--feature-scale", default="PerTensor", choices=["PerTensor", "PerChannel"])
    parser.add_argument("--update", default="MovingAverage", choices=["MovingAverage", "Maximum"])
    parser.add_argument("--accuracy-seeds", default="", help="comma-separated QAT seeds (default: none)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = {"feature_scale_stat_method": args.feature_scale, "scale_update_method": args.update}
    with tempfile.TemporaryDirectory() as folder:
        old_engine = load_engine(args.against, Path(folder))
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes]
        for row in time_steps(old_engine, shapes, args.rounds, config):
            print(f"{row['image_size']}x{row['image_size']} batch {row['batch']}: float {row['float_ms']:.1f} ms, "
                  f"new {row['new_ms']:.1f} ms ({row['new_over_float']:.3f}x, paired {row['new_over_float_paired']:.3f}x), "
                  f"old {row['old_ms']:.1f} ms ({row['old_over_float']:.3f}x, paired {row['old_over_float_paired']:.3f}x)",
                  flush=True)
        if args.accuracy_seeds:
            seeds = [int(seed) for seed in args.accuracy_seeds.split(",")]
            for name, values in accuracy(old_engine, seeds, config).items():
                print(f"accuracy {name}: " + " / ".join(f"{v:.2%}" for v in values)
                      + f", mean {statistics.mean(values):.2%}")


if __name__ == "__main__":
    main()
