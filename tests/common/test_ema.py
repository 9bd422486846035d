"""EMA: half-life in samples (independent of batch size), ramp-up, exact update rule."""

import math

import pytest
import torch

from common.ema import EMA


def test_halflife_in_samples_is_batch_independent():
    ema = EMA(torch.nn.Linear(1, 1), halflife_kimg=10, rampup_ratio=None)
    # after 10k samples the old weight counts one half, whatever the batch size
    for batch in (1, 100, 1000):
        assert ema.beta(0, batch) ** (10_000 / batch) == pytest.approx(0.5)


def test_rampup_shortens_early_halflife():
    ema = EMA(torch.nn.Linear(1, 1), halflife_kimg=10, rampup_ratio=0.05)
    assert ema.beta(1000, 100) == pytest.approx(0.5 ** (100 / 50))  # halflife = 0.05 * 1000 samples
    assert ema.beta(10**7, 100) == pytest.approx(0.5 ** (100 / 10_000))


def test_update_is_lerp_and_ema_has_no_grad():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, halflife_kimg=0.1, rampup_ratio=None)
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, nimg=100, batch_size=100)
    beta = 0.5
    for b, p_ema, p in zip(before, ema.module.parameters(), net.parameters(), strict=True):
        assert torch.allclose(p_ema, beta * b + (1 - beta) * p)
        assert not p_ema.requires_grad
    assert math.isclose(ema.beta(100, 100), beta)
