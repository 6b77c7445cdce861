"""Which `_target_` callables a config may name: a list of callables, not whole namespaces.

`hydra.utils.instantiate` imports and calls whatever a `_target_` names. Whole namespaces are an
open door: `torch.*` alone holds `torch.hub.load` (runs a hubconf.py), `torch.utils.cpp_extension.
load_inline` (compiles and loads C++), and `torch.load(weights_only=False)`, `torch.jit.load`,
`torch.package` (unpickling). So the list names the callables the config tree needs: our
builders and callbacks, torch's optimizers and schedulers, torchvision's model builders; a
user's own model package is admitted only where the config names it in
`security.allowed_targets`. No Hydra import here: the engine-free runner parts use it too.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

# The callables our config tree instantiates (conf/**/*.yaml); a new builder is added here.
PROJECT_TARGETS = frozenset({
    "qat_runner.models.lenet",
    "qat_runner.models.torchvision_classifier",
    "qat_runner.onnx_import.onnx_classifier",
    "qat_runner.data.digits",
    "qat_runner.data.fashion_mnist",
    "qat_runner.data.imagefolder",
    "qat_runner.data.fake",
    "qat_runner.preflight.OutputsWritable",
    "qat_runner.sweep.SweepParentRun",
})
ACCEPTED = ("one of qat_runner's builders, a torch.optim optimizer or scheduler, a torchvision.models "
            "builder, or a callable of a package listed in security.allowed_targets")
_PACKAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _torch_optim_class(target: str) -> bool:
    import torch

    module, _, name = target.rpartition(".")
    if module == "torch.optim":
        cls = getattr(torch.optim, name, None)
        return isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
    if module == "torch.optim.lr_scheduler":
        cls = getattr(torch.optim.lr_scheduler, name, None)
        return isinstance(cls, type) and issubclass(cls, torch.optim.lr_scheduler.LRScheduler)
    return False


def _torchvision_builder(target: str) -> bool:
    module, _, name = target.rpartition(".")
    if module != "torchvision.models":
        return False
    import torchvision

    return name in torchvision.models.list_models(module=torchvision.models)


def check_allowed_packages(packages: Iterable[object]) -> list[str]:
    """The `security.allowed_targets` entries: dotted package names; raises ValueError otherwise."""
    checked = []
    for package in packages:
        if not isinstance(package, str) or not _PACKAGE_NAME.match(package):
            raise ValueError(f"security.allowed_targets entry {package!r} is not accepted: use a dotted "
                             "package name such as my_pkg or my_pkg.nets")
        checked.append(package)
    return checked


def target_allowed(target: object, allowed_packages: Iterable[str] = ()) -> bool:
    """True when `target` is on the list, or inside a package the config allowed."""
    if not isinstance(target, str):
        return False
    if target in PROJECT_TARGETS or _torch_optim_class(target) or _torchvision_builder(target):
        return True
    return any(target.startswith(f"{package}.") for package in allowed_packages)


def target_problem(key: str, target: object, allowed_packages: Iterable[str] = ()) -> str | None:
    """One line naming a refused `_target_` and what is accepted; None when it is allowed."""
    if target_allowed(target, allowed_packages):
        return None
    return f"{key}._target_={target!r} is not accepted: use {ACCEPTED}"
