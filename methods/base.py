"""The method interface (docs/extending.md): a frozen dataclass whose defaults are its paper's values.

A method owns its time convention, its parameterization around the shared backbone, its loss, its time
sampling and its sampler.  Everything else (data, backbone, loop, EMA, checkpoints, evaluation) is shared.
Curricula are pure functions of `progress` in [0, 1], never stored state, so a resumed run is the same run.
A method uses only `core/`, validates its fields with `core.errors.require`, and declares its backbone features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

Randn = Callable[[torch.Tensor], torch.Tensor]
"""randn(like) -> standard normal noise shaped like `like`, drawn from per-image generators (the harness's sampler)."""


@dataclass(frozen=True)
class Method:
    name: ClassVar[str]
    needs_teacher: ClassVar[bool] = False  # distillation: the loop passes a ConvertedTeacher
    default_init: ClassVar[str] = "random"  # "random" or "teacher": the paper's initialization
    needs_second_time_input: ClassVar[bool] = False  # a second time input s: CTM's g(x, t, s), FACM's r
    needs_logvar_head: ClassVar[bool] = False  # a log-variance head u(t): sCM's adaptive weighting
    start_sigma: ClassVar[float] = 80.0  # where sampling starts, in EDM sigma (for flow-map errors on gmm)

    def build_model(self, backbone: torch.nn.Module) -> torch.nn.Module:
        """Wrap the shared backbone in this method's parameterization (the trained and sampled module)."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, x0: torch.Tensor, *, progress: float, labels=None,
             teacher=None, target=None) -> dict[str, torch.Tensor]:
        """Return {"loss": scalar to optimize, ...other scalars to log}.

        `teacher`: a ConvertedTeacher for distillation methods; `target`: the EMA target network theta- when
        `target_decay` is not None (else None: such methods use sg(model)).
        """
        raise NotImplementedError

    def sample(self, model: torch.nn.Module, z: torch.Tensor, steps: int, *, randn: Randn,
               labels=None) -> torch.Tensor:
        """Map standard-normal latents z to data-space samples in `steps` sampler steps."""
        raise NotImplementedError

    def nfe(self, steps: int) -> int:
        """Network evaluations per sample for `steps` sampler steps."""
        return steps

    def target_decay(self, progress: float) -> float | None:
        """EMA rate mu of a target network theta- <- mu theta- + (1 - mu) theta, updated by the loop after each
        optimizer step (CM, CTM); None means no target copy is kept."""
        return None

    def extra_modules(self) -> dict[str, torch.nn.Module]:
        """Extra trainable parts (a discriminator, ...), optimized and checkpointed by the loop."""
        return {}
