"""The profile behind a gap: where an iteration's time goes, by aten operator or GPU kernel (torch.profiler)."""

from __future__ import annotations

from torch.profiler import ProfilerActivity, profile


def top_ops(fn, rounds: int = 2, k: int = 8, cuda: bool = False) -> list[tuple[str, float, int]]:
    """[(operator, share of self time, calls per round)] of the k most expensive operators: CPU time, or with
    `cuda` the GPU's own time (kernels and the operators that launch them)."""
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for r in range(rounds):
            fn(r)
        if cuda:
            import torch

            torch.cuda.synchronize()

    def self_time(e):
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    events = [e for e in prof.key_averages() if self_time(e) > 0]
    total = sum(self_time(e) for e in events) or 1.0
    events.sort(key=self_time, reverse=True)
    return [(e.key, self_time(e) / total, e.count // rounds) for e in events[:k]]
