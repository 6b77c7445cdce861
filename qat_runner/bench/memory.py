"""Peak memory of one training step, each contender in a fresh subprocess.

`python -m qat_runner.bench.memory --contender ours_qat --size 32 --batch 32` builds the contender
as section 1 does, takes `--warmup` steps, drops the gradients, and then takes `--steps` more,
reporting the largest rise of memory during one step above the state between steps (model,
optimizer state, runtime): activations kept for backward, gradients, temporaries.

* CPU: resident set size. The peak is Linux's VmHWM, reset before each step
  (`/proc/self/clear_refs`, value 5); glibc is told to map every block of 128 KiB or more on its own
  (MALLOC_MMAP_THRESHOLD_, which also turns off its dynamic threshold), so freed tensors leave the
  resident set at once and each step starts from the same level.
* CUDA: `torch.cuda.max_memory_allocated()` (reset before each step) minus
  `torch.cuda.memory_allocated()` between steps.

A fresh process per contender keeps one contender's allocations, caches and allocator state from
showing up in another's figure.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import telemetry

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
METHOD = {
    "cpu": "peak resident set size (VmHWM, reset per step) above the resident size between steps, "
           "one fresh subprocess per contender, glibc MALLOC_MMAP_THRESHOLD_=131072; largest of the measured steps",
    "cuda": "torch.cuda.max_memory_allocated (reset per step) above torch.cuda.memory_allocated between "
            "steps, one fresh subprocess per contender; largest of the measured steps",
}
MB = 2 ** 20
TIMEOUT_S = 1800


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_supported() -> str | None:
    """None when the CPU method works here (Linux /proc), else why not."""
    try:
        _status_kb("VmHWM")
        _reset_peak_rss()
    except OSError as err:
        return f"peak RSS cannot be read or reset here ({err})"
    return None


def measure_here(name: str, image_size: int, batch: int, warmup: int, steps: int, device: str = "cpu",
                 threads: int = 2) -> dict:
    """Build contender `name` in this process and measure its step (see the module doc)."""
    import torch

    from . import environment, training_cost

    environment.set_threads(threads)
    dev = torch.device(device)
    x, y = training_cost.batch(image_size, batch, dev)
    model = training_cost.build(name, x, device=dev)
    step = training_cost.step_fn(model, x, y, sync=dev.type == "cuda")
    for _ in range(max(warmup, 1)):
        step()

    def drop_gradients() -> None:
        for p in model.parameters():
            p.grad = None
        gc.collect()

    peaks: list[int] = []
    if dev.type == "cuda":
        for _ in range(steps):
            drop_gradients()
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            peaks.append(torch.cuda.max_memory_allocated() - resident)
    else:
        for _ in range(steps):
            drop_gradients()
            resident = _status_kb("VmRSS") * 1024
            _reset_peak_rss()
            step()
            peaks.append(_status_kb("VmHWM") * 1024 - resident)
    return {"contender": name, "image_size": image_size, "batch": batch, "device": device,
            "peak_step_mb": max(peaks) / MB, "peak_step_mb_each": [p / MB for p in peaks],
            "resident_mb": resident / MB}


def _child_env() -> dict[str, str]:
    env = {**os.environ, **MALLOC_ENV}
    root = str(Path(__file__).resolve().parents[2])  # the directory holding the qat_runner package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.update(telemetry.child_env())  # and the child's peers module calls telemetry.disable()
    return env


def measure_in_subprocess(name: str, image_size: int, batch: int, warmup: int, steps: int, threads: int,
                          device: str = "cpu") -> dict:
    """`measure_here` in a fresh interpreter; {"unavailable": why} when it fails."""
    cmd = [sys.executable, "-m", "qat_runner.bench.memory", "--contender", name, "--size", str(image_size),
           "--batch", str(batch), "--warmup", str(warmup), "--steps", str(steps), "--threads", str(threads),
           "--device", device]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"unavailable": f"unavailable: the {name} memory subprocess ran over {TIMEOUT_S} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return {"unavailable": f"unavailable: the {name} memory subprocess failed (exit {done.returncode}): "
                           f"{tail[-1] if tail else 'no message'}"}


def measure_all(names: list[str], image_size: int, batch: int, warmup: int, steps: int, threads: int,
                device: str = "cpu", workers: int = 2) -> dict[str, dict]:
    """Each contender in its own subprocess, `workers` at a time (memory does not depend on speed)."""
    if device != "cuda":
        reason = rss_supported()
        if reason is not None:
            return {name: {"unavailable": f"unavailable: {reason}"} for name in names}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {name: pool.submit(measure_in_subprocess, name, image_size, batch, warmup, steps, threads, device)
                   for name in names}
        return {name: future.result() for name, future in futures.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qat_runner.bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--contender", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    import warnings
    warnings.filterwarnings("ignore")
    result = measure_here(args.contender, args.size, args.batch, args.warmup, args.steps, args.device, args.threads)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
