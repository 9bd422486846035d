"""Interleaved timing: ratios of paired medians, robust to the slow drifts of a shared machine."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[int], object]], repeats: int, warmup: int = 1,
                sync: Callable[[], object] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each fn, called round-robin `repeats` times (after `warmup` untimed rounds).

    Each fn gets the round index, so paired calls can draw the same randomness.  `sync` waits for queued device
    work (torch.cuda.synchronize on a GPU), before and after each timed call.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(-warmup, repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn(max(r, 0))
            sync()
            elapsed = time.perf_counter() - start
            if r >= 0:
                times[name].append(elapsed)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i]: both were timed back to back, so load changes cancel."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))
