"""Sampling overhead: a method's sampler (and the whole per-image-seed generate()) against bare network forwards.

The ratio is time / (NFE x one forward on the same batch): 1.0 means the sampler adds nothing to the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.config import Config, resolve_run
from common.data import load_dataset
from common.models import build_backbone, build_method
from common.sample import generate

from .timing import interleaved, median, paired_ratio


@dataclass
class SampleRow:
    dataset: str
    method: str
    steps: int
    nfe: int
    forward_s: float
    sampler_ratio: float
    generate_ratio: float


def _forward_fn(method, model, z):
    """One bare network call on a batch, at the sampler's first noise level, in the method's own signature."""
    name = method.name
    n = z.shape[0]
    if name in ("sct", "scd"):
        return lambda: model(z * 0.5, torch.full((n,), 1.56))
    if name == "facm":
        return lambda: model(z, torch.zeros(n), torch.ones(n))
    if name == "ctm":
        return lambda: model(z * 80, torch.full((n,), 80.0), torch.full((n,), 0.002))
    return lambda: model(z * 80, torch.full((n,), 80.0))


def measure(config: Config, dataset: str, methods: list[str], repeats: int, steps_list=(1, 2),
            log=print) -> list[SampleRow]:
    rows = []
    data = None
    for name in methods:
        run = resolve_run(config, dataset, name, 0)
        data = data or load_dataset(run.data)
        method = build_method(run)
        torch.manual_seed(0)
        model = method.build_model(build_backbone(run.network, data.item_shape)).eval().requires_grad_(False)
        n = run.eval.batch_size
        z = torch.randn(n, *data.item_shape)
        for steps in steps_list:
            row = _measure_one(dataset, method, model, z, steps, data.item_shape, repeats)
            log(f"  sample {dataset}/{name} {steps} steps: sampler x{row.sampler_ratio:.3f}, "
                f"generate x{row.generate_ratio:.3f}")
            rows.append(row)
    return rows


def _measure_one(dataset, method, model, z, steps: int, item_shape, repeats: int) -> SampleRow:
    n = z.shape[0]
    forward = _forward_fn(method, model, z)
    calls = {
        "forward": lambda r: _nograd(forward),
        "sampler": lambda r: _nograd(lambda: method.sample(model, z, steps, randn=torch.randn_like)),
        "generate": lambda r: generate(method, model, item_shape, n, steps, r, n, torch.device("cpu")),
    }
    times = interleaved(calls, repeats)
    nfe = method.nfe(steps)
    per = [f * nfe for f in times["forward"]]
    return SampleRow(dataset, method.name, steps, nfe, median(times["forward"]), paired_ratio(times["sampler"], per),
                     paired_ratio(times["generate"], per))


def _nograd(fn):
    with torch.no_grad():
        return fn()
