"""Side-by-side timing: contenders alternate round by round, the median of each is reported.

On a shared or throttling machine a slow spell hits every contender of a round alike instead of
one contender's whole series; the starting contender rotates so none is always first after a
switch (cold caches, another runtime's spinning threads).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Timing:
    median_s: float  # median seconds of one call
    samples: list[float]  # seconds of one call, one value per round
    calls_per_sample: int


def _calls_for(fn: Callable[[], object], min_sample_s: float) -> int:
    """How many back-to-back calls make one sample of at least `min_sample_s` (one when 0)."""
    if min_sample_s <= 0:
        return 1
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, min(1000, int(min_sample_s / max(once, 1e-6)) + 1))


def alternate(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
              min_sample_s: float = 0.0) -> dict[str, Timing]:
    """Time each zero-argument callable `rounds` times, alternating; returns medians per name.

    `warmup` untimed calls per contender come first (allocations, kernel selection, lazy
    compilation). A sample of a fast contender repeats it until `min_sample_s` has passed and
    divides, so timer resolution and one-off hiccups matter less.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds!r} is not accepted: use a positive integer")
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    calls = {name: _calls_for(contenders[name], min_sample_s) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn, n = contenders[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n)
    return {name: Timing(statistics.median(samples[name]), samples[name], calls[name]) for name in names}
