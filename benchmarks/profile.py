"""The profile behind a gap: where an iteration's CPU time goes, by aten operator (torch.profiler)."""

from __future__ import annotations

from torch.profiler import ProfilerActivity, profile


def top_ops(fn, rounds: int = 2, k: int = 8) -> list[tuple[str, float, int]]:
    """[(operator, share of self CPU time, calls per round)] of the k most expensive operators."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for r in range(rounds):
            fn(r)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / total, e.count // rounds) for e in events[:k]]
