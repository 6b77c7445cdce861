"""Where a training step's time goes: torch.profiler self-CPU time per op, float vs our QAT.

Profiled steps alternate between the two models (as in section 1), and the per-op times are
averaged, so a slow spell on a shared machine lands on both columns alike.
"""
from __future__ import annotations

from collections import Counter

from torch.profiler import ProfilerActivity, profile

from . import fashion
from .training_cost import models, step_fn


def profile_steps(image_size: int, batch: int, rounds: int = 4, warmup: int = 2, top: int = 15) -> dict:
    images = fashion.load("train", image_size, batch)
    chosen = {k: m for k, m in models().items() if k in ("float", "ours_qat")}
    steps = {name: step_fn(model, images.x, images.y) for name, model in chosen.items()}
    for step in steps.values():
        for _ in range(warmup):
            step()
    per_op = {name: Counter() for name in steps}
    for r in range(rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[name]()
            for event in prof.key_averages():
                per_op[name][event.key] += event.self_cpu_time_total / 1e3 / rounds
    totals = {name: sum(ops.values()) for name, ops in per_op.items()}
    extra = Counter({op: per_op["ours_qat"][op] - per_op["float"][op]
                     for op in set(per_op["ours_qat"]) | set(per_op["float"])})
    return {"image_size": image_size, "batch": batch, "rounds": rounds,
            "total_ms": totals,
            "top_ops_ours_minus_float_ms": [
                {"op": op, "float_ms": per_op["float"][op], "ours_qat_ms": per_op["ours_qat"][op], "extra_ms": ms}
                for op, ms in extra.most_common(top)]}
