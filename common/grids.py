"""Pictures of samples: an image grid, or for 2-D points a scatter over the true mixture's density."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import RunConfig, from_dict
from .records import read_samples


def image_grid(x: np.ndarray, n: int = 64) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [rows*H, cols*W, C] tiling the first n images."""
    x = x[:n]
    cols = int(np.ceil(np.sqrt(len(x))))
    rows = int(np.ceil(len(x) / cols))
    _, c, h, w = x.shape
    canvas = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.uint8)
    u8 = np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    for i, img in enumerate(u8):
        r, k = divmod(i, cols)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + k * (w + 1): 1 + k * (w + 1) + w] = img
    return canvas


def save_grid(samples_path: str | Path, out: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, _, meta = read_samples(samples_path)
    run = from_dict(RunConfig, meta["run"], "meta.run", str(samples_path))
    title = f"{run.method} on {run.dataset}, NFE {meta['nfe']}"
    fig, ax = plt.subplots(figsize=(4, 4))
    if samples.ndim == 4:
        grid = image_grid(samples)
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", interpolation="nearest")
        ax.axis("off")
    else:
        import torch

        from core.gmm import GaussianMixture

        gmm = GaussianMixture.from_spec(run.data.gmm)
        lim = 1.3 * max(abs(np.array(run.data.gmm.means)).max() + 3 * gmm.component_scales.max().item(), 0.5)
        if gmm.dim == 2:  # higher-dimensional mixtures: the first two coordinates of the samples only
            u = np.linspace(-lim, lim, 200)
            grid = np.stack(np.meshgrid(u, u), -1).reshape(-1, 2)
            density = gmm.log_prob(torch.from_numpy(grid)).exp().numpy().reshape(200, 200)
            ax.contourf(u, u, density, levels=20, cmap="Blues")
        pts = samples[:5000, :2]
        ax.scatter(pts[:, 0], pts[:, 1], s=1, c="tab:red", alpha=0.4)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
