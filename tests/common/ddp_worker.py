"""Run by tests/common/test_distributed.py under torchrun with 2 gloo processes (not a test module itself).

`python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.common.ddp_worker OUT CONFIG` does:
1. one sCT step (JVP through torch.func.jvp) on this rank's half of a fixed global batch, gradients averaged by
   common.distributed, SGD step; every rank's gradients and parameters go to OUT/step.pt (rank 0 writes);
2. the real loop: common.train.train on CONFIG's gmm/sct run with train.devices 2, into OUT/run.
The test computes the single-process reference with the same helpers on the whole batch.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from common import distributed
from core.backbone import MLP
from methods.scm import SCT

BATCH = 8


def make_model() -> torch.nn.Module:
    """A small sCT model with every parameter away from its (near-zero) init, so every gradient is informative."""
    torch.manual_seed(0)
    model = SCT().build_model(MLP(2, hidden=16, depth=2, logvar_head=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, dx_t/dt) of the whole batch, the same on every rank."""
    g = torch.Generator().manual_seed(1)
    x0, z = torch.randn(BATCH, 2, generator=g), 0.5 * torch.randn(BATCH, 2, generator=g)
    t = torch.rand(BATCH, generator=g) * 1.4 + 0.05
    tt = t[:, None]
    return torch.cos(tt) * x0 + torch.sin(tt) * z, t, torch.cos(tt) * z - torch.sin(tt) * x0


def sct_step(model, rows: torch.Tensor, group: distributed.Group, lr: float = 0.1):
    """One sCT step on batch rows `rows` (loss_at: F with grad, the JVP without), gradients averaged over ranks."""
    x_t, t, dxdt = global_batch()
    loss = SCT().loss_at(model, x_t[rows], t[rows], dxdt[rows], r=1.0)["loss"].mean()
    loss.backward()
    distributed.average_gradients(list(model.parameters()), group)
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(lr * p.grad)
    return grads, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def main(out: Path, config: Path) -> None:
    from common.config import load_config, resolve_run
    from common.train import train

    group, _ = distributed.setup("cpu", 2)
    model = make_model()
    distributed.broadcast_module(model, group)
    grads, params = sct_step(model, distributed.shard(torch.arange(BATCH), group), group)
    everything = [torch.empty_like(v) for v in (grads, params) for _ in range(group.world_size)]
    dist.all_gather(everything[:group.world_size], grads)
    dist.all_gather(everything[group.world_size:], params)
    if group.is_main:
        torch.save({"grads": everything[:group.world_size], "params": everything[group.world_size:]},
                   out / "step.pt")
    run = resolve_run(load_config(config), "gmm", "sct", 0)
    train(run, out / "run", progress_bar=False)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
