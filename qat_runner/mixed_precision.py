"""Per-layer sensitivity and a size budget: which layers can go to low bits, and which stay at 8.

Sensitivity (`quant.sensitivity=true`, and always for a budget): for each quantizable layer, the
accuracy drop and the logit error when only that layer is quantized at `quant.sensitivity_bits`
(post-training: calibration only, every other layer float), on a slice of the test set.

Size budget (`quant.size_budget=0.20`): every layer starts at `quant.bits`; layers move to the
low width in order of accuracy cost per byte saved (drop, then logit error, over bytes saved)
until the artifact fits the budget. The artifact's size is known in advance, not estimated: the
uniform-bits artifact is exported once, and a layer at 4 bits or fewer saves exactly half of its
INT8 weight bytes (INT4 packing); between 5 and 8 bits the weights stay INT8 and save nothing,
so the low width of a budget must be 4 or fewer.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import math
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .engine import QuantConfig, calibrate, export_int8_onnx, turn_quantize
from .engine.transform import quantizable_layers
from .errors import ConfigError

log = logging.getLogger(__name__)
PACKED_BITS = 4  # widths at or below this are stored as INT4 in the artifact
SENSITIVITY_CSV, SENSITIVITY_PNG = "sensitivity.csv", "sensitivity.png"


@dataclass(frozen=True)
class LayerSensitivity:
    name: str
    params: int  # weight elements
    accuracy: float  # test-slice accuracy with only this layer quantized
    drop: float  # float accuracy minus `accuracy`
    logit_mse: float  # mean squared logit error against the float model


def _float_all(names: list[str], keep: str, bits: int) -> dict[str, int | None]:
    """quant.layers that quantize `keep` only: it first, then every layer float."""
    return {keep: bits, **{n: None for n in names if n != keep}}


@torch.no_grad()
def _logits(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x) for x in batches])


def layer_sensitivity(model: nn.Module, quant: QuantConfig, calibration: list[torch.Tensor],
                      test: list[tuple[torch.Tensor, torch.Tensor]], bits: int,
                      progress: Callable[[int, int, str], None] | None = None) -> list[LayerSensitivity]:
    """One row per quantizable layer, most sensitive first."""
    names = quantizable_layers(torch.fx.symbolic_trace(model))
    inputs = [x for x, _ in test]
    labels = torch.cat([y for _, y in test])
    reference = _logits(model, inputs)
    float_acc = float((reference.argmax(1) == labels).float().mean())
    params = dict((n, m.weight.numel()) for n, m in model.named_modules() if n in names)
    rows = []
    for k, name in enumerate(names, 1):
        qat = turn_quantize(model, dataclasses.replace(quant, layers=_float_all(names, name, bits)))
        calibrate(qat, calibration)
        logits = _logits(qat, inputs)
        accuracy = float((logits.argmax(1) == labels).float().mean())
        rows.append(LayerSensitivity(name, params[name], accuracy, float_acc - accuracy,
                                     float(((logits - reference) ** 2).mean())))
        if progress is not None:
            progress(k, len(names), name)
    return sorted(rows, key=lambda r: (-r.drop, -r.logit_mse))


def _bytes_saved(row: LayerSensitivity, high: int, low: int) -> int:
    """INT8 to INT4 halves a weight's bytes; any other move leaves the artifact's size alone."""
    return row.params - math.ceil(row.params / 2) if high > PACKED_BITS >= low else 0


def budget_widths_problem(high: int, low: int) -> str | None:
    """Why a budget cannot work with these widths (one line), or None: only INT4 packing shrinks."""
    if low > PACKED_BITS or high <= PACKED_BITS:
        return (f"quant.size_budget needs quant.bits > {PACKED_BITS} and quant.sensitivity_bits <= {PACKED_BITS} "
                f"(got {high} and {low}): only INT4 packing makes the artifact smaller")
    return None


def choose_bits(rows: Iterable[LayerSensitivity], uniform_bytes: int, float_bytes: int, budget: float,
                high: int, low: int) -> dict[str, int]:
    """Per-layer bits that fit `budget` x `float_bytes`, giving up the least accuracy per byte.

    `uniform_bytes` is the artifact's size with every layer at `high` bits.
    """
    if (problem := budget_widths_problem(high, low)) is not None:
        raise ConfigError(problem)
    rows = list(rows)
    target = budget * float_bytes
    order = sorted(rows, key=lambda r: (max(r.drop, 0.0) / max(_bytes_saved(r, high, low), 1),
                                        r.logit_mse / max(_bytes_saved(r, high, low), 1)))
    size, bits = uniform_bytes, {r.name: high for r in rows}
    for row in order:
        if size <= target:
            break
        bits[row.name] = low
        size -= _bytes_saved(row, high, low)
    if size > target:
        reachable = size / float_bytes
        raise ConfigError(f"quant.size_budget={budget} cannot be met: every layer at {low} bits gives "
                          f"{reachable:.3f} of the float ONNX; use quant.size_budget={math.ceil(reachable * 1000) / 1000} "
                          "or more")
    return bits


def uniform_artifact_bytes(model: nn.Module, quant: QuantConfig, calibration: list[torch.Tensor]) -> int:
    """Size of the int8 artifact with every layer at `quant.bits` (calibrated, not trained)."""
    qat = calibrate(turn_quantize(model, dataclasses.replace(quant, layers={})), calibration)
    with tempfile.TemporaryDirectory(prefix="qat_budget_") as folder:
        return export_int8_onnx(qat, calibration[0][:1], Path(folder) / "uniform.onnx").stat().st_size


def write_sensitivity(rows: list[LayerSensitivity], folder: Path, bits: int) -> list[Path]:
    """sensitivity.csv (ranked) and sensitivity.png (a bar per layer, accuracy drop in points)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    table = folder / SENSITIVITY_CSV
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "layer", "params", "accuracy", "accuracy_drop", "logit_mse"])
        for rank, r in enumerate(rows, 1):
            writer.writerow([rank, r.name, r.params, f"{r.accuracy:.4f}", f"{r.drop:.4f}", f"{r.logit_mse:.6g}"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(rows)), 4.0))
    ax.bar(range(len(rows)), [100 * r.drop for r in rows], color="tab:red")
    ax.set_xticks(range(len(rows)), [r.name for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel(f"accuracy drop (points), only this layer at {bits} bits")
    ax.set_title("per-layer sensitivity, most sensitive first")
    fig.tight_layout()
    plot = folder / SENSITIVITY_PNG
    fig.savefig(plot, dpi=120)
    plt.close(fig)
    return [table, plot]


def _test_slice(loader: Iterable, samples: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `samples` test images, as (inputs, labels) batches."""
    out, seen = [], 0
    for inputs, labels in loader:
        if seen >= samples:
            break
        take = min(len(labels), samples - seen)
        out.append((inputs[:take], labels[:take]))
        seen += take
    return out


def _float_onnx_bytes(model: nn.Module, example: torch.Tensor) -> int:
    from .engine import export_float_onnx

    with tempfile.TemporaryDirectory(prefix="qat_budget_") as folder:
        return export_float_onnx(model, example, Path(folder) / "float.onnx").stat().st_size


def plan_layers(q, model: nn.Module, quant: QuantConfig, calibration: Iterable, test: Iterable,
                output_dir: Path, log_artifact: Callable[[Path], None]) -> QuantConfig:
    """The QuantConfig QAT starts from: `quant` itself, or with per-layer bits for `q.size_budget`.

    `q` is the run's quant config node (sensitivity, sensitivity_bits, sensitivity_samples,
    size_budget, calibration_batches); the sensitivity table and plot go to `output_dir` and
    through `log_artifact` to MLflow.
    """
    if not q.sensitivity and q.size_budget is None:
        return quant
    device = next(model.parameters()).device
    model = model.cpu()  # sensitivity and export sizes on the CPU: the artifact's arithmetic
    try:
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b, _ in zip(calibration, range(q.calibration_batches))]
        test_slice = _test_slice(test, q.sensitivity_samples)
        log.info("sensitivity: each of the model's layers alone at %d bits, %d test images",
                 q.sensitivity_bits, sum(len(y) for _, y in test_slice))
        rows = layer_sensitivity(model, quant, batches, test_slice, q.sensitivity_bits,
                                 lambda k, n, name: log.info("sensitivity %d/%d %s", k, n, name))
        for path in write_sensitivity(rows, output_dir, q.sensitivity_bits):
            log_artifact(path)
        log.info("most sensitive layers: %s", ", ".join(f"{r.name} ({100 * r.drop:+.1f} pt)" for r in rows[:5]))
        if q.size_budget is None:
            return quant
        float_bytes = _float_onnx_bytes(model, batches[0][:1])
        uniform = uniform_artifact_bytes(model, quant, batches)
        bits = choose_bits(rows, uniform, float_bytes, q.size_budget, quant.bits, q.sensitivity_bits)
        low = sorted(name for name, b in bits.items() if b != quant.bits)
        log.info("size budget %.3f: %d of %d layers at %d bits (%s)", q.size_budget, len(low), len(bits),
                 q.sensitivity_bits, ", ".join(low) or "none")
        return dataclasses.replace(quant, layers=bits)
    finally:
        model.to(device)
