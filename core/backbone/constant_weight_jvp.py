"""Conv2d and Linear whose forward-mode rule skips the weights' tangent inside `core.jvp.jvp`.

sCM and FACM differentiate the network along (x_t, t) only; its weights are constants.  torch's JVP still gives
every captured weight a tangent of zeros and convolves the input against it (a dispatch trace of one Conv2d
under `torch.func.jvp` shows three convolutions: primal, input tangent, zero weight tangent), so a third of the
JVP's convolution FLOPs are spent on zeros.  Inside `core.jvp.jvp` these layers use the rule
d(conv(x, W) + b) = conv(dx, W), which is the exact derivative when W and b are constant; outside it they are
plain nn.Conv2d / nn.Linear (same parameters, same state_dict keys, same backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..jvp import weights_are_constant


class _ConstantWeightConv2d(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, weight, _, *ctx.geometry = inputs
        ctx.save_for_forward(weight)

    @staticmethod
    def jvp(ctx, x_t, *_constant_tangents):
        (weight,) = ctx.saved_tensors
        return F.conv2d(x_t, weight, None, *ctx.geometry)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("constant-weight conv2d is for forward-mode AD under no_grad (core.jvp.jvp) only")


class _ConstantWeightLinear(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[1])

    @staticmethod
    def jvp(ctx, x_t, *_constant_tangents):
        (weight,) = ctx.saved_tensors
        return F.linear(x_t, weight)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("constant-weight linear is for forward-mode AD under no_grad (core.jvp.jvp) only")


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if weights_are_constant() and self.padding_mode == "zeros":
            return _ConstantWeightConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                               self.groups)
        return super().forward(x)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if weights_are_constant():
            return _ConstantWeightLinear.apply(x, self.weight, self.bias)
        return super().forward(x)
