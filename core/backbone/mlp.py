"""Residual MLP for point data (2-D mixtures of the analytic track), with the UNet's conditioning.

It takes the same (x, t, s, labels, return_logvar) call as the UNet so that every method, sampler and
test runs unchanged on both; its blocks are the UNet's residual block with the convolutions replaced
by Linear layers and GroupNorm by a parameter-free LayerNorm (the adaptive norm supplies the affine).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ZERO_GAIN, AdaptiveNorm, Conditioning, linear


class _LayerNorm(nn.Module):
    """LayerNorm without its own scale and shift (the adaptive norm provides them)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h, h.shape[-1:])


class MLPBlock(nn.Module):
    """h + Linear(dropout(SiLU(adaptive_norm(h, emb)))), the last Linear near zero so that the block
    starts close to the identity (EDM's init_zero)."""

    def __init__(self, hidden: int, emb_dim: int, dropout: float = 0.0, adaptive_norm: str = "scale_shift"):
        super().__init__()
        self.dropout = dropout
        self.norm = AdaptiveNorm(_LayerNorm(), hidden, emb_dim, adaptive_norm)
        self.linear = linear(hidden, hidden, gain=ZERO_GAIN)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        r = F.silu(self.norm(h, emb))
        return h + self.linear(F.dropout(r, p=self.dropout, training=self.training))


class MLP(nn.Module):
    """forward(x [N, dim], t [N], s=None, labels=None, return_logvar=False) -> F [N, dim], or
    (F, logvar [N]).  Linear in -> `depth` residual blocks -> LayerNorm -> SiLU -> Linear out (near
    zero); the final norm plays the role of the UNet's output GroupNorm."""

    def __init__(
        self,
        dim: int,
        label_dim: int = 0,
        hidden: int = 256,
        depth: int = 3,
        dropout: float = 0.0,
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        adaptive_norm: str = "scale_shift",
        second_time_input: bool = False,
        logvar_head: bool = False,
    ):
        super().__init__()
        self.dim, self.label_dim = dim, label_dim
        self.cond = Conditioning(
            hidden, hidden, label_dim, embedding_type, fourier_scale, second_time_input, logvar_head
        )
        self.inp = linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, hidden, dropout, adaptive_norm) for _ in range(depth))
        self.out_norm = _LayerNorm()
        self.out = linear(hidden, dim, gain=ZERO_GAIN)

    def forward(self, x, t, s=None, labels=None, return_logvar: bool = False):
        emb, logvar = self.cond(x, t, s, labels, return_logvar)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        out = self.out(F.silu(self.out_norm(h)))
        return (out, logvar) if return_logvar else out
