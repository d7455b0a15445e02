"""Wall-clock timing of a reference framework: the latency tvmflow's build is compared with."""

from __future__ import annotations

import time

import numpy as np


def wall_times_ms(fn, repeat: int = 20, warmup: int = 3) -> list[float]:
    """Wall time of each of `repeat` calls of fn(), after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def median_ms(fn, warmup: int = 3, repeat: int = 20) -> float:
    return float(np.median(wall_times_ms(fn, repeat, warmup)))
