"""Exponential moving average of weights with EDM's half-life in samples and ramp-up (Karras et al. 2022)."""

from __future__ import annotations

import copy

import torch


class EMA:
    """A frozen copy of a module whose weights track the live ones.

    beta = 0.5 ** (batch / halflife_nimg): the EMA weight halves every `halflife_nimg` training samples, so the
    averaging horizon does not change with the batch size.  With a ramp-up ratio r, the half-life is at most
    r * (samples seen), as in EDM's training loop, so early weights are forgotten quickly.
    """

    def __init__(self, module: torch.nn.Module, halflife_kimg: float, rampup_ratio: float | None = 0.05):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.halflife_nimg = halflife_kimg * 1000
        self.rampup_ratio = rampup_ratio

    def beta(self, nimg: int, batch_size: int) -> float:
        halflife = self.halflife_nimg
        if self.rampup_ratio is not None:
            halflife = min(halflife, nimg * self.rampup_ratio)
        return 0.5 ** (batch_size / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, module: torch.nn.Module, nimg: int, batch_size: int) -> None:
        """Call after the optimizer step that brought the samples seen to `nimg`."""
        beta = self.beta(nimg, batch_size)
        for p_ema, p in zip(self.module.parameters(), module.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1 - beta)
        for b_ema, b in zip(self.module.buffers(), module.buffers(), strict=True):
            b_ema.copy_(b)
