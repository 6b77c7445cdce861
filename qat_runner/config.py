"""The structured-config schema (validated by Hydra/OmegaConf on composition) and its checks.

OmegaConf checks types and enum names as the config is composed; `validate` adds the range
checks (2..8 bits, momentum in (0, 1), step counts, device) before any data or model is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from .engine import FeatureScaleStatMethod, QuantConfig, ScaleUpdateMethod
from .engine.config import MAX_BITS, MIN_BITS, QuantScheme
from .errors import ConfigError, first_sentence  # noqa: F401 - re-exported
from .mixed_precision import budget_widths_problem
from .paths import PACKAGE_DIR, PROJECT_ROOT, config_dir, default_outputs, in_checkout  # noqa: F401
from .targets import check_allowed_packages, target_problem


@dataclass
class PathsConfig:
    outputs: str = MISSING  # runs, multiruns, the MLflow store and its artifacts


@dataclass
class ModelConfig:
    _target_: str = MISSING
    name: str = MISSING
    num_classes: int = MISSING
    in_channels: int = 3
    image_size: int = MISSING  # the dataset's; some models size their head with it
    weights: Optional[str] = None  # torchvision weights name, a local checkpoint path, or null
    path: Optional[str] = None  # model=onnx: the float ONNX file


@dataclass
class DatasetConfig:
    """Keys every dataset has; each dataset's schema below adds its own."""

    _target_: str = MISSING
    name: str = MISSING
    num_classes: int = MISSING
    channels: int = MISSING  # what the model expects: grey images are repeated to 3 channels
    image_size: int = MISSING
    num_workers: int = 0


@dataclass
class DigitsConfig(DatasetConfig):
    test_fraction: float = 0.2
    seed: int = 0


@dataclass
class FashionMnistConfig(DatasetConfig):
    root: str = "/usr/share/datasets/fashion-mnist"
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None


@dataclass
class ImageFolderConfig(DatasetConfig):
    root: Optional[str] = None
    augment: bool = True  # RandomResizedCrop + flip in training; false: one fixed transform (MNN)


@dataclass
class FakeConfig(DatasetConfig):
    train_size: int = 256
    test_size: int = 64
    seed: int = 0


_Q = QuantConfig()  # the engine's defaults: the one place they live
FLOAT_SCHEDULES = ("constant", "cosine")  # trainer.float_schedule


@dataclass
class QuantSchema:
    """QuantConfig's fields, typed for OmegaConf, with the engine's defaults; plus the runner's own."""

    bits: int = _Q.bits
    feature_bits: int = _Q.feature_bits
    feature_scale_stat_method: FeatureScaleStatMethod = _Q.feature_scale_stat_method
    scale_update_method: ScaleUpdateMethod = _Q.scale_update_method
    momentum: float = _Q.momentum
    symmetric_features: bool = _Q.symmetric_features
    layers: Any = None  # per-layer weight bits: {module-name pattern: bits or float}, e.g. {features.0.*: 8}
    scheme: QuantScheme = _Q.scheme  # default (onnxruntime's integer kernels) | mnn (MNN's int8 runtime)
    bn_momentum: Optional[float] = _Q.bn_momentum  # torch terms; MNN's 0.99 is torch's 0.01
    bn_freeze_step: Optional[int] = None  # QAT step from which BatchNorm uses its running statistics
    calibration_batches: int = 10  # PTQ baseline: batches observed before the PTQ evaluation
    sensitivity: bool = False  # per-layer sensitivity table and plot (sensitivity.csv/.png)
    sensitivity_bits: int = 4  # the low width each layer is tried at (and a budget moves layers to)
    sensitivity_samples: int = 1000  # test images each layer's accuracy is measured on
    size_budget: Optional[float] = None  # e.g. 0.20: per-layer bits so the artifact is <= 20% of float


@dataclass
class OptimConfig:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True
    lr: float = 1e-3


@dataclass
class TrainerConfig:
    max_steps: int = 100  # QAT iterations
    float_steps: int = 0  # float pre-training iterations (0: the model comes in converged)
    float_lr: float = 0.05
    float_schedule: str = "constant"  # constant | cosine (float_lr down to 0 over float_steps)
    float_cache: bool = False  # reuse the float stage of an earlier run with the same recipe
    batch_size: int = 32
    eval_batch_size: int = 256
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10
    checkpoint_every: int = 50  # QAT steps between checkpoints (0: only on Ctrl-C/SIGTERM)
    resume: Optional[str] = None  # a checkpoint file or a run directory to continue


@dataclass
class TrackingConfig:
    uri: str = MISSING
    experiment_name: str = MISSING
    artifact_root: Optional[str] = None  # where a new experiment keeps artifacts (file stores)


@dataclass
class ExportConfig:
    """Artifacts besides model.int8.onnx (always written)."""

    mnn: bool = False  # also model.int8.mnn: full int8 by MNN's converter, scored in MNN's runtime


@dataclass
class SecurityConfig:
    # packages whose callables a `_target_` may name, besides the built-in list (qat_runner/targets.py)
    allowed_targets: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    experiment_name: str = MISSING
    seed: int = 0
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = MISSING
    dataset: Any = MISSING  # typed by the dataset's own schema (see register)
    quant: QuantSchema = field(default_factory=QuantSchema)
    optim: Any = MISSING  # keeps optimizer-specific keys (momentum, betas, ...) open
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = MISSING
    export: ExportConfig = field(default_factory=ExportConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)


def register() -> None:
    """Put the schema in Hydra's ConfigStore and register the `qat_outputs` resolver."""
    if not OmegaConf.has_resolver("qat_outputs"):
        OmegaConf.register_new_resolver("qat_outputs", lambda: str(default_outputs()))
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="schema", node=ModelConfig)
    for name, node in (("digits", DigitsConfig), ("fashion_mnist", FashionMnistConfig),
                       ("imagefolder", ImageFolderConfig), ("fake", FakeConfig)):
        cs.store(group="dataset", name=f"{name}_schema", node=node)


def quant_config(cfg: DictConfig) -> QuantConfig:
    q = cfg.quant
    return QuantConfig(bits=q.bits, feature_bits=q.feature_bits,
                       feature_scale_stat_method=q.feature_scale_stat_method,
                       scale_update_method=q.scale_update_method, momentum=q.momentum,
                       symmetric_features=q.symmetric_features,
                       layers=_plain(q.get("layers")) or {}, scheme=q.scheme, bn_momentum=q.bn_momentum)


def _plain(value: Any) -> Any:
    """An OmegaConf node as plain Python (the engine takes no OmegaConf types)."""
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; an unavailable CUDA device is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"trainer.device={name!r} is not accepted: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and (not torch.cuda.is_available()
                                   or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"trainer.device={name!r} is not available on this machine "
                          f"({torch.cuda.device_count()} CUDA devices): use auto or cpu")
    return device


def allowed_packages(cfg: DictConfig) -> list[str]:
    """`security.allowed_targets`, checked (a config without the key allows none)."""
    packages = OmegaConf.select(cfg, "security.allowed_targets", default=None) or []
    try:
        return check_allowed_packages(packages)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_targets(key: str, node: Any, packages: list[str]) -> None:
    """Every `_target_` in the node, nested ones included (instantiate builds those too).

    Walked unresolved: a `_target_` written as an interpolation is refused, and nodes whose
    interpolations resolve only inside a running job (Hydra's own) can be checked before it.
    """
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        for name, child in node.items():
            if name == "_target_":
                problem = target_problem(key, child, packages)
                if problem is not None:
                    raise ConfigError(problem)
            else:
                check_targets(f"{key}.{name}", child, packages)
    elif isinstance(node, list):
        for i, child in enumerate(node):
            check_targets(f"{key}[{i}]", child, packages)


def check_mixed_precision(q: DictConfig, quant: QuantConfig) -> None:
    """quant.sensitivity_bits / sensitivity_samples / size_budget, checked before any work."""
    if not MIN_BITS <= q.sensitivity_bits <= MAX_BITS:
        raise ConfigError(f"quant.sensitivity_bits={q.sensitivity_bits!r} is not accepted: use an integer "
                          f"from {MIN_BITS} to {MAX_BITS}")
    if q.sensitivity_samples < 1:
        raise ConfigError(f"quant.sensitivity_samples={q.sensitivity_samples!r} is not accepted: use an integer >= 1")
    budget = q.size_budget
    if budget is None:
        return
    if not 0.0 < budget < 1.0:
        raise ConfigError(f"quant.size_budget={budget!r} is not accepted: use a fraction of the float ONNX "
                          "between 0 and 1, e.g. 0.20")
    if quant.layers:
        raise ConfigError("quant.size_budget and quant.layers are not accepted together: the budget chooses "
                          "the per-layer bits; drop one of them")
    if (problem := budget_widths_problem(quant.bits, q.sensitivity_bits)) is not None:
        raise ConfigError(problem)


def validate(cfg: DictConfig) -> QuantConfig:
    """Every check that needs no data or model; raises ConfigError naming the bad value."""
    try:
        quant = quant_config(cfg)
    except ValueError as err:
        raise ConfigError(f"quant.{err}") from None
    packages = allowed_packages(cfg)
    for key in ("model", "dataset", "optim"):
        check_targets(key, cfg[key], packages)
    t = cfg.trainer
    for key in ("max_steps", "float_steps"):
        if t[key] < 0:
            raise ConfigError(f"trainer.{key}={t[key]!r} is not accepted: use an integer >= 0")
    if t.checkpoint_every < 0:
        raise ConfigError(f"trainer.checkpoint_every={t.checkpoint_every!r} is not accepted: use an integer >= 0")
    for key in ("batch_size", "eval_batch_size", "log_every"):
        if t[key] < 1:
            raise ConfigError(f"trainer.{key}={t[key]!r} is not accepted: use an integer >= 1")
    check_mixed_precision(cfg.quant, quant)
    if cfg.quant.bn_freeze_step is not None and cfg.quant.bn_freeze_step < 0:
        raise ConfigError(f"quant.bn_freeze_step={cfg.quant.bn_freeze_step!r} is not accepted: use an integer "
                          ">= 0 or null")
    if cfg.quant.calibration_batches < 1:
        raise ConfigError(f"quant.calibration_batches={cfg.quant.calibration_batches!r} is not "
                          "accepted: use an integer >= 1")
    if cfg.model.num_classes < 1:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes!r} is not accepted: use an integer >= 1")
    if t.float_schedule not in FLOAT_SCHEDULES:
        raise ConfigError(f"trainer.float_schedule={t.float_schedule!r} is not accepted: use one of "
                          f"{', '.join(FLOAT_SCHEDULES)}")
    if not t.float_lr > 0:
        raise ConfigError(f"trainer.float_lr={t.float_lr!r} is not accepted: use a number > 0")
    lr = cfg.optim.get("lr", 1.0)  # optim is open (Any): its values are not typed by the schema
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError(f"optim.lr={lr!r} is not accepted: use a number > 0")
    resolve_device(t.device)
    check_export(cfg)
    return quant


def check_export(cfg: DictConfig) -> None:
    """`export.mnn=true` needs MNN installed (the `mnn` extra) and one scale per feature tensor,
    as MNN's int8 tensors have: both known before any training."""
    if not OmegaConf.select(cfg, "export.mnn", default=False):
        return
    from .mnn_export import mnn_missing, missing_mnn_message  # loads onnx: only when export.mnn=true

    if mnn_missing():
        raise ConfigError(missing_mnn_message())
    if cfg.quant.feature_scale_stat_method == FeatureScaleStatMethod.PerChannel:
        raise ConfigError("export.mnn=true is not accepted with quant.feature_scale_stat_method=PerChannel: "
                          "MNN's int8 tensors take one scale; use PerTensor or export.mnn=false")
