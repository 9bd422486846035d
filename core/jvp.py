"""Forward-mode derivatives for the continuous-time methods (sCM, FACM), and shared randomness.

`jvp` returns (f(p), J_f(p) . v) through forward-mode AD (one forward pass carrying tangents; the sCM paper
reports it costs about one extra forward) or, as a fallback for kernels without forward-mode AD, a central
finite difference.  `SharedRandomness` replays the torch RNG so two calls of a network draw the same dropout
masks (CM, sCM: "the same dropout mask for the two calls").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch.autograd import forward_ad

_constant_weights = 0  # > 0 while `jvp` differentiates: the network's weights are constants (no tangent)


def weights_are_constant() -> bool:
    """True inside `jvp`: layers may drop the weights' (zero) tangent from their forward-mode rule."""
    return _constant_weights > 0


@contextmanager
def _constant_weights_scope():
    global _constant_weights
    _constant_weights += 1
    try:
        yield
    finally:
        _constant_weights -= 1


@contextmanager
def full_float32():
    """float32 convolutions and matmuls in IEEE float32, not TF32: cuDNN convolutions default to TF32, whose 10-bit
    mantissa turns a finite difference with eps 1e-3 into noise (benchmarks/notes.md).  The previous settings are
    restored exactly; a no-op on CPUs."""
    knobs = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
    saved = [k.fp32_precision for k in knobs]
    for k in knobs:
        k.fp32_precision = "ieee"
    try:
        yield
    finally:
        for k, v in zip(knobs, saved, strict=True):
            k.fp32_precision = v


def jvp(fn: Callable, primals: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor], method: str = "autograd",
        eps: float = 1e-3, primal_out: torch.Tensor | None = None):
    """(fn(*primals), directional derivative of fn at primals along tangents), both without graph history.

    method "autograd": dual tensors (torch.autograd.forward_ad), and the backbone's Conv2d/Linear drop the zero
    tangent of their weights (core/backbone/constant_weight_jvp.py), which is cheaper than `torch.func.jvp`'s
    functorch wrappers (benchmarks/notes.md).
    method "functorch": `torch.func.jvp`, the same derivative (kept for transforms that need functorch).
    method "finite_difference": (fn(p + eps v) - fn(p - eps v)) / (2 eps), error O(eps^2); `fn` is called at
    both points (and at primals unless the caller passes `primal_out`, the value it already has: two calls instead
    of three), so pass a function whose randomness is fixed (SharedRandomness) if it uses dropout.  The AD
    paths compute the primal inside the same forward pass anyway and ignore `primal_out`.

    All run with autocast off, in the inputs' precision: under bf16 autocast torch.func.jvp fails (torch 2.14: a
    convolution's tangent stays float32 while autocast casts its weight, tests/common/test_gpu_options.py), and a
    finite difference of bf16 outputs would cancel to noise; the sCM paper keeps the tangent in high precision too.
    The finite difference also turns TF32 off (`full_float32`); the AD paths keep the caller's TF32 setting, whose
    error is that of the forward pass itself.
    """
    primals, tangents = tuple(primals), tuple(tangents)
    full_precision = torch.autocast(primals[0].device.type, enabled=False)
    if method == "autograd":
        with torch.no_grad(), full_precision, _constant_weights_scope(), forward_ad.dual_level():
            out = fn(*(forward_ad.make_dual(p, v) for p, v in zip(primals, tangents, strict=True)))
            primal, tangent = forward_ad.unpack_dual(out)
            return primal, (torch.zeros_like(primal) if tangent is None else tangent)
    if method == "functorch":
        with torch.no_grad(), full_precision, _constant_weights_scope():
            return torch.func.jvp(fn, primals, tangents)
    if method == "finite_difference":
        with torch.no_grad(), full_precision, full_float32():
            out = fn(*primals) if primal_out is None else primal_out.detach()
            plus = fn(*(p + eps * v for p, v in zip(primals, tangents, strict=True)))
            minus = fn(*(p - eps * v for p, v in zip(primals, tangents, strict=True)))
        return out, (plus - minus) / (2 * eps)
    raise ValueError(f"jvp method must be 'autograd', 'functorch' or 'finite_difference', got {method!r}")


class SharedRandomness:
    """Capture the RNG state once; `replay()` restores it, so every call inside sees the same random draws."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    @contextmanager
    def replay(self):
        torch.set_rng_state(self.cpu_state)
        if self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.device)
        yield
