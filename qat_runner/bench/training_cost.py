"""Section 1: what one training step costs, float vs our QAT vs the other QAT tools, same batch.

Time: the contenders alternate round by round in this process (medians). Memory: each contender's
step runs again in a fresh subprocess (`memory.py`), where its peak memory above the model and
optimizer state is measured; the table reports it next to the float step's.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from . import contenders, fashion, memory, peers
from .settings import BenchSettings
from .timing import alternate

log = logging.getLogger(__name__)

BASE = ("float", "ours_qat", "torch_ao_qat")  # always run: a failure here is the benchmark's bug
PEER_CONTENDERS = {peer: f"{peer}_qat" for peer in peers.PEERS}  # nncf -> nncf_qat, brevitas -> brevitas_qat
CONTENDERS = BASE + tuple(PEER_CONTENDERS.values())
LABELS = {"float": "float", "ours_qat": "ours QAT", "torch_ao_qat": "torch.ao QAT",
          **{c: f"{peers.LABELS[p]} QAT" for p, c in PEER_CONTENDERS.items()}}


def short(name: str) -> str:
    """ours_qat -> ours, torch_ao_qat -> torch_ao (the ratio keys' prefix)."""
    return name.removesuffix("_qat")


def peer_of(name: str) -> str | None:
    return next((p for p, c in PEER_CONTENDERS.items() if c == name), None)


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sync: bool = False) -> Callable[[], None]:
    """One SGD step (forward, cross-entropy, backward, update), the QAT recipe's optimizer.

    `sync`: wait for the device at the end (CUDA), so a timed step is a finished step.
    """
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9, weight_decay=4e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if sync:
            torch.cuda.synchronize()

    return step


def build(name: str, x: torch.Tensor, seed: int = 0, device: torch.device | str = "cpu") -> nn.Module:
    """Contender `name` from the seeded float initialisation (the same weights for all), on
    `device`; the peers set their ranges on the batch `x` (NNCF without its bias correction, which
    changes bias values, not the step)."""
    float_model = contenders.float_model(seed=seed)
    if name == "float":
        model = float_model
    elif name == "ours_qat":
        model = contenders.ours_qat(float_model)
    elif name == "torch_ao_qat":
        model = contenders.torch_ao_qat({k: v.clone() for k, v in float_model.state_dict().items()}, seed=seed)
    elif peer_of(name) is not None:
        model = peers.quantize(peer_of(name), float_model, [x], device, bias_correction=False)
    else:
        raise ValueError(f"contender {name!r} is not known: use one of {', '.join(CONTENDERS)}")
    return model.to(device).train()


def models(seed: int = 0) -> dict[str, nn.Module]:
    """Float, ours and torch.ao from the same float initialisation (the profile's contenders)."""
    float_model = contenders.float_model(seed=seed)
    state = {k: v.clone() for k, v in float_model.state_dict().items()}
    return {"float": float_model, "ours_qat": contenders.ours_qat(float_model),
            "torch_ao_qat": contenders.torch_ao_qat(state)}


def contender_names(settings: BenchSettings) -> tuple[list[str], dict[str, str]]:
    """The contenders to run, and the peers left out with their "unavailable: <reason>"."""
    names, missing = list(BASE), {}
    for peer in settings.peers:
        reason = peers.unavailable(peer)
        if reason is None:
            names.append(PEER_CONTENDERS[peer])
        else:
            missing[PEER_CONTENDERS[peer]] = reason
    return names, missing


def batch(image_size: int, size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    images = fashion.load("train", image_size, size)
    return images.x[:size].to(device), images.y[:size].to(device)


def measure(image_size: int, batch_size: int, rounds: int, warmup: int, names: list[str] | tuple[str, ...] = BASE,
            device: torch.device | str = "cpu") -> tuple[dict, dict[str, str]]:
    """Median step seconds of `names` alternating; returns (row, {peer contender: unavailable})."""
    device = torch.device(device)
    x, y = batch(image_size, batch_size, device)
    steps, failed = {}, {}
    for name in names:
        try:
            step = step_fn(build(name, x, device=device), x, y, sync=device.type == "cuda")
            step()  # a peer that cannot take one step is reported, not timed
        except Exception as err:
            if peer_of(name) is None:
                raise
            failed[name] = peers.failure(peer_of(name), f"take a QAT step ({image_size}px batch {batch_size})", err)
            log.warning("%s: %s", name, failed[name])
            continue
        steps[name] = step
    timings = alternate(steps, rounds, warmup)
    t = {name: timings[name].median_s for name in steps}
    row = {"image_size": image_size, "batch": batch_size, "rounds": rounds,
           **{f"{name}_s": t[name] for name in steps},
           **{f"{short(name)}_over_float": t[name] / t["float"] for name in steps if name != "float"},
           "ours_over_torch_ao": t["ours_qat"] / t["torch_ao_qat"]}
    return row, failed


def add_memory(row: dict, names: list[str], settings: BenchSettings, failed: dict[str, str]) -> None:
    """Peak memory of one step per contender (fresh subprocesses) and its ratio to float's."""
    found = memory.measure_all(names, row["image_size"], row["batch"], settings.train_warmup, settings.memory_steps,
                               settings.threads, settings.device)
    peak = {}
    for name, result in found.items():
        if "unavailable" in result:
            if peer_of(name) is None:
                raise RuntimeError(f"the memory of the {name} step could not be measured: {result['unavailable']}")
            failed.setdefault(name, result["unavailable"])
            continue
        peak[name] = result["peak_step_mb"]
    row["peak_step_mb"] = peak
    row["resident_mb"] = {name: found[name]["resident_mb"] for name in peak}
    if "float" in peak:
        row["memory_over_float"] = {name: mb / peak["float"] for name, mb in peak.items() if name != "float"}
        if "ours_qat" in row["memory_over_float"]:
            row["ours_over_float_memory"] = row["memory_over_float"]["ours_qat"]


def run(settings: BenchSettings) -> dict:
    names, unavailable = contender_names(settings)
    rows = []
    for size, batch_size in settings.train_shapes:
        row, failed = measure(size, batch_size, settings.train_rounds, settings.train_warmup, names,
                              settings.device)
        if settings.memory:
            wanted = settings.memory_contenders or CONTENDERS
            add_memory(row, [n for n in names if n in wanted and n not in failed], settings, failed)
        for name, reason in failed.items():
            unavailable.setdefault(name, reason)
        rows.append(row)
    result = {"model": "mobilenet_v2", "optimizer": "SGD momentum 0.9", "device": settings.device,
              "statistic": "median of alternating rounds",
              "contenders": [n for n in names if n not in unavailable],
              "unavailable": unavailable,
              "peers": {"versions": peers.versions(), "setup": {
                  "nncf_qat": "nncf.quantize (default preset) on the step's batch, then the same SGD step",
                  "brevitas_qat": "preprocess_for_quantize (BatchNorm folded) + quantize, 8-bit per-channel "
                                  "weights, calibrated on the step's batch, then the same SGD step"}},
              "rows": rows}
    if settings.memory:
        result["memory"] = memory.METHOD["cuda" if settings.device == "cuda" else "cpu"]
    if settings.profile:
        from .profile import profile_steps  # torch.profiler only when asked for
        result["profile"] = [profile_steps(size, batch_size, settings.profile_rounds, settings.train_warmup)
                             for size, batch_size in settings.train_shapes]
    return result
