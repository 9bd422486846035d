"""Build what the training loop builds (method, model, optimizer, EMA, target, teacher, data) without a run folder,
so one iteration can be timed and counted exactly as common.train runs it."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch

from common.config import Config, RunConfig, resolve_run
from common.data import Dataset, batch_indices, load_dataset
from common.ema import EMA
from common.models import build_backbone, build_method
from common.train import _make_optimizer, _update_target, step_seed


@dataclass
class Bench:
    """One method on one dataset, ready to take training steps."""

    run: RunConfig
    method: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA
    target: torch.nn.Module | None
    teacher: object
    data: Dataset
    x: torch.Tensor  # data.x on the bench's device

    def batch(self, r: int) -> torch.Tensor:
        idx = batch_indices(len(self.data), self.run.train.batch_size, 0, r)
        return self.x[idx.to(self.x.device)]

    def loss(self, r: int) -> torch.Tensor:
        """The loss of round r under the run's autocast setting (train.amp), as common.train computes it."""
        torch.manual_seed(step_seed(0, r))
        with torch.autocast(self.x.device.type, dtype=torch.bfloat16, enabled=self.run.train.amp == "bf16"):
            return self.method.loss(self.model, self.batch(r), progress=0.5, teacher=self.teacher,
                                    target=self.target)["loss"]

    def step(self, r: int) -> None:
        """One iteration of common.train's loop (loss, backward, clip, optimizer, EMA, target), seeded by r."""
        t = self.run.train
        loss = self.loss(r)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or math.inf)
        self.optimizer.step()
        self.ema.update(self.model, (r + 1) * t.batch_size, t.batch_size)
        if self.target is not None:
            _update_target(self.target, self.model, self.method.target_decay(0.5))

    def loss_and_backward(self, r: int) -> None:
        """The counted part of an iteration (optimizer and EMA updates are elementwise: no FLOPs to count)."""
        loss = self.loss(r)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()


def teacher_for(config: Config, dataset: str, data: Dataset, device: str | torch.device = "cpu"):
    """What a distillation method distills: the exact mixture on gmm (as the loop does), else an EDM network on the
    teacher's backbone (random weights: timing and FLOPs do not depend on the weights)."""
    run = resolve_run(config, dataset, "teacher", 0)
    if run.data.kind == "gmm":
        from core.gmm import GaussianMixture

        return GaussianMixture.from_spec(run.data.gmm).teacher()
    method = build_method(run)
    torch.manual_seed(1)
    return method.as_teacher(method.build_model(build_backbone(run.network, data.item_shape)).to(device))


def build(config: Config, dataset: str, method_name: str, data: Dataset | None = None, teacher=None,
          device: str | torch.device = "cpu", **train_overrides) -> Bench:
    """The method's run config, at the teacher's batch size: costs are compared on the same backbone and batch.

    `train_overrides` set TrainConfig fields (the GPU switches amp, channels_last, fused_optimizer, compile), applied
    in the order common.train applies them.
    """
    run = resolve_run(config, dataset, method_name, 0)
    batch = resolve_run(config, dataset, "teacher", 0).train.batch_size
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, batch_size=batch, **train_overrides))
    data = data if data is not None else load_dataset(run.data)
    method = build_method(run)
    torch.manual_seed(0)
    model = method.build_model(build_backbone(run.network, data.item_shape)).to(device)
    if run.network.label_dim:
        raise ValueError("benchmarks time unconditional models; set network.label_dim: 0")
    if run.train.channels_last:
        model.to(memory_format=torch.channels_last)
    for m in method.extra_modules().values():
        m.to(device)
    optimizer = _make_optimizer(run, list(model.parameters()) +
                                [p for m in method.extra_modules().values() for p in m.parameters()])
    ema = EMA(model, run.train.ema_halflife_kimg, run.train.ema_rampup_ratio)
    target = copy.deepcopy(model).requires_grad_(False) if method.target_decay(0.0) is not None else None
    if run.train.compile:
        model.compile()
    model.train()
    if target is not None:
        target.train()
    return Bench(run, method, model, optimizer, ema, target, teacher if method.needs_teacher else None, data,
                 data.x.to(device))
