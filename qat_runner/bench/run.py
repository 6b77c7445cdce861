"""One benchmark run: set threads, run the chosen sections, check targets, write JSON and markdown."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from ..engine.files import write_text_atomically
from ..paths import default_outputs
from . import accuracy, environment, inference, report, sizes, targets, training_cost
from .settings import BenchSettings
from .workspace import Workspace

log = logging.getLogger(__name__)

DEFAULT_OUT = default_outputs() / "bench" / "bench.json"
CACHE_DIR = default_outputs() / "bench" / "cache"


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def non_finite(value, where: str = "") -> list[str]:
    """Paths of the numbers in a JSON-like value that are NaN or infinite."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite(v, f"{where}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in non_finite(v, f"{where}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [where]
    return []


def device_unavailable(device: str) -> str | None:
    """None when `device` can be used here, else the one-line reason (`--device cuda` without CUDA)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: no CUDA device is available here; use --device cpu"
    return None


def run_benchmark(settings: BenchSettings, out: str | os.PathLike = DEFAULT_OUT, command: str | None = None,
                  cache_dir: str | os.PathLike = CACHE_DIR) -> dict:
    """Run `settings.sections`; writes `out` (JSON) and `out` with suffix .md; returns the results."""
    problem = device_unavailable(settings.device)
    if problem is not None:
        raise RuntimeError(problem)
    out = Path(out)
    previous_threads = torch.get_num_threads()
    environment.set_threads(settings.threads)
    try:
        return _run(settings, out, command, Path(cache_dir))
    finally:
        torch.set_num_threads(previous_threads)


def _run(settings: BenchSettings, out: Path, command: str | None, cache_dir: Path) -> dict:
    started = time.perf_counter()
    ws = Workspace(settings, out.parent / "artifacts", cache_dir)
    results: dict = {}
    section_seconds: dict[str, float] = {}
    load_average: dict[str, list[float]] = {}  # 1-minute load at each section's start and end
    for name in settings.sections:
        t0 = time.perf_counter()
        load_average[name] = [_load()]
        log.info("section %s", name)
        if name == "training_cost":
            results[name] = training_cost.run(settings)
        elif name == "inference":
            results[name] = inference.run(settings, ws)
        elif name == "accuracy":
            results[name] = accuracy.run(settings, ws)
        elif name == "sizes":
            results[name] = sizes.run(settings, ws)
        section_seconds[name] = time.perf_counter() - t0
        load_average[name].append(_load())
    results["targets"] = targets.evaluate(results)
    results["meta"] = {"mode": settings.mode, "settings": settings.to_dict(),
                       "machine": environment.machine_record(settings.threads, command, settings.device),
                       "section_seconds": section_seconds, "load_average": load_average, "seconds": time.perf_counter() - started,
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    bad = non_finite(results)
    if bad:
        raise RuntimeError(f"the benchmark produced non-finite numbers at {', '.join(bad)}")
    write_text_atomically(out, json.dumps(results, indent=2) + "\n")
    write_text_atomically(out.with_suffix(".md"), report.markdown(results))
    return results
