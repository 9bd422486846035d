"""The shared backbones: a DDPM++ U-Net for images and a residual MLP for points.

Both take forward(x, t, s=None, labels=None, return_logvar=False) and return the raw network output
F shaped like x (methods own their preconditioning around it, as EDM's `EDMPrecond` does).
"""

from .mlp import MLP
from .unet import UNet

__all__ = ["MLP", "UNet"]
