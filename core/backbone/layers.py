"""Pieces shared by the UNet and the MLP: initialization, time embeddings, adaptive norm, attention.

Everything here is written so that `torch.func.jvp` (forward-mode AD, which sCM and FACM need) goes
through it: no in-place updates of activations, no fused attention kernels, and all tensors follow
the input's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..conventions import time_vector
from .constant_weight_jvp import Conv2d, Linear

# ---------------------------------------------------------------------------------------------------
# Initialization (EDM `weight_init`: xavier-uniform everywhere, zero biases, "init_zero" layers scaled
# down to 1e-5 so that every residual branch starts close to the identity but still carries gradient).

ZERO_GAIN = 1e-5


def init_(layer: nn.Linear | nn.Conv2d, gain: float = 1.0) -> nn.Module:
    """Xavier-uniform weight times `gain`, zero bias (EDM's `init` / `init_zero` with init_weight=gain)."""
    nn.init.xavier_uniform_(layer.weight, gain=gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def linear(fan_in: int, fan_out: int, gain: float = 1.0, bias: bool = True) -> nn.Linear:
    return init_(Linear(fan_in, fan_out, bias=bias), gain)


def conv2d(c_in: int, c_out: int, kernel: int, gain: float = 1.0) -> nn.Conv2d:
    return init_(Conv2d(c_in, c_out, kernel, padding=kernel // 2), gain)


def group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    """EDM's GroupNorm: min(32, C // 4) groups (at least 4 channels per group, so small widths work),
    lowered to the nearest divisor of C; eps 1e-6 as in DDPM++."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=eps)


def pixel_norm(v: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """v / sqrt(mean(v^2) + eps) over `dim` (the channel dimension): sCM's pnorm."""
    return v * torch.rsqrt(v.square().mean(dim=dim, keepdim=True) + eps)


def _embedding_dtype(layer: nn.Linear) -> torch.dtype:
    """The dtype the embedding is computed in: the parameters' (float32 in training, float64 when
    a test converts the whole network), never the autocast dtype."""
    return torch.promote_types(layer.weight.dtype, torch.float32)


# ---------------------------------------------------------------------------------------------------
# Time embeddings.


class PositionalEmbedding(nn.Module):
    """Transformer sinusoids, EDM's DDPM++ version (max_positions 10000, endpoint=True): frequencies
    from 1 down to 1/max_positions, emb = cat(cos(f t), sin(f t))."""

    def __init__(self, num_channels: int, max_positions: int = 10000):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=t.dtype, device=t.device) / max(half - 1, 1)
        freqs = (1.0 / self.max_positions) ** freqs
        arg = t[:, None] * freqs[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++; iCT and sCM lower the scale from 16 to 0.02).  The
    frequencies f ~ N(0, scale^2) are drawn from torch's global RNG, so a fixed torch.manual_seed
    gives identical builds, and kept as a buffer so checkpoints carry them."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        arg = t[:, None] * (2 * math.pi * self.freqs.to(t.dtype))[None, :]
        return torch.cat([arg.cos(), arg.sin()], dim=1)


def noise_features(num_channels: int, embedding_type: str, fourier_scale: float) -> nn.Module:
    if embedding_type == "positional":
        return PositionalEmbedding(num_channels)
    if embedding_type == "fourier":
        return FourierEmbedding(num_channels, scale=fourier_scale)
    raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")


class TimeEmbedding(nn.Module):
    """features(t) -> Linear -> SiLU -> Linear, always in float32 (or the parameters' float64): sCM
    lists a low-precision time embedding among its failure modes, so autocast is switched off here.

    `zero_out=True` zero-initializes the last Linear so the branch starts as an exact no-op (used for
    CTM's new s-embedding on top of a teacher's weights)."""

    def __init__(
        self,
        noise_dim: int,
        emb_dim: int,
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        zero_out: bool = False,
    ):
        super().__init__()
        self.features = noise_features(noise_dim, embedding_type, fourier_scale)
        self.layer0 = linear(noise_dim, emb_dim)
        self.layer1 = linear(emb_dim, emb_dim, gain=0.0 if zero_out else 1.0)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=t.device.type, enabled=False):
            t = t.to(_embedding_dtype(self.layer0))
            return self.layer1(F.silu(self.layer0(self.features(t))))


class Conditioning(nn.Module):
    """Maps (t, s, labels) to the embedding every block is conditioned on, plus the optional
    log-variance head.  Shared by the UNet and the MLP so both check their inputs the same way.

    emb = SiLU(map_t(t) + map_s(s) + W_label y) (ADM's order: the label enters after the time MLP).
    The log-variance head u(t) is sCM's adaptive weighting w_phi(t): a small MLP on the fixed
    features of t, with its own parameters so the weighting loss does not train the backbone.
    """

    def __init__(
        self,
        noise_dim: int,
        emb_dim: int,
        label_dim: int = 0,
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        second_time_input: bool = False,
        logvar_head: bool = False,
    ):
        super().__init__()
        self.label_dim = label_dim
        self.map_t = TimeEmbedding(noise_dim, emb_dim, embedding_type, fourier_scale)
        self.map_s = (
            TimeEmbedding(noise_dim, emb_dim, embedding_type, fourier_scale, zero_out=True)
            if second_time_input
            else None
        )
        # Unit-variance rows so a one-hot label has the scale of the time embedding (ADM init).
        self.map_label = nn.Linear(label_dim, emb_dim, bias=False) if label_dim else None
        if self.map_label is not None:
            nn.init.normal_(self.map_label.weight)
        self.logvar = (
            nn.Sequential(linear(noise_dim, noise_dim), nn.SiLU(), linear(noise_dim, 1, gain=0.0))
            if logvar_head
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        s: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logvar: bool = False,
    ):
        """Returns (emb [N, emb_dim], logvar [N] or None).  `x` only gives the batch size and device;
        `t` and `s` may be [N] or scalars."""
        if s is not None and self.map_s is None:
            raise ValueError("s was given but the network was built without second_time_input=True")
        if return_logvar and self.logvar is None:
            raise ValueError("return_logvar=True needs a network built with logvar_head=True")
        if labels is not None and self.map_label is None:
            raise ValueError("labels were given but the network was built with label_dim=0")
        batch = x.shape[0]
        t = time_vector(t, x)
        with torch.autocast(device_type=t.device.type, enabled=False):
            emb = self.map_t(t)
            if self.map_s is not None:
                emb = emb + self.map_s(t if s is None else time_vector(s, x))
            if self.map_label is not None:
                emb = emb + self.map_label(_label_matrix(labels, batch, self.label_dim, emb))
            emb = F.silu(emb)
            logvar = None
            if return_logvar:
                feats = self.map_t.features(t.to(emb.dtype))
                logvar = self.logvar(feats).squeeze(1)
        return emb, logvar


def _label_matrix(labels: torch.Tensor | None, batch: int, label_dim: int, like: torch.Tensor):
    """Labels as a float [N, label_dim] matrix: int indices become one-hot, None becomes zeros
    (the unconditional input, as EDM does)."""
    if labels is None:
        return like.new_zeros(batch, label_dim)
    if not labels.is_floating_point():
        labels = F.one_hot(labels.reshape(-1), label_dim)
    if labels.shape != (batch, label_dim):
        raise ValueError(
            f"labels must be [{batch}] indices or [{batch}, {label_dim}], got {tuple(labels.shape)}"
        )
    return labels.to(device=like.device, dtype=like.dtype)


# ---------------------------------------------------------------------------------------------------
# Conditioning of a normalized activation on the embedding.


class AdaptiveNorm(nn.Module):
    """norm(h) modulated by the embedding; returns the pre-activation (the caller applies SiLU).

    - "scale_shift" (EDM adaptive_scale): norm(h) * (1 + scale) + shift.
    - "double" (sCM's adaptive double normalization): norm(h) * pnorm(scale) + pnorm(shift), with the
      pixel norm over channels keeping the modulation at unit scale whatever the embedding's size.
    (scale, shift) = Linear(emb) in both cases.
    - "add" (DDPM++ as in Song et al. and EDM's SongUNet, adaptive_scale=False): norm(h + Linear(emb)), half the
      parameters; the paper tracks use it to match the papers' 56M network.
    """

    def __init__(self, norm: nn.Module, channels: int, emb_dim: int, mode: str = "scale_shift"):
        super().__init__()
        if mode not in ("scale_shift", "double", "add"):
            raise ValueError(f"adaptive_norm must be 'scale_shift', 'double' or 'add', got {mode!r}")
        self.mode = mode
        self.norm = norm
        self.affine = linear(emb_dim, (1 if mode == "add" else 2) * channels)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.mode == "add":
            bias = self.affine(emb)
            return self.norm(h + bias.reshape(bias.shape + (1,) * (h.ndim - 2)).to(h.dtype))
        scale, shift = self.affine(emb).chunk(2, dim=1)
        if self.mode == "double":
            scale, shift = pixel_norm(scale), pixel_norm(shift)
        else:
            scale = scale + 1
        shape = scale.shape + (1,) * (h.ndim - 2)  # [N, C] -> [N, C, 1, 1] for images
        return self.norm(h) * scale.reshape(shape).to(h.dtype) + shift.reshape(shape).to(h.dtype)


# ---------------------------------------------------------------------------------------------------
# Self-attention.


class SelfAttention(nn.Module):
    """Multi-head self-attention over pixels, residual, scaled by sqrt(0.5) as DDPM++ does.

    Written with explicit matmul + softmax: fused / flash kernels have no forward-mode AD (sCM's
    warning).  The attention weights are computed in float32 (or float64) with autocast off, as EDM's
    AttentionOp does.  Heads have at most 64 channels (one head at small widths)."""

    def __init__(self, channels: int, max_head_channels: int = 64):
        super().__init__()
        self.num_heads = next(
            h for h in range(1, channels + 1) if channels % h == 0 and channels // h <= max_head_channels
        )
        self.norm = group_norm(channels)
        self.qkv = conv2d(channels, 3 * channels, kernel=1, gain=math.sqrt(0.2))
        self.proj = conv2d(channels, channels, kernel=1, gain=ZERO_GAIN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(q.dtype, torch.float32)
            logits = torch.einsum("nhcq,nhck->nhqk", q.to(dtype), k.to(dtype)) / math.sqrt(q.shape[2])
            weights = logits.softmax(dim=-1)
        a = torch.einsum("nhqk,nhck->nhcq", weights.to(v.dtype), v).reshape(n, c, h, w)
        return (x + self.proj(a)) * math.sqrt(0.5)
