"""Effective compute (docs/evaluation.md): what a row of the table cost to train and to sample.

FLOPs are counted by torch.utils.flop_counter on the real calls (a method's loss and backward, a JVP included;
its sampler), not estimated from a formula, so a method that evaluates the network three times per iteration
shows three times the cost.  Counting runs once per run, on copies, at batch 1 for sampling and at the training
batch for an iteration: the counted work is never mixed into the trained weights or the timed loop.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from .device import describe
from .records import RunDir


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of every matmul/conv/attention aten op that `fn` dispatches (forward, backward and JVP alike)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sampling_flops(method, model: torch.nn.Module, item_shape: tuple[int, ...], steps: int,
                   device: torch.device, label_dim: int = 0) -> int:
    """FLOPs to draw one sample with `steps` sampler steps (the whole sampler, so guidance or Heun counts)."""
    z = torch.zeros((1, *item_shape), device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device) if label_dim > 0 else None
    model.eval()
    with torch.no_grad():
        return count_flops(lambda: method.sample(model, z, steps, randn=torch.zeros_like, labels=labels))


def train_iteration_flops(method, model: torch.nn.Module, x0: torch.Tensor, *, labels=None, teacher=None,
                          target: torch.nn.Module | None = None, progress: float = 0.5) -> int:
    """FLOPs of one training iteration (loss, teacher calls and JVPs inside it, and the backward pass).

    Runs on deep copies so the trained model, its gradients and the target network are untouched; the torch
    RNG state is saved and restored so the run's own randomness is unaffected.
    """
    model_copy = copy.deepcopy(model)
    target_copy = copy.deepcopy(target) if target is not None else None
    state = torch.random.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if x0.is_cuda else None

    def iteration():
        terms = method.loss(model_copy, x0, progress=progress, labels=labels, target=target_copy,
                            teacher=teacher.with_labels(labels) if teacher is not None else None)
        terms["loss"].backward()

    try:
        return count_flops(iteration)
    finally:
        torch.random.set_rng_state(state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)


def sampling_compute(run_dir, method, model: torch.nn.Module, item_shape: tuple[int, ...], steps: int,
                     device: torch.device, label_dim: int, sec_per_sample: float) -> dict:
    """The compute columns of a sampled row: this sampler's cost beside the training cost of its run."""
    info = RunDir(run_dir).read_run_info()
    params = n_params(model)
    nfe = method.nfe(steps)
    flops = sampling_flops(method, model, item_shape, steps, device, label_dim)
    return {
        "params": params, "nfe": nfe, "params_x_nfe": params * nfe,  # the sCM paper's effective sampling compute
        "flops_per_sample": flops, "flops_per_eval": flops / nfe,
        "sec_per_sample": sec_per_sample, "sample_device": describe(device),
        **{k: info[k] for k in ("train_flops_per_iter", "train_flops_total", "sec_per_iter", "train_seconds",
                                "iterations", "batch_size", "flops_budget", "teacher_flops_total") if k in info},
        "train_device": info.get("device"),
    }
