"""DDPM++ U-Net (EDM's `SongUNet` with the "standard" encoder and decoder), rewritten for cmbench.

Departures from EDM, each for a reason:
- Down-sampling is a 2x2 average pool with ceil_mode and up-sampling is nearest-neighbour to the size
  of the skip it meets, so odd sizes (28 -> 14 -> 7 -> 4 -> 7) work; for even sizes this is EDM's
  [1, 1] resample filter.
- The embedding modulates the normalized activation with `AdaptiveNorm` ("scale_shift" is EDM's
  adaptive_scale, "double" is sCM's adaptive double normalization), not DDPM++'s additive bias.
- Self-attention appears only at `attn_resolutions` (EDM also forces it on the first bottleneck block:
  `attn_bottleneck=True`); in the decoder only in the last block of a level (DDPM++) unless `attn_decoder="all"`
  (ADM).  `resample_proj=False` is ADM's parameter-free skip around down/up blocks.
- The output is one GroupNorm -> SiLU -> conv head at full resolution (DDPM++ "standard" decoder).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ZERO_GAIN, AdaptiveNorm, Conditioning, SelfAttention, conv2d, group_norm


class UNetBlock(nn.Module):
    """Residual block: GroupNorm -> SiLU -> [resample] -> conv3x3 -> adaptive norm -> SiLU -> dropout
    -> conv3x3 (near-zero init), plus a (resampled, 1x1-projected if needed) skip, scaled by sqrt(0.5)
    so that the variance stays put (DDPM++ skip_scale); optional self-attention after it."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        resample: str | None = None,
        attention: bool = False,
        dropout: float = 0.0,
        adaptive_norm: str = "scale_shift",
        resample_proj: bool = True,
    ):
        super().__init__()
        assert resample in (None, "down", "up")
        self.resample = resample
        self.dropout = dropout
        self.norm0 = group_norm(in_channels)
        self.conv0 = conv2d(in_channels, out_channels, kernel=3)
        self.norm1 = AdaptiveNorm(group_norm(out_channels), out_channels, emb_dim, adaptive_norm)
        self.conv1 = conv2d(out_channels, out_channels, kernel=3, gain=ZERO_GAIN)
        # DDPM++ (resample_proj=True) projects the skip with a 1x1 conv whenever the shape changes; ADM only
        # when the channel count does.
        needs_proj = in_channels != out_channels or (resample is not None and resample_proj)
        self.skip = conv2d(in_channels, out_channels, kernel=1) if needs_proj else None
        self.attn = SelfAttention(out_channels) if attention else None

    def _resample(self, x: torch.Tensor, size) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2, ceil_mode=True)
        if self.resample == "up":
            return F.interpolate(
                x, size=size if size is not None else (2 * x.shape[2], 2 * x.shape[3]), mode="nearest"
            )
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, size=None) -> torch.Tensor:
        """`size` is the target (H, W) of an up-sampling block."""
        h = self.conv0(self._resample(F.silu(self.norm0(x)), size))
        h = F.silu(self.norm1(h, emb))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        skip = self._resample(x, size)
        if self.skip is not None:
            skip = self.skip(skip)
        x = (h + skip) * math.sqrt(0.5)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """forward(x [N, C, H, W], t [N], s=None, labels=None, return_logvar=False) -> F (like x), or
    (F, logvar [N]).  `t` is the caller's c_noise (e.g. ln(sigma)/4 or TrigFlow t); the network only
    embeds it.  `s` (CTM's second time) needs second_time_input=True; logvar needs logvar_head=True."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        model_channels: int = 64,
        channel_mult=(1, 2, 2),
        num_blocks: int = 2,
        attn_resolutions=(),
        dropout: float = 0.0,
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        adaptive_norm: str = "scale_shift",
        second_time_input: bool = False,
        logvar_head: bool = False,
        attn_decoder: str = "last",
        attn_bottleneck: bool = False,
        resample_proj: bool = True,
    ):
        super().__init__()
        if attn_decoder not in ("last", "all"):
            raise ValueError(f"attn_decoder must be 'last' (DDPM++) or 'all' (ADM), got {attn_decoder!r}")
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim = label_dim
        emb_dim = 4 * model_channels  # EDM channel_mult_emb = 4, channel_mult_noise = 1
        self.cond = Conditioning(
            model_channels, emb_dim, label_dim, embedding_type, fourier_scale, second_time_input, logvar_head
        )
        block = dict(emb_dim=emb_dim, dropout=dropout, adaptive_norm=adaptive_norm, resample_proj=resample_proj)

        # Encoder: conv in, then per level [down block], num_blocks blocks; every output is a skip.
        self.enc = nn.ModuleDict()
        resolutions, skips = [], []
        res, cout = img_resolution, model_channels
        for level, mult in enumerate(channel_mult):
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = conv2d(in_channels, cout, kernel=3)
            else:
                res = -(-res // 2)  # ceil: 7 -> 4
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, resample="down", **block)
            resolutions.append(res)
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
                skips.append(cout)

        # Decoder: bottleneck pair, then per level [up block], num_blocks + 1 blocks eating one skip each.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = resolutions[level]
            if level == len(channel_mult) - 1:
                attn = res in attn_resolutions or attn_bottleneck
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=attn, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, resample="up", **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = (idx == num_blocks or attn_decoder == "all") and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
        self.out_norm = group_norm(cout)
        self.out_conv = conv2d(cout, out_channels, kernel=3, gain=ZERO_GAIN)

    def forward(self, x, t, s=None, labels=None, return_logvar: bool = False):
        emb, logvar = self.cond(x, t, s, labels, return_logvar)
        skips = []
        h = x
        for block in self.enc.values():
            h = block(h, emb) if isinstance(block, UNetBlock) else block(h)
            skips.append(h)
        for name, block in self.dec.items():
            if "_block" in name:
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, size=skips[-1].shape[2:] if block.resample == "up" else None)
        out = self.out_conv(F.silu(self.out_norm(h)))
        return (out, logvar) if return_logvar else out
