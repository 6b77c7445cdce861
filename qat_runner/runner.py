"""One experiment, end to end: data, float model, PTQ baseline, QAT, int8 artifact, runtime check.

Read top to bottom; each step is one call into a module that does one job.
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import random
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from . import float_cache, tracking
from .artifact import check_artifact, integer_kernel_count
from .config import ConfigError, first_sentence, resolve_device, validate
from .data import DataSplits
from .engine import QuantConfig, calibrate, check_quantizable, freeze_bn_stats, format_report, quantization_report, turn_quantize
from .engine.export import export_float_onnx, export_int8_onnx
from .engine.files import write_text_atomically
from .mixed_precision import plan_layers
from .models import load_weights, weights_eval_transform
from .mnn_export import MNN_FILE  # export.mnn=true; MNN itself is imported only to use it
from .targets import PROJECT_TARGETS
from .checkpoint import CHECKPOINT_FILE, Checkpointer, load_checkpoint, restore_rng_state, rng_state
from .train import NonFiniteLossError, evaluate, stream_loader, train

log = logging.getLogger(__name__)
for _noisy in ("onnx_ir", "onnxscript"):  # the ONNX exporter logs every pass at INFO
    logging.getLogger(_noisy).setLevel(logging.WARNING)

INT8_FILE, FLOAT_FILE, SUMMARY_FILE = "model.int8.onnx", "model.float.onnx", "summary.json"


def build(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, but a ConfigError from our builders stays a ConfigError."""
    try:
        return instantiate(node, **kwargs, _convert_="all")
    except InstantiationException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def build_model(node: DictConfig) -> torch.nn.Module:
    """The model node's `_target_`, built. Our builders take every model key; a user's own class
    (model=module) gets only the keys its constructor names, plus its weights (a checkpoint path)."""
    if node._target_ in PROJECT_TARGETS:
        return build(node)
    module, _, attribute = node._target_.rpartition(".")
    try:  # importlib, not hydra's get_object, which logs an error line of its own
        target = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"model._target_={node._target_!r} cannot be imported ({type(err).__name__}: "
                          f"{first_sentence(err)}): is its package installed or on PYTHONPATH?") from None
    params = inspect.signature(target).parameters
    # A **kwargs constructor (torchvision's builders) gets num_classes and the user's own +model keys,
    # not our bookkeeping keys (name, in_channels, image_size), which it would pass on and choke on.
    takes_more = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    ours = {"name", "in_channels", "image_size", "weights"}
    keys = [k for k in node if k != "_target_" and (k in params or (takes_more and k not in ours))]
    model = build(OmegaConf.create({"_target_": node._target_, **{k: node[k] for k in keys}}))
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model._target_={node._target_!r} built a {type(model).__name__}, not a "
                          "torch.nn.Module: name a model class or a function that returns one")
    if node.get("weights") and "weights" not in keys:
        load_weights(model, node.weights)
    return model


def check_traceable(model: torch.nn.Module, quant) -> None:
    """Refuse, before any training, a model torch.fx cannot trace: the error names the layer and line."""
    try:
        check_quantizable(model, quant)
    except TypeError as err:
        raise ConfigError(str(err)) from None
    except ValueError as err:  # a quant.layers pattern that matches no layer
        raise ConfigError(f"quant.{err}") from None


class TrainingError(RuntimeError):
    """Training cannot go on (NaN/inf loss), or an artifact fails its check; reported as one
    line, the run marked FAILED."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_data(cfg: DictConfig) -> DataSplits:
    eval_transform = None
    if cfg.dataset.name == "imagefolder":  # named torchvision weights bring their own preprocessing
        eval_transform = weights_eval_transform(cfg.model.name, cfg.model.weights)
    extra = {"eval_transform": eval_transform} if eval_transform is not None else {}
    return build(cfg.dataset, **extra)


def check_batch_size(cfg: DictConfig, data: DataSplits) -> None:
    if cfg.trainer.batch_size > len(data.train):
        raise ConfigError(f"trainer.batch_size={cfg.trainer.batch_size} is larger than the training set "
                          f"({len(data.train)} samples): use at most {len(data.train)}")


def test_loader(cfg: DictConfig, data: DataSplits) -> DataLoader:
    return DataLoader(data.test, batch_size=cfg.trainer.eval_batch_size, shuffle=False,
                      num_workers=cfg.dataset.num_workers)


def write_json_atomically(path: Path, payload: dict) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=True))


def result_rows(summary: dict) -> list[tuple[str, str]]:
    """(figure, value) of a run's result: the printed table and the MLflow run's description."""
    return [("float accuracy", f"{summary['float_acc']:.4f}"),
            ("PTQ accuracy (calibration only)", f"{summary['ptq_acc']:.4f}"),
            ("QAT accuracy (test phase)", f"{summary['qat_acc']:.4f}"),
            ("int8 artifact accuracy (onnxruntime)", f"{summary['int8_acc']:.4f}"),
            ("agreement artifact vs test phase", f"{summary['int8_agreement']:.4f}"),
            ("float ONNX size", f"{summary['float_bytes']:,} B"),
            ("int8 artifact size", f"{summary['int8_bytes']:,} B ({summary['size_ratio']:.1%} of float)"),
            ("integer kernels run / quantized layers", f"{summary['int8_kernels']} / {summary['quantized_layers']}"),
            *mnn_rows(summary)]


def mnn_rows(summary: dict) -> list[tuple[str, str]]:
    """The MNN artifact's rows, where the run made one (export.mnn=true)."""
    if "mnn_acc" not in summary:
        return []
    ratio = summary["mnn_bytes"] / summary["float_bytes"]
    return [("MNN int8 accuracy (MNN runtime)", f"{summary['mnn_acc']:.4f}"),
            ("agreement MNN vs test phase", f"{summary['mnn_agreement']:.4f}"),
            ("MNN int8 size", f"{summary['mnn_bytes']:,} B ({ratio:.1%} of float)")]


def result_table(summary: dict) -> str:
    rows = result_rows(summary)
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def result_markdown(summary: dict, cfg: DictConfig, output_dir: Path) -> str:
    """The run's description in the MLflow UI: the headline first (the UI shows the first lines
    until "Show more"), then the result table and where the files are."""
    head = (f"**int8 artifact accuracy {summary['int8_acc']:.4f}** (onnxruntime), "
            f"{summary['int8_bytes']:,} B = {summary['size_ratio']:.1%} of float; "
            f"{cfg.model.name} on {cfg.dataset.name}, {summary['bits']}-bit weights, "
            f"{summary['feature_bits']}-bit features, lr {cfg.optim.lr:g}")
    table = tracking.markdown_table(("figure", "value"), result_rows(summary))
    return f"{head}\n\n{table}\n\nRun directory: `{output_dir}` (`{INT8_FILE}`, `{SUMMARY_FILE}`)\n"


def mnn_artifact(qat: torch.nn.Module, example: torch.Tensor, test_batches: DataLoader,
                 output_dir: Path) -> dict:
    """Write model.int8.mnn (export.mnn=true) and score it in MNN's runtime: its summary keys."""
    from .mnn_export import MnnExportError, check_mnn_artifact, export_int8_mnn  # MNN is optional

    try:
        path = export_int8_mnn(qat, example, output_dir / MNN_FILE)
    except MnnExportError as err:
        raise TrainingError(f"MNN export: {err}") from None
    check = check_mnn_artifact(path, qat, test_batches)
    log.info("MNN int8 accuracy %.4f, agreement with the test phase %.4f, %d B",
             check.mnn_acc, check.agreement, path.stat().st_size)
    return {"mnn_acc": check.mnn_acc, "mnn_agreement": check.agreement, "mnn_bytes": path.stat().st_size}


def bn_freezer(freeze_step: int | None, qat: torch.nn.Module) -> Callable[[int], None] | None:
    """quant.bn_freeze_step: after that many QAT steps, BatchNorm keeps its running statistics."""
    if freeze_step is None:
        return None
    frozen = False

    def before_step(step: int) -> None:
        nonlocal frozen
        if step > freeze_step and not frozen:
            frozen = True
            log.info("BatchNorm statistics frozen in %d layers from QAT step %d", freeze_bn_stats(qat), step)
    return before_step


# Each stage draws its batches from its own seeded stream (see train.ShuffledStream).
FLOAT_STREAM, CALIBRATION_STREAM, QAT_STREAM = 0, 1, 2


@dataclass
class Start:
    """Where QAT begins: the QAT model and its optimizer, the float and PTQ accuracies, and the
    step (with the training time before it) to go on from; a resumed job also brings its MLflow
    run and the random state to restore just before training goes on."""

    qat: torch.nn.Module
    optimizer: torch.optim.Optimizer
    float_acc: float
    ptq_acc: float
    step: int = 0
    seconds_before: float = 0.0
    run_id: str | None = None
    rng: dict | None = None
    layers: tuple = ()  # per-layer bits QAT runs with (quant.layers, or chosen for quant.size_budget)

    def restore_rng(self) -> None:
        if self.rng is not None:
            restore_rng_state(self.rng)


def float_scheduler(t: DictConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The float stage's lr schedule (`trainer.float_schedule`): None for constant."""
    if t.float_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.float_steps)
    return None


def resumed_start(cfg: DictConfig, checkpoint: dict, model: torch.nn.Module,
                  make_qat: Callable[[tuple | None], torch.nn.Module]) -> Start:
    """The state saved in `checkpoint`, loaded into this config's model and optimizer; everything
    that can fail is checked here, before the MLflow run reopens."""
    try:
        model.load_state_dict(checkpoint["float_model"])
        qat = make_qat(checkpoint.get("quant_layers"))
        qat.load_state_dict(checkpoint["qat_model"])
        optimizer = instantiate(cfg.optim)(qat.parameters())
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise ConfigError(f"trainer.resume={cfg.trainer.resume!r} does not match this config's model or "
                          f"optimizer ({first_sentence(err)}): resume with the config of that run") from None
    tracking.require_run(cfg.tracking.uri, checkpoint["mlflow_run_id"], f"trainer.resume={cfg.trainer.resume!r}")
    log.info("float accuracy %.4f", checkpoint["float_acc"])
    log.info("resumed from %s at QAT step %d", cfg.trainer.resume, checkpoint["step"])
    return Start(qat, optimizer, checkpoint["float_acc"], checkpoint["ptq_acc"], checkpoint["step"],
                 checkpoint["train_seconds"], checkpoint["mlflow_run_id"], checkpoint["rng"],
                 qat.quant_config.layers)


def fresh_start(cfg: DictConfig, model: torch.nn.Module, make_qat: Callable[[tuple | None], torch.nn.Module],
                stream: Callable[[int], DataLoader], test_batches: DataLoader, device: torch.device,
                quant: QuantConfig, output_dir: Path) -> Start:
    """A new run's params, the float model trained (`trainer.float_steps`), then the QAT model,
    its optimizer and the PTQ baseline (calibration only)."""
    t = cfg.trainer
    tracking.log_params(tracking.flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)))
    if t.float_steps > 0 and not (t.float_cache and float_cache.load(cfg, model)):
        optimizer = instantiate(cfg.optim, lr=t.float_lr)(model.parameters())
        train(model, stream(FLOAT_STREAM), optimizer, t.float_steps, device, "float training",
              lambda s, loss, acc: tracking.log_metrics({"float_train_loss": loss, "float_train_acc": acc}, step=s),
              t.log_every, scheduler=float_scheduler(t, optimizer))
        if t.float_cache:
            float_cache.save(cfg, model)
    float_acc = evaluate(model, test_batches, device)
    log.info("float accuracy %.4f", float_acc)
    planned = plan_layers(cfg.quant, model, quant, stream(CALIBRATION_STREAM),
                          test_batches, output_dir, tracking.log_artifact)
    qat = make_qat(planned.layers)
    optimizer = instantiate(cfg.optim)(qat.parameters())
    calibrate(qat, stream(CALIBRATION_STREAM), cfg.quant.calibration_batches)
    ptq_acc = evaluate(qat, test_batches, device)
    log.info("PTQ accuracy %.4f (%d calibration batches)", ptq_acc, cfg.quant.calibration_batches)
    return Start(qat, optimizer, float_acc, ptq_acc, layers=planned.layers)


def run(cfg: DictConfig, output_dir: Path, overrides: str = "") -> dict:
    """Run one job; returns the summary also written to `output_dir/summary.json`."""
    quant = validate(cfg)  # every check that needs no data or model, before loading anything
    device = resolve_device(cfg.trainer.device)
    checkpoint = load_checkpoint(cfg.trainer.resume) if cfg.trainer.resume else None
    seed_everything(cfg.seed)
    data = build_data(cfg)
    model = build_model(cfg.model).to(device)
    check_traceable(model, quant)
    check_batch_size(cfg, data)
    test_batches = test_loader(cfg, data)
    example = next(iter(test_batches))[0][:2]
    t = cfg.trainer

    def stream(offset: int, start_step: int = 0) -> DataLoader:
        return stream_loader(data.train, t.batch_size, cfg.seed * 10 + offset, start_step, cfg.dataset.num_workers)

    def make_qat(layers: tuple | None = None) -> torch.nn.Module:
        """The QAT model, with `layers` (per-layer bits) in place of quant.layers where given."""
        return turn_quantize(model, quant if layers is None else dataclasses.replace(quant, layers=layers))

    # A resumed job is checked against its checkpoint before its MLflow run reopens; a fresh job
    # trains the float model and measures the PTQ baseline inside its new run.
    resumed = resumed_start(cfg, checkpoint, model, make_qat) if checkpoint is not None else None
    tags = {"git_commit": tracking.git_commit() or "unknown", "hydra_overrides": overrides or "(none)",
            "model": cfg.model.name, "dataset": cfg.dataset.name}
    with tracking.tracked_run(cfg.tracking.uri, cfg.tracking.experiment_name, cfg.tracking.artifact_root,
                              run_name=output_dir.name, tags=tags,
                              resume_run_id=resumed.run_id if resumed else None) as active:
        run_id = active.info.run_id
        OmegaConf.save(cfg, output_dir / "resolved_config.yaml", resolve=True)
        start = resumed or fresh_start(cfg, model, make_qat, stream, test_batches, device, quant, output_dir)
        qat, optimizer, float_acc, ptq_acc = start.qat, start.optimizer, start.float_acc, start.ptq_acc
        layers = quantization_report(qat)
        (output_dir / "quantized_layers.txt").write_text(format_report(layers) + "\n")
        start.restore_rng()

        checkpoint_path = output_dir / "checkpoints" / CHECKPOINT_FILE
        started = time.perf_counter()

        def state(step: int) -> dict:
            return {"step": step, "float_model": model.state_dict(), "qat_model": qat.state_dict(),
                    "optimizer": optimizer.state_dict(), "rng": rng_state(), "float_acc": float_acc,
                    "ptq_acc": ptq_acc, "mlflow_run_id": run_id, "quant_layers": start.layers,
                    "train_seconds": start.seconds_before + time.perf_counter() - started}

        checkpointer = Checkpointer(checkpoint_path, state, t.checkpoint_every)
        try:
            result = train(qat, stream(QAT_STREAM, start.step), optimizer, t.max_steps, device, "QAT",
                           lambda s, loss, acc: tracking.log_metrics({"train_loss": loss, "train_acc": acc}, step=s),
                           t.log_every, start_step=start.step, checkpointer=checkpointer,
                           before_step=bn_freezer(cfg.quant.bn_freeze_step, qat))
        except NonFiniteLossError as err:
            where = f"last good checkpoint: {checkpoint_path}" if checkpoint_path.exists() else "no checkpoint yet"
            raise TrainingError(f"{err} ({where})") from None
        train_seconds = start.seconds_before + result.seconds
        qat_acc = evaluate(qat, test_batches, device)
        log.info("QAT accuracy %.4f after %d steps (%.1f s)", qat_acc, t.max_steps, train_seconds)

        model.cpu()
        qat.cpu()
        float_path = export_float_onnx(model, example, output_dir / FLOAT_FILE)
        int8_path = export_int8_onnx(qat, example, output_dir / INT8_FILE)
        check = check_artifact(int8_path, qat, test_batches)
        summary = {
            "float_acc": float_acc, "ptq_acc": ptq_acc, "qat_acc": qat_acc,
            "int8_acc": check.int8_acc, "int8_agreement": check.agreement,
            "float_bytes": float_path.stat().st_size, "int8_bytes": int8_path.stat().st_size,
            "bits": quant.bits, "feature_bits": quant.feature_bits, "mlflow_run_id": run_id,
            "train_seconds": train_seconds, "quantized_layers": sum(r.weight_bits is not None for r in layers),
            "int8_kernels": integer_kernel_count(int8_path), "test_samples": check.samples,
        }
        summary["size_ratio"] = summary["int8_bytes"] / summary["float_bytes"]
        want_mnn = bool(OmegaConf.select(cfg, "export.mnn", default=False))
        if want_mnn:
            summary.update(mnn_artifact(qat, example, test_batches, output_dir))
        if start.layers:  # per-layer bits: {float-model module name: bits, or None for float}
            summary["layer_bits"] = {row.name: row.weight_bits for row in layers}
        write_json_atomically(output_dir / SUMMARY_FILE, summary)

        tracking.log_metrics({k: float(v) for k, v in summary.items()
                              if isinstance(v, (int, float)) and k not in ("bits", "feature_bits")})
        for name in (SUMMARY_FILE, "resolved_config.yaml", "quantized_layers.txt", *[MNN_FILE] * want_mnn):
            tracking.log_artifact(output_dir / name)
        with torch.no_grad():
            example_output = qat.eval()(example).numpy()
        tracking.log_onnx_model(int8_path, example.numpy(), example_output)
        tracking.set_description(result_markdown(summary, cfg, output_dir))
    log.info("results\n%s", result_table(summary))
    log.info("%s", tracking.open_hint(cfg.tracking.uri, active.info.experiment_id, run_id))
    return summary
