"""JVP: torch.func and finite differences agree with the analytic derivative; shared randomness replays dropout."""

import pytest
import torch

from core.jvp import SharedRandomness, full_float32, jvp


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


def test_full_float32_turns_tf32_off_and_restores_the_settings_exactly():
    """The finite difference runs in IEEE float32 (TF32 gave it 93% error on an H200); the caller's TF32 choice
    comes back unchanged afterwards, also after an exception."""
    knobs = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
    before = [k.fp32_precision for k in knobs]
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with full_float32():
                assert [k.fp32_precision for k in knobs] == ["ieee", "ieee"]
                raise RuntimeError("inside")
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        seen = []
        jvp(lambda x: seen.append(torch.backends.cudnn.conv.fp32_precision) or x * 2, (torch.ones(2),),
            (torch.ones(2),), "finite_difference")
        assert seen == ["ieee"] * 3 and torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        for k, v in zip(knobs, before, strict=True):
            k.fp32_precision = v
