"""Properties of the shared backbones (common/backbone): shapes, forward-mode AD, CTM's s-branch,
dropout reproducibility, fp32 time embedding, batch independence, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch

from core.backbone import MLP, UNet
from core.backbone.layers import Conditioning, TimeEmbedding

N = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These networks are tiny: one intra-op thread is as fast and does not stall (by seconds) when
    other jobs share the cores.  Restored afterwards so other test modules are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the near-zero / zero initializations with generic weights, so that every path through
    the network (residual branches, attention, s-branch) visibly affects the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.add_(0.1 * noise)
    return net


def _unet(**kw):
    args = dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2))
    return UNet(**(args | kw))


def _input(net, n=N, dtype=torch.float32):
    if isinstance(net, UNet):
        return torch.randn(n, net.in_channels, net.img_resolution, net.img_resolution, dtype=dtype)
    return torch.randn(n, net.dim, dtype=dtype)


IMG = dict(in_channels=1, out_channels=1, model_channels=16)
RGB = dict(in_channels=3, out_channels=3, model_channels=16)
SHAPE_CASES = {
    "unet8": (UNet, IMG | dict(img_resolution=8, channel_mult=(1, 2))),
    "unet8_three_levels": (UNet, IMG | dict(img_resolution=8, channel_mult=(1, 2, 2))),
    "unet28": (UNet, IMG | dict(img_resolution=28, channel_mult=(1, 2, 2))),
    "unet28_odd_7to4": (UNet, IMG | dict(img_resolution=28, channel_mult=(1, 1, 2, 2), num_blocks=1)),
    "unet32_rgb_attn16": (
        UNet,
        RGB | dict(img_resolution=32, channel_mult=(1, 2, 2), attn_resolutions=(16,)),
    ),
    "mlp2": (MLP, dict(dim=2, hidden=32)),
    "mlp16": (MLP, dict(dim=16, hidden=32)),
}


@pytest.mark.parametrize("label_dim", [0, 10])
@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_output_shape_and_logvar(case, label_dim):
    torch.manual_seed(0)
    cls, kwargs = SHAPE_CASES[case]
    net = cls(**kwargs, label_dim=label_dim, logvar_head=True)
    x = _input(net)
    t = torch.randn(N)
    labels = torch.randint(0, 10, (N,)) if label_dim else None
    out = net(x, t, labels=labels)
    assert out.shape == x.shape and out.dtype == x.dtype
    out, logvar = net(x, t, labels=labels, return_logvar=True)
    assert out.shape == x.shape and logvar.shape == (N,)
    if label_dim:  # one-hot float labels mean the same as indices
        onehot = torch.nn.functional.one_hot(labels, 10).float()
        assert torch.equal(net(x, t, labels=onehot), net(x, t, labels=labels))


def test_scalar_time_is_broadcast():
    torch.manual_seed(0)
    net = _randomize(MLP(2, hidden=32)).eval()
    x = torch.randn(N, 2)
    torch.testing.assert_close(net(x, 0.3), net(x, torch.full((N,), 0.3)))


# ---------------------------------------------------------------------------------------------------
# Forward-mode AD (sCM, FACM): jvp w.r.t. (x, t) against a central finite difference, in float64.

JVP_NETS = {
    "unet_attn_double": lambda: _unet(
        attn_resolutions=(4,), adaptive_norm="double", label_dim=4, logvar_head=True
    ),
    "unet_fourier_scale_shift": lambda: _unet(embedding_type="fourier", fourier_scale=0.5),
    "mlp_double": lambda: MLP(2, hidden=32, adaptive_norm="double", label_dim=4),
    "mlp_scale_shift": lambda: MLP(16, hidden=32),
}


@pytest.mark.parametrize("case", list(JVP_NETS))
def test_jvp_matches_finite_difference(case):
    torch.manual_seed(0)
    net = _randomize(JVP_NETS[case]()).double().eval()
    x = _input(net, dtype=torch.float64)
    t = torch.rand(N, dtype=torch.float64)
    dx, dt = torch.randn_like(x), torch.randn_like(t)
    labels = torch.randint(0, 4, (N,)) if net.label_dim else None

    def f(x, t):
        return net(x, t, labels=labels)

    out, jvp = torch.func.jvp(f, (x, t), (dx, dt))
    h = 1e-5
    fd = (f(x + h * dx, t + h * dt) - f(x - h * dx, t - h * dt)) / (2 * h)
    torch.testing.assert_close(out, f(x, t), rtol=1e-12, atol=0)
    rel = (jvp - fd).norm() / fd.norm()
    assert fd.norm() > 1e-3 and rel < 1e-6, rel


@pytest.mark.parametrize("case", list(JVP_NETS))
def test_jvp_paths_agree_with_plain_functorch(case):
    """core.jvp's dual-tensor path (weights' zero tangents dropped) and its functorch path give the derivative
    of plain `torch.func.jvp` through stock layers, and the primal of a plain forward."""
    from core.jvp import jvp

    torch.manual_seed(0)
    net = _randomize(JVP_NETS[case]()).double().eval()
    x = _input(net, dtype=torch.float64)
    t = torch.rand(N, dtype=torch.float64)
    tangents = (torch.randn_like(x), torch.randn_like(t))
    labels = torch.randint(0, 4, (N,)) if net.label_dim else None

    def f(x, t):
        return net(x, t, labels=labels)

    with torch.no_grad():
        ref_out, ref = torch.func.jvp(f, (x, t), tangents)  # outside core.jvp: stock nn.Conv2d/nn.Linear rules
    for method in ("autograd", "functorch"):
        out, d = jvp(f, (x, t), tangents, method=method)
        torch.testing.assert_close(out, ref_out, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(d, ref, rtol=1e-12, atol=1e-12)


def test_constant_weight_layers_are_plain_layers_outside_a_jvp():
    """Same parameters and gradients as nn.Conv2d / nn.Linear; the weight-constant rule cannot leak into backward."""
    from core.backbone.constant_weight_jvp import Conv2d, Linear
    from core.jvp import _constant_weights_scope

    torch.manual_seed(0)
    for ours, stock, x in ((Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5)),
                           (Linear(3, 4), torch.nn.Linear(3, 4), torch.randn(2, 3))):
        stock.load_state_dict(ours.state_dict())
        assert ours.state_dict().keys() == stock.state_dict().keys()
        ours(x).square().sum().backward()
        stock(x).square().sum().backward()
        assert torch.equal(ours.weight.grad, stock.weight.grad) and torch.equal(ours.bias.grad, stock.bias.grad)
        with _constant_weights_scope(), pytest.raises(RuntimeError, match="forward-mode AD under no_grad"):
            ours(x).sum().backward()


# ---------------------------------------------------------------------------------------------------
# CTM's second time input.

S_NETS = {
    "unet": lambda second: _unet(label_dim=3, second_time_input=second),
    "mlp": lambda second: MLP(2, hidden=32, label_dim=3, second_time_input=second),
}


@pytest.mark.parametrize("case", list(S_NETS))
def test_second_time_input_starts_as_noop_then_depends_on_s(case):
    torch.manual_seed(0)
    one = _randomize(S_NETS[case](False)).eval()
    two = S_NETS[case](True).eval()
    missing, unexpected = two.load_state_dict(one.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("cond.map_s.") for k in missing)

    x, t, labels = _input(one), torch.randn(N), torch.randint(0, 3, (N,))
    s1, s2 = torch.randn(N), torch.randn(N)
    ref = one(x, t, labels=labels)
    assert torch.equal(two(x, t, s1, labels=labels), ref)
    assert torch.equal(two(x, t, labels=labels), ref)  # s = None means s = t

    with torch.no_grad():
        two.cond.map_s.layer1.weight.normal_(0, 0.1)
    a, b = two(x, t, s1, labels=labels), two(x, t, s2, labels=labels)
    assert (a - b).abs().max() > 1e-3 * a.abs().max()
    torch.testing.assert_close(two(x, t, labels=labels), two(x, t, t, labels=labels), rtol=0, atol=0)


def test_invalid_calls_raise():
    net = _unet()
    x, t = _input(net), torch.randn(N)
    with pytest.raises(ValueError, match="second_time_input"):
        net(x, t, s=t)
    with pytest.raises(ValueError, match="logvar_head"):
        net(x, t, return_logvar=True)
    with pytest.raises(ValueError, match="label_dim"):
        net(x, t, labels=torch.zeros(N, dtype=torch.long))
    with pytest.raises(ValueError, match="second_time_input"):
        MLP(2, hidden=16)(torch.randn(N, 2), t, s=t)
    with pytest.raises(ValueError, match="logvar_head"):
        MLP(2, hidden=16)(torch.randn(N, 2), t, return_logvar=True)


# ---------------------------------------------------------------------------------------------------
# Dropout: methods share one mask between two calls by replaying the RNG state.

DROPOUT_NETS = {
    "unet": lambda: _unet(dropout=0.3),
    "mlp": lambda: MLP(2, hidden=32, dropout=0.3),
}


@pytest.mark.parametrize("case", list(DROPOUT_NETS))
def test_dropout_is_random_but_replayable(case):
    torch.manual_seed(0)
    net = _randomize(DROPOUT_NETS[case]()).train()
    x, t = _input(net), torch.randn(N)
    assert not torch.allclose(net(x, t), net(x, t))

    def call(fn):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            return fn()

    a = call(lambda: net(x, t))
    b = call(lambda: net(x, t))
    assert torch.equal(a, b)
    # sCM takes F_theta and the JVP of F_sg in two calls with one mask: the jvp's primal is the same.
    primal, _ = call(
        lambda: torch.func.jvp(lambda x, t: net(x, t), (x, t), (torch.ones_like(x), torch.ones_like(t)))
    )
    torch.testing.assert_close(primal, a)


# ---------------------------------------------------------------------------------------------------
# Parameter counts.


def _count(net):
    return sum(p.numel() for p in net.parameters())


def test_parameter_count_scales_with_width():
    counts = {c: _count(_unet(model_channels=c, num_blocks=2)) for c in (16, 32, 64)}
    print("UNet 8x8, channel_mult (1, 2), num_blocks 2:", counts)
    # Almost every weight is a conv or Linear between two widths: the count grows ~ quadratically.
    assert 3.5 < counts[32] / counts[16] < 4.2 and 3.7 < counts[64] / counts[32] < 4.1
    # 64 channels: 4,209,345 parameters (14 residual blocks of 64-256 channels with 3x3 convs and a
    # 256 -> 2C adaptive affine).  Not the 0.5-2M first guessed; 32 channels gives 1.06M.
    assert 3.5e6 < counts[64] < 5e6
    assert 0.5e6 < counts[32] < 2e6
    mlp = _count(MLP(2, hidden=256, depth=3))
    print("MLP 2-D, 256 wide, depth 3:", mlp)
    assert 0.5e6 < mlp < 1e6


def test_fourier_frequencies_follow_the_seed():
    torch.manual_seed(7)
    a = _unet(embedding_type="fourier", fourier_scale=16.0)
    torch.manual_seed(7)
    b = _unet(embedding_type="fourier", fourier_scale=16.0)
    sa, sb = a.state_dict(), b.state_dict()
    assert "cond.map_t.features.freqs" in sa
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    freqs = TimeEmbedding(4096, 8, "fourier", fourier_scale=0.02).features.freqs
    assert 0.018 < freqs.std().item() < 0.022


# ---------------------------------------------------------------------------------------------------
# Precision and batch independence.


def test_time_embedding_stays_fp32_under_autocast():
    torch.manual_seed(0)
    emb = TimeEmbedding(16, 64)
    cond = Conditioning(16, 64, label_dim=3, second_time_input=True, logvar_head=True)
    t = torch.randn(N)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert emb.layer0(torch.randn(N, 16)).dtype == torch.bfloat16  # autocast is really on
        assert emb(t).dtype == torch.float32
        e, logvar = cond(torch.zeros(N, 1), t, t, torch.randint(0, 3, (N,)), return_logvar=True)
        assert e.dtype == torch.float32 and logvar.dtype == torch.float32
        net = _unet(attn_resolutions=(4,), logvar_head=True)
        out, logvar = net(torch.randn(N, 1, 8, 8), t, return_logvar=True)
    assert torch.isfinite(out).all() and logvar.dtype == torch.float32


@pytest.mark.parametrize("case", ["unet", "mlp"])
def test_batch_independence(case):
    torch.manual_seed(0)
    net = _unet(attn_resolutions=(4,), label_dim=3) if case == "unet" else MLP(2, hidden=32, label_dim=3)
    net = _randomize(net).eval()
    x, t, labels = _input(net, n=4), torch.randn(4), torch.randint(0, 3, (4,))
    batched = net(x, t, labels=labels)
    single = torch.cat([net(x[i : i + 1], t[i : i + 1], labels=labels[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
