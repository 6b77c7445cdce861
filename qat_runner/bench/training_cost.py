"""Section 1: what one training step costs, float vs our QAT vs torch.ao eager QAT, same batch."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from . import contenders, fashion
from .settings import BenchSettings
from .timing import alternate

CONTENDERS = ("float", "ours_qat", "torch_ao_qat")


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One SGD step (forward, cross-entropy, backward, update), the QAT recipe's optimizer."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9, weight_decay=4e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def models(seed: int = 0) -> dict[str, nn.Module]:
    """The three contenders, from the same float initialisation."""
    float_model = contenders.float_model(seed=seed)
    state = {k: v.clone() for k, v in float_model.state_dict().items()}
    return {"float": float_model, "ours_qat": contenders.ours_qat(float_model),
            "torch_ao_qat": contenders.torch_ao_qat(state)}


def measure(image_size: int, batch: int, rounds: int, warmup: int) -> dict:
    images = fashion.load("train", image_size, batch)
    x, y = images.x[:batch], images.y[:batch]
    steps = {name: step_fn(model, x, y) for name, model in models().items()}
    timings = alternate(steps, rounds, warmup)
    t = {name: timings[name].median_s for name in CONTENDERS}
    return {
        "image_size": image_size, "batch": batch, "rounds": rounds,
        "float_s": t["float"], "ours_qat_s": t["ours_qat"], "torch_ao_qat_s": t["torch_ao_qat"],
        "ours_over_float": t["ours_qat"] / t["float"],
        "torch_ao_over_float": t["torch_ao_qat"] / t["float"],
        "ours_over_torch_ao": t["ours_qat"] / t["torch_ao_qat"],
    }


def run(settings: BenchSettings) -> dict:
    rows = [measure(size, batch, settings.train_rounds, settings.train_warmup)
            for size, batch in settings.train_shapes]
    result = {"model": "mobilenet_v2", "optimizer": "SGD momentum 0.9",
              "statistic": "median of alternating rounds", "rows": rows}
    if settings.profile:
        from .profile import profile_steps  # torch.profiler only when asked for
        result["profile"] = [profile_steps(size, batch, settings.profile_rounds, settings.train_warmup)
                             for size, batch in settings.train_shapes]
    return result
