"""JVP: torch.func and finite differences agree with the analytic derivative; shared randomness replays dropout."""

import pytest
import torch

from common.jvp import SharedRandomness, jvp


def fn(x, t):
    return torch.sin(x) * t[:, None] ** 2


@pytest.mark.parametrize("method, tol", [("autograd", 1e-12), ("functorch", 1e-12), ("finite_difference", 1e-6)])
def test_jvp_matches_closed_form(method, tol):
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64) + 0.5
    vx, vt = torch.randn_like(x), torch.randn_like(t)
    out, d = jvp(fn, (x, t), (vx, vt), method=method, eps=1e-4)
    expect = torch.cos(x) * vx * t[:, None] ** 2 + torch.sin(x) * 2 * t[:, None] * vt[:, None]
    assert torch.allclose(out, fn(x, t)) and torch.allclose(d, expect, atol=tol, rtol=tol)
    assert not out.requires_grad and not d.requires_grad


def test_unknown_method():
    with pytest.raises(ValueError, match="autograd"):
        jvp(fn, (torch.ones(1, 1), torch.ones(1)), (torch.ones(1, 1), torch.ones(1)), method="magic")


def test_shared_randomness_replays_dropout():
    drop = torch.nn.Dropout(0.5)
    x = torch.ones(1000)
    shared = SharedRandomness(torch.device("cpu"))
    with shared.replay():
        a = drop(x)
    with shared.replay():
        b = drop(x)
    assert torch.equal(a, b) and not torch.equal(a, drop(x))


def test_finite_difference_reuses_a_given_primal():
    """With the primal passed in, the fallback calls fn twice (not three times) and returns the same derivative."""
    calls = []

    def counted(x, t):
        calls.append(1)
        return fn(x, t)

    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64) + 0.5
    v = (torch.randn_like(x), torch.randn_like(t))
    out, d = jvp(counted, (x, t), v, method="finite_difference", eps=1e-4)
    assert len(calls) == 3
    calls.clear()
    out2, d2 = jvp(counted, (x, t), v, method="finite_difference", eps=1e-4, primal_out=fn(x, t))
    assert len(calls) == 2 and torch.equal(out, out2) and torch.equal(d, d2)
