"""The Hydra config tree: it composes, every experiment composes and validates, the objects it
describes instantiate offline, and the structured schema rejects bad types and enum names."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat_runner import config as qat_config
from qat_runner.config import ConfigError, validate
from qat_runner.engine import FeatureScaleStatMethod, ScaleUpdateMethod
from helpers.runner import (CONF_DIR, EXPERIMENT_FILES, FASHION_ROOT, fashion_available,
                            make_imagefolder, write_fashion_root)

EXPERIMENT_NAMES = [p.stem for p in EXPERIMENT_FILES]
SCHEMAS = {"digits": qat_config.DigitsConfig, "fashion_mnist": qat_config.FashionMnistConfig,
           "imagefolder": qat_config.ImageFolderConfig, "fake": qat_config.FakeConfig}


def _error_chain(err: BaseException) -> str:
    parts = []
    while err is not None:
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# The primary config


def test_experiment_folder_is_not_empty():
    assert EXPERIMENT_NAMES, f"no experiment configs found in {CONF_DIR / 'experiment'}"
    assert "lenet_digits" in EXPERIMENT_NAMES


def test_primary_config_composes(compose_cfg):
    cfg = compose_cfg()
    assert isinstance(cfg, DictConfig)
    for key in ("experiment_name", "seed", "paths", "model", "dataset", "quant", "optim", "trainer",
                "tracking"):
        assert key in cfg, key
    assert cfg.experiment_name == "lenet_digits"
    assert cfg.model.name == "lenet" and cfg.dataset.name == "digits"
    # the schema's types are in force: enums are enums, the dataset has its own schema
    assert cfg.quant.feature_scale_stat_method is FeatureScaleStatMethod.PerTensor
    assert cfg.quant.scale_update_method is ScaleUpdateMethod.MovingAverage
    assert OmegaConf.get_type(cfg.quant) is qat_config.QuantSchema
    assert OmegaConf.get_type(cfg.dataset) is qat_config.DigitsConfig
    # outputs default to the checkout's outputs/ whatever the working directory (qat_root resolver)
    assert cfg.paths.outputs == str(qat_config.PROJECT_ROOT / "outputs")
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.tracking.uri == f"sqlite:///{qat_config.PROJECT_ROOT / 'outputs'}/mlflow.db"
    assert cfg.model.num_classes == cfg.dataset.num_classes == 10
    assert cfg.dataset.channels == cfg.model.in_channels


def test_paths_outputs_moves_everything(compose_cfg, tmp_path):
    cfg = compose_cfg([f"paths.outputs={tmp_path}"], return_hydra_config=True)
    assert cfg.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert cfg.tracking.artifact_root == f"{tmp_path}/mlartifacts"
    assert str(cfg.hydra.run.dir).startswith(f"{tmp_path}/runs/lenet_digits/")
    assert str(cfg.hydra.sweep.dir).startswith(f"{tmp_path}/multirun/lenet_digits/")
    assert cfg.hydra.job.chdir is False


def test_primary_config_validates_and_instantiates(compose_cfg):
    cfg = compose_cfg()
    quant = validate(cfg)
    assert quant.bits == 8 and quant.feature_bits == 8
    model = instantiate(cfg.model, _convert_="all")
    data = instantiate(cfg.dataset, _convert_="all")
    x, y = data.train[0]
    assert x.shape == (1, 8, 8)
    model.eval()
    with torch.no_grad():
        assert model(x.unsqueeze(0)).shape == (1, 10)
    optimizer = instantiate(cfg.optim)(model.parameters())
    assert isinstance(optimizer, torch.optim.SGD)


# --------------------------------------------------------------------------------------------
# Every experiment file


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=EXPERIMENT_NAMES)
def test_experiment_file_is_global_package(path: Path):
    first = path.read_text().splitlines()[0].strip()
    assert first == "# @package _global_", f"{path.name} starts with {first!r}"


@pytest.mark.parametrize("name", EXPERIMENT_NAMES)
def test_experiment_composes_and_validates(compose_cfg, name, tmp_path):
    cfg = compose_cfg([f"+experiment={name}", f"paths.outputs={tmp_path}"])
    assert cfg.experiment_name == name, "one MLflow experiment per experiment config"
    assert cfg.tracking.experiment_name == name
    assert OmegaConf.get_type(cfg.dataset) is SCHEMAS[cfg.dataset.name]
    assert OmegaConf.get_type(cfg.quant) is qat_config.QuantSchema
    quant = validate(cfg)
    assert quant.bits == cfg.quant.bits
    assert quant.feature_scale_stat_method == cfg.quant.feature_scale_stat_method
    assert quant.scale_update_method == cfg.quant.scale_update_method
    OmegaConf.resolve(cfg)


def _experiment_cfg(compose_cfg, name: str, tmp_path: Path):
    """The experiment with every offline substitute: no pretrained weights, small data."""
    base = [f"+experiment={name}", f"paths.outputs={tmp_path}", "model.weights=null"]
    dataset = compose_cfg(base).dataset.name
    extra: list[str] = []
    if dataset == "fashion_mnist":
        if not fashion_available():
            pytest.skip(f"Fashion-MNIST IDX files not installed in {FASHION_ROOT} "
                        "(apt-get install dataset-fashion-mnist)")
        extra = ["dataset.train_limit=64", "dataset.test_limit=32"]
    elif dataset == "imagefolder":
        root = make_imagefolder(tmp_path / "imagefolder", classes=("cat", "dog", "fox"))
        extra = [f"dataset.root={root}", "dataset.num_classes=3"]
    return compose_cfg(base + extra)


@pytest.mark.parametrize("name", EXPERIMENT_NAMES)
def test_experiment_objects_instantiate(compose_cfg, name, tmp_path):
    cfg = _experiment_cfg(compose_cfg, name, tmp_path)
    validate(cfg)

    model = instantiate(cfg.model, _convert_="all")
    assert isinstance(model, nn.Module)

    partial = instantiate(cfg.optim)
    assert isinstance(partial, functools.partial), "optim must be a partial (_partial_: true)"
    optimizer = partial(model.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.defaults["lr"] == pytest.approx(cfg.optim.lr)
    for key in ("momentum", "weight_decay"):
        if key in cfg.optim:
            assert optimizer.defaults[key] == pytest.approx(cfg.optim[key])
    # the float stage overrides lr the way the runner does
    float_opt = instantiate(cfg.optim, lr=cfg.trainer.float_lr)(model.parameters())
    assert float_opt.defaults["lr"] == pytest.approx(cfg.trainer.float_lr)

    data = instantiate(cfg.dataset, _convert_="all")
    assert data.num_classes == cfg.dataset.num_classes == cfg.model.num_classes
    assert len(data.train) > 0 and len(data.test) > 0
    x, y = data.test[0]
    size = cfg.dataset.image_size
    assert tuple(x.shape) == (cfg.model.in_channels, size, size), "data must fit the model's input"
    assert 0 <= int(y) < cfg.dataset.num_classes
    model.eval()
    with torch.no_grad():
        out = model(x.unsqueeze(0))
    assert out.shape == (1, cfg.model.num_classes)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# Dataset groups (with the default LeNet)


def test_dataset_digits_instantiates(compose_cfg):
    cfg = compose_cfg(["dataset=digits"])
    data = instantiate(cfg.dataset, _convert_="all")
    assert len(data.train) + len(data.test) == 1797
    assert len(data.test) == pytest.approx(0.2 * 1797, abs=1)
    labels = {int(data.train[i][1]) for i in range(len(data.train))}
    assert labels == set(range(10))


@pytest.mark.skipif(not fashion_available(), reason=f"Fashion-MNIST not installed in {FASHION_ROOT}")
def test_dataset_fashion_mnist_instantiates(compose_cfg):
    cfg = compose_cfg(["dataset=fashion_mnist", "dataset.train_limit=100", "dataset.test_limit=50"])
    assert OmegaConf.get_type(cfg.dataset) is qat_config.FashionMnistConfig
    data = instantiate(cfg.dataset, _convert_="all")
    assert (len(data.train), len(data.test)) == (100, 50)
    x, y = data.train[0]
    assert tuple(x.shape) == (1, 28, 28) and x.dtype == torch.float32
    model = instantiate(cfg.model, _convert_="all").eval()
    with torch.no_grad():
        assert model(x.unsqueeze(0)).shape == (1, 10)


def test_dataset_fashion_mnist_channels_and_size(compose_cfg, tmp_path):
    """mobilenet-style inputs: grey repeated to 3 channels and resized (synthetic IDX files)."""
    root = write_fashion_root(tmp_path / "fm", n_train=12, n_test=6)
    cfg = compose_cfg(["dataset=fashion_mnist", f"dataset.root={root}", "model=torchvision",
                       "model.name=mobilenet_v2", "dataset.image_size=32"])
    data = instantiate(cfg.dataset, _convert_="all")
    x, _ = data.train[0]
    assert tuple(x.shape) == (3, 32, 32)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])


def test_dataset_imagefolder_instantiates(compose_cfg, tiny_imagefolder):
    cfg = compose_cfg(["dataset=imagefolder", f"dataset.root={tiny_imagefolder}",
                       "dataset.num_classes=2", "dataset.image_size=16"])
    assert OmegaConf.get_type(cfg.dataset) is qat_config.ImageFolderConfig
    data = instantiate(cfg.dataset, _convert_="all")
    assert (len(data.train), len(data.test)) == (4, 4)
    x, y = data.test[0]
    assert tuple(x.shape) == (1, 16, 16), "RGB images averaged to LeNet's one channel"
    model = instantiate(cfg.model, _convert_="all").eval()
    with torch.no_grad():
        assert model(x.unsqueeze(0)).shape == (1, 2)


def test_dataset_imagefolder_class_count_mismatch(compose_cfg, tiny_imagefolder):
    cfg = compose_cfg(["dataset=imagefolder", f"dataset.root={tiny_imagefolder}",
                       "dataset.num_classes=1000"])
    with pytest.raises(Exception) as info:
        instantiate(cfg.dataset, _convert_="all")
    chain = _error_chain(info.value)
    assert "dataset.num_classes=2" in chain, chain


def test_dataset_fake_instantiates(compose_cfg):
    cfg = compose_cfg(["dataset=fake", "dataset.train_size=8", "dataset.test_size=4"])
    data = instantiate(cfg.dataset, _convert_="all")
    assert (len(data.train), len(data.test)) == (8, 4)
    assert tuple(data.train[0][0].shape) == (1, 32, 32)


# --------------------------------------------------------------------------------------------
# The structured schema and validate()


@pytest.mark.parametrize("override, value", [
    ("quant.bits=eight", "eight"),
    ("trainer.max_steps=many", "many"),
    ("quant.symmetric_features=perhaps", "perhaps"),
    ("dataset.num_workers=two", "two"),
])
def test_schema_rejects_bad_type(compose_cfg, override, value):
    with pytest.raises(HydraException) as info:
        compose_cfg([override])
    assert value in _error_chain(info.value)


@pytest.mark.parametrize("override, value", [
    ("quant.scale_update_method=Foo", "Foo"),
    ("quant.feature_scale_stat_method=PerLayer", "PerLayer"),
])
def test_schema_rejects_bad_enum(compose_cfg, override, value):
    with pytest.raises(HydraException) as info:
        compose_cfg([override])
    chain = _error_chain(info.value)
    assert value in chain


def test_schema_accepts_enum_names(compose_cfg):
    cfg = compose_cfg(["quant.scale_update_method=Maximum", "quant.feature_scale_stat_method=PerChannel"])
    assert cfg.quant.scale_update_method is ScaleUpdateMethod.Maximum
    assert cfg.quant.feature_scale_stat_method is FeatureScaleStatMethod.PerChannel
    assert validate(cfg).scale_update_method == ScaleUpdateMethod.Maximum


def test_schema_rejects_unknown_key(compose_cfg):
    with pytest.raises(HydraException):
        compose_cfg(["quant.bitz=8"])


@pytest.mark.parametrize("override, needle", [
    ("quant.bits=9", "quant.bits=9"),
    ("quant.bits=1", "quant.bits=1"),
    ("quant.feature_bits=16", "quant.feature_bits=16"),
    ("quant.momentum=1.5", "quant.momentum=1.5"),
    ("quant.momentum=0.0", "quant.momentum=0.0"),
    ("trainer.max_steps=-1", "trainer.max_steps=-1"),
    ("trainer.batch_size=0", "trainer.batch_size=0"),
    ("trainer.float_schedule=linear", "trainer.float_schedule='linear' is not accepted: use one of constant, cosine"),
    ("quant.calibration_batches=0", "quant.calibration_batches=0"),
    ("optim.lr=0", "optim.lr=0"),
    ("trainer.device=tpu", "trainer.device='tpu'"),
    ("model._target_=os.system", "model._target_='os.system'"),
    ("optim._target_=subprocess.call", "optim._target_='subprocess.call'"),
])
def test_validate_rejects_bad_values(compose_cfg, override, needle):
    cfg = compose_cfg([override])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert needle in message, message
    assert "\n" not in message, "config errors are one line"



def test_float_schedule_builds_what_the_config_names(compose_cfg):
    """trainer.float_schedule=cosine anneals float_lr to 0 over float_steps; constant keeps it."""
    from qat_runner.runner import float_scheduler

    cfg = compose_cfg(["trainer.float_schedule=cosine", "trainer.float_steps=4"])
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=cfg.trainer.float_lr)
    schedule = float_scheduler(cfg.trainer, optimizer)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(cfg.trainer.float_lr) and lrs == sorted(lrs, reverse=True)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert float_scheduler(compose_cfg([]).trainer, optimizer) is None  # constant, the default
