"""Build the shared backbone and a method's model from a resolved run config; load trained runs."""

from __future__ import annotations

from pathlib import Path

import torch

from core.errors import ConfigError

from . import checkpoint
from .config import NetworkSpec, RunConfig, load_run_config
from .records import RunDir


def build_backbone(spec: NetworkSpec, item_shape: tuple[int, ...]) -> torch.nn.Module:
    from core.backbone import MLP, UNet

    common = dict(label_dim=spec.label_dim, dropout=spec.dropout, embedding_type=spec.embedding_type,
                  fourier_scale=spec.fourier_scale, adaptive_norm=spec.adaptive_norm,
                  second_time_input=spec.second_time_input, logvar_head=spec.logvar_head)
    if spec.kind == "mlp":
        if len(item_shape) != 1:
            raise ConfigError(f"network.kind 'mlp' needs point data [N, D], got items of shape {item_shape} "
                              f"(use network.kind: unet for images)")
        return MLP(item_shape[0], hidden=spec.hidden, depth=spec.depth, **common)
    if len(item_shape) != 3 or item_shape[1] != item_shape[2]:
        raise ConfigError(f"network.kind 'unet' needs square images [N, C, H, H], got items of shape {item_shape} "
                          f"(use network.kind: mlp for points)")
    c, h, _ = item_shape
    return UNet(img_resolution=h, in_channels=c, out_channels=c, model_channels=spec.model_channels,
                channel_mult=tuple(spec.channel_mult), num_blocks=spec.num_blocks,
                attn_resolutions=tuple(spec.attn_resolutions), attn_decoder=spec.attn_decoder,
                attn_bottleneck=spec.attn_bottleneck, resample_proj=spec.resample_proj, **common)


def build_method(run: RunConfig):
    from methods.registry import get_method_class

    return get_method_class(run.method)(**run.method_params)


def load_trained(run_dir: str | Path, device: torch.device, weights: str = "ema"):
    """(run config, method, model) of a finished run, with its EMA (default) or raw weights."""
    run = load_run_config(run_dir)
    state = checkpoint.load(RunDir(run_dir).final, map_location=device)
    method = build_method(run)
    item_shape = tuple(state["item_shape"])
    model = method.build_model(build_backbone(run.network, item_shape))
    if weights not in ("ema", "model"):
        raise ConfigError(f"weights must be 'ema' or 'model', got '{weights}'")
    model.load_state_dict(state[weights])
    return run, method, model.to(device).eval(), item_shape
