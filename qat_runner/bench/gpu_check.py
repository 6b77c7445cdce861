"""A short, prepared GPU check: our QAT step vs the float step on CUDA (time and peak memory).

    python -m qat_runner.bench.gpu_check [--out gpu_check.json] [--rounds 20] [--warmup 5] [--peers]

At 224x224 batch 8 and 32x32 batch 32 (section 1's shapes): float, our QAT and torch.ao eager QAT
(and with --peers NNCF and Brevitas, where installed) take alternating SGD steps on the GPU, each
step ending in `torch.cuda.synchronize()`; medians are reported with the QAT/float ratios. Peak
memory: `torch.cuda.max_memory_allocated()` of one step above the allocated model and optimizer
state, per contender (in this process, one contender after another). Without CUDA it stops at
once with a one-line error and exit status 2. A few minutes on one GPU, most of it start-up.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from . import environment, memory, telemetry, training_cost
from .run import device_unavailable

SHAPES = ((224, 8), (32, 32))


def check(rounds: int, warmup: int, with_peers: bool, threads: int = 2) -> dict:
    environment.set_threads(threads)
    names = list(training_cost.BASE)
    unavailable: dict[str, str] = {}
    if with_peers:
        from .settings import preset
        found, unavailable = training_cost.contender_names(preset("full", device="cuda"))
        names = found
    rows = []
    for size, batch in SHAPES:
        started = time.perf_counter()
        row, failed = training_cost.measure(size, batch, rounds, warmup, names, "cuda")
        unavailable.update(failed)
        peak = {}
        for name in names:
            if name in failed:
                continue
            try:
                peak[name] = memory.measure_here(name, size, batch, warmup, 2, "cuda", threads)["peak_step_mb"]
            except Exception as err:  # a peer's failure is reported; ours and float must work
                if training_cost.peer_of(name) is None:
                    raise
                unavailable[name] = f"unavailable: {type(err).__name__}: {err}".splitlines()[0]
            torch.cuda.empty_cache()
        row["peak_step_mb"] = peak
        row["memory_over_float"] = {n: mb / peak["float"] for n, mb in peak.items() if n != "float"}
        row["ours_over_float_memory"] = row["memory_over_float"]["ours_qat"]
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "rounds": rounds, "warmup": warmup,
            "statistic": "median of alternating rounds, torch.cuda.synchronize() after each step",
            "memory": memory.METHOD["cuda"].replace("one fresh subprocess per contender",
                                                    "contenders one after another in one process"),
            "unavailable": unavailable, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"GPU check on {result['device']} (torch {result['torch']}, CUDA {result['cuda']}): median ms per "
             "SGD step, peak MB per step",
             "", "| input | batch | float ms | ours QAT ms | torch.ao QAT ms | ours/float | torch.ao/float | "
                 "float MB | ours MB | ours/float memory |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['image_size']}x{r['image_size']} | {r['batch']} | {r['float_s'] * 1e3:.1f} | "
                     f"{r['ours_qat_s'] * 1e3:.1f} | {r['torch_ao_qat_s'] * 1e3:.1f} | {r['ours_over_float']:.2f}x | "
                     f"{r['torch_ao_over_float']:.2f}x | {r['peak_step_mb']['float']:.0f} | "
                     f"{r['peak_step_mb']['ours_qat']:.0f} | {r['ours_over_float_memory']:.2f}x |")
        for peer in ("nncf", "brevitas"):
            if f"{peer}_qat_s" in r:
                lines.append(f"|  | {peer} | | {r[f'{peer}_qat_s'] * 1e3:.1f} | | {r[f'{peer}_over_float']:.2f}x | "
                             f"| | | |")
    lines += [f"- {name}: {reason}" for name, reason in result["unavailable"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qat_runner.bench.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_check.json", help="JSON path; markdown next to it")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--peers", action="store_true", help="add NNCF and Brevitas where installed")
    args = p.parse_args(argv)
    problem = device_unavailable("cuda")
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    telemetry.disable()  # before --peers imports nncf
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = check(args.rounds, args.warmup, args.peers)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
