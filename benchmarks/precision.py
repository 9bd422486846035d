"""bf16 against fp32 on the consistency signal of late curricula: `python -m benchmarks.precision`.

iCT at the end of its curriculum (N = 1281 levels) and ECT in its last stage compare the network at two noise
levels a small step apart.  This measures, on the CIFAR-10 track's DDPM++ network (random weights, CPU), how far
bf16 autocast moves that distance and the loss from their float32 values on the same inputs and noise, early and
late in training.  It is a necessary check, not a sufficient one: loss curves and FID at a reduced budget on a GPU
decide the track's default (docs/cluster.md, "Precision").
"""

from __future__ import annotations

import argparse

import torch

from common.config import load_config, resolve_run
from common.models import build_backbone, build_method

TRACK = "config/cifar10.yaml"


def _loss_terms(method, model, x0, progress: float, amp: bool, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        terms = method.loss(model, x0, progress=progress)
    return {k: float(terms[k]) for k in ("loss", "distance")}


@torch.no_grad()
def _unzero(model: torch.nn.Module) -> None:
    """DDPM++ starts its residual-branch and output layers near zero (EDM's init_zero, 1e-5), which would leave F
    about 1e-5 in any precision: give those weights the spread of a 1/sqrt(fan_in) init, as after training."""
    for p in model.parameters():
        if p.ndim > 1 and p.abs().max() < 1e-3:
            p.normal_(0.0, p[0].numel() ** -0.5)


def measure(method_name: str, progress: float, batch: int, seeds: int) -> dict[str, float]:
    run = resolve_run(load_config(TRACK), "cifar10", method_name, 0)
    method = build_method(run)
    torch.manual_seed(0)
    model = method.build_model(build_backbone(run.network, (3, 32, 32))).eval()
    _unzero(model)
    x0 = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    rel = {"loss": [], "distance": []}
    for seed in range(seeds):
        fp32 = _loss_terms(method, model, x0, progress, False, seed)
        bf16 = _loss_terms(method, model, x0, progress, True, seed)
        for k in rel:
            rel[k].append(abs(bf16[k] - fp32[k]) / max(abs(fp32[k]), 1e-30))
    return {k: sum(v) / len(v) for k, v in rel.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seeds", type=int, default=3, help="noise draws per setting (the mean is printed)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| method | progress | mean relative change of the distance | of the loss |")
    print("|---|---|---|---|")
    for name in ("ict", "ect"):
        for progress in (0.0, 0.5, 0.999):
            r = measure(name, progress, args.batch, args.seeds)
            print(f"| {name} | {progress} | {r['distance']:.3g} | {r['loss']:.3g} |", flush=True)


if __name__ == "__main__":
    main()
