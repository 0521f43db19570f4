"""Timing variants of one step on a shared, noisy machine, the way every step benchmark here does it.

Each step runs ``warmup`` times, then all of them round-robin ``repeats`` times, so that machine noise
hits every variant alike; the result is each variant's median seconds. Imported by the scripts beside
it (``python benchmarks/<script>.py`` puts this folder on the path).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping


def interleaved_medians(
    steps: Mapping[Hashable, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[Hashable, float]:
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}
