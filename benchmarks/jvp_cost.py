"""JVP implementations on the sCM network (TrigFlow F on the dataset's backbone): accuracy against a float64
forward-mode reference and cost relative to one forward pass."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from common.config import Config, resolve_run
from common.data import Dataset, load_dataset
from common.models import build_backbone, build_method
from core.conventions import append_dims
from core.jvp import full_float32, jvp

from .timing import interleaved, median, paired_ratio


@dataclass
class JVPRow:
    name: str
    calls: str
    seconds: float
    vs_forward: float
    rel_error: float


def _problem(config: Config, dataset: str, batch: int, data: Dataset | None = None, device="cpu"):
    run = resolve_run(config, dataset, "sct", 0)
    data = data if data is not None else load_dataset(run.data)
    method = build_method(run)
    torch.manual_seed(0)
    model = method.build_model(build_backbone(run.network, data.item_shape)).to(device).eval().requires_grad_(False)
    x0 = data.x[:batch].to(device)
    t, _ = method.sample_t(len(x0))
    t = t.to(device)
    tt = append_dims(t, x0.ndim)
    z = torch.randn_like(x0) * method.sigma_data
    x_t = torch.cos(tt) * x0 + torch.sin(tt) * z
    cs = torch.cos(t) * torch.sin(t)
    tangent = (append_dims(cs, x0.ndim) * (torch.cos(tt) * z - torch.sin(tt) * x0), cs)  # sCT's tangent
    return model, (x_t, t), tangent


def measure(config: Config, dataset: str, batch: int, repeats: int, eps: float = 1e-3, data: Dataset | None = None,
            device="cpu", sync=lambda: None) -> list[JVPRow]:
    model, primals, tangents = _problem(config, dataset, batch, data, device)
    fn = model.forward
    model64 = copy.deepcopy(model).double()
    _, ref = torch.func.jvp(model64.forward, tuple(p.double() for p in primals), tuple(v.double() for v in tangents))
    primal = fn(*primals)

    def double_backward():
        """torch.autograd.functional.jvp: reverse mode twice (the 'double-vjp trick'), for kernels without
        forward-mode AD but with double backward."""
        return torch.autograd.functional.jvp(fn, primals, tangents)

    impls = {
        "forward (no grad)": ("1 forward", lambda: (primal, torch.zeros_like(primal))),
        "forward-mode AD, dual tensors (default)": ("1 forward with tangents, weights constant",
                                                    lambda: jvp(fn, primals, tangents, "autograd")),
        **({"forward-mode AD, dual tensors, TF32 off": ("as the default, IEEE float32 convolutions",
                                                        lambda: _no_tf32(jvp, fn, primals, tangents, "autograd"))}
           if primals[0].is_cuda else {}),
        "torch.func.jvp (core.jvp 'functorch')": ("1 forward with tangents, functorch",
                                                    lambda: jvp(fn, primals, tangents, "functorch")),
        "torch.func.jvp, stock layers": ("1 forward with tangents, zero weight tangents convolved",
                                         lambda: _stock_func_jvp(fn, primals, tangents)),
        f"finite difference, eps {eps:g}": ("3 forwards", lambda: jvp(fn, primals, tangents, "finite_difference",
                                                                      eps)),
        f"finite difference, eps {eps:g}, primal given": ("2 forwards", lambda: jvp(
            fn, primals, tangents, "finite_difference", eps, primal_out=primal)),
        "double backward (autograd.functional.jvp)": ("forward + 2 backward", double_backward),
    }
    calls = {"forward (no grad)": lambda r: _nograd(fn, primals)}
    calls.update({name: (lambda r, f=f: f()) for name, (_, f) in list(impls.items())[1:]})
    times = interleaved(calls, repeats, sync=sync)
    rows = []
    for name, (what, f) in impls.items():
        _, d = f()
        err = 0.0 if name == "forward (no grad)" else float((d.double() - ref).norm() / ref.norm())
        rows.append(JVPRow(name, what, median(times[name]), paired_ratio(times[name], times["forward (no grad)"]),
                           err))
    return rows


def _no_tf32(f, *args):
    with full_float32():
        return f(*args)


def _stock_func_jvp(fn, primals, tangents):
    """torch.func.jvp outside core.jvp: the backbone's layers use torch's own rules (the weights' zero tangents
    are convolved too), what every method ran before the constant-weight layers."""
    with torch.no_grad():
        return torch.func.jvp(fn, primals, tangents)


def _nograd(fn, primals):
    with torch.no_grad():
        return fn(*primals)
