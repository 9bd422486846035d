"""Per method: training-iteration time / the teacher's, beside the ratio of their FLOPs (forward, backward, JVP)."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.flop_counter import FlopCounterMode

from common.config import Config, resolve_run
from common.data import load_dataset

from .setup import build, teacher_for
from .timing import interleaved, median, paired_ratio


@dataclass
class TrainCost:
    method: str
    teacher_s: float
    method_s: float
    time_ratio: float
    flop_ratio: float
    gflops: float

    @property
    def vs_flops(self) -> float:
        return self.time_ratio / self.flop_ratio


def flops_per_iter(bench, rounds: int) -> float:
    """Mean over the same seeded rounds the timing uses (CTM's number of teacher steps varies per batch)."""
    total = 0
    for r in range(rounds):
        with FlopCounterMode(display=False) as counter:
            bench.loss_and_backward(r)
        total += counter.get_total_flops()
    return total / rounds


def measure(config: Config, dataset: str, methods: list[str], repeats: int, log=print) -> list[TrainCost]:
    data = load_dataset(resolve_run(config, dataset, "teacher", 0).data)
    teacher = teacher_for(config, dataset, data)
    base = build(config, dataset, "teacher", data)
    base_flops = flops_per_iter(base, repeats)
    rows = [TrainCost("teacher", 0, 0, 1.0, 1.0, base_flops / 1e9)]
    for name in methods:
        bench = build(config, dataset, name, data, teacher)
        times = interleaved({"teacher": base.step, name: bench.step}, repeats)
        flops = flops_per_iter(bench, repeats)
        row = TrainCost(name, median(times["teacher"]), median(times[name]),
                        paired_ratio(times[name], times["teacher"]), flops / base_flops, flops / 1e9)
        log(f"  train {dataset}/{name}: time x{row.time_ratio:.2f}, flops x{row.flop_ratio:.2f}")
        rows.append(row)
    rows[0].teacher_s = rows[0].method_s = median([r.teacher_s for r in rows[1:]]) if len(rows) > 1 else 0.0
    return rows
