"""Effective compute: FLOP counts of the real calls against closed forms, and no side effects on the run."""

import torch

from common.compute import count_flops, sampling_flops, train_iteration_flops
from common.models import build_backbone, build_method
from tests.methods.conftest import make_run


def _model(method_name: str):
    run = make_run(method_name)
    method = build_method(run)
    torch.manual_seed(0)
    return method, method.build_model(build_backbone(run.network, (2,)))


def test_linear_flops_closed_form():
    layer = torch.nn.Linear(16, 32, bias=False)
    assert count_flops(lambda: layer(torch.randn(4, 16))) == 2 * 4 * 16 * 32


def test_sampling_flops_scale_with_network_evaluations():
    """Heun with k steps evaluates the network 2k - 1 times; a consistency sampler k times."""
    for name in ("teacher", "ict"):
        method, model = _model(name)
        one = sampling_flops(method, model, (2,), 1, torch.device("cpu"))
        assert one > 0
        for steps in (2, 4):
            assert sampling_flops(method, model, (2,), steps, torch.device("cpu")) == method.nfe(steps) * one


def test_train_iteration_flops_leave_the_run_untouched():
    method, model = _model("teacher")
    x0 = torch.randn(64, 2) * 0.5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    flops = train_iteration_flops(method, model, x0)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # forward + backward of one batch: backward costs about twice the forward (input grads and weight grads)
    forward = count_flops(lambda: model(x0, torch.full((64,), 1.0)))
    assert 2.5 * forward <= flops <= 3.0 * forward + 1
